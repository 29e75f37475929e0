"""Helpers shared by the weight readers (not public API)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from wruntime.errors import WeightsError

#: Files a tokenizer may be built from, looked for next to the weights.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "vocabulary.txt",
    "vocabulary.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "normalizer.json",
)


def find_tokenizer_files(directory: Path) -> dict[str, Path]:
    return {n: directory / n for n in TOKENIZER_FILE_NAMES if (directory / n).is_file()}


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"Cannot read {path}: {e}.") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} is not a JSON object.")
    return data


def default_alignment_heads(n_text_layer: int, n_text_head: int) -> np.ndarray:
    """openai-whisper's fallback when a model names no heads: every head of the upper half."""
    return np.array(
        [
            (layer, head)
            for layer in range(n_text_layer // 2, n_text_layer)
            for head in range(n_text_head)
        ],
        dtype=np.int64,
    ).reshape(-1, 2)


def alignment_heads_array(value: Any, where: str) -> np.ndarray:
    try:
        heads = np.asarray(value, dtype=np.int64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise WeightsError(f"The alignment heads in {where} are not (layer, head) pairs.") from None
    return heads


def finalize_params(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every canonical array is float32 and C-contiguous (see canonical.py)."""
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
