"""Weight readers: every format a user already has, to one canonical form.

``load_weights`` looks at what it is given and picks the reader:

- a CTranslate2 / faster-whisper directory (``model.bin`` or ``model.bin.partN``),
  a ``model.bin`` file, or a list of part files (which may sit in different
  directories, as the split weight packages do);
- a Hugging Face ``transformers`` directory or ``.safetensors`` file (sharded
  checkpoints via ``model.safetensors.index.json``), read with numpy only;
- an OpenAI ``.pt`` checkpoint, unpickled by a restricted unpickler that can
  rebuild tensors and nothing else, so a checkpoint can never run code.

Every reader returns a `WhisperWeights` in openai-whisper's names (see canonical.py).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wruntime.errors import WeightsError
from wruntime.weights.canonical import ModelDims, WhisperWeights, sinusoids

__all__ = [
    "ModelDims",
    "WeightsError",
    "WhisperWeights",
    "detect_format",
    "load_weights",
    "sinusoids",
]

Source = str | Path | Sequence[str | Path]


def detect_format(source: Source) -> str:
    """'ctranslate2', 'safetensors' or 'openai-pt', from names and magic bytes (no full read)."""
    if not isinstance(source, (str, Path)):
        return "ctranslate2"  # a list of model.bin parts
    path = Path(source)
    if not path.exists():
        raise WeightsError(f"{path} does not exist.")
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if "model.bin" in names or any(n.startswith("model.bin.part") for n in names):
            return "ctranslate2"
        if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
            return "safetensors"
        pts = [n for n in names if n.endswith((".pt", ".pth"))]
        if len(pts) == 1:
            return "openai-pt"
        raise WeightsError(
            f"{path} holds no Whisper weights this program reads (model.bin, *.safetensors, *.pt)."
        )
    name = path.name
    if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
        return "safetensors"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise WeightsError(f"Cannot read {path}: {e.strerror}.") from None
    if zipfile.is_zipfile(path):
        return "openai-pt"
    if (
        name == "model.bin"
        or name.startswith("model.bin.part")
        or head[:4]
        in (
            b"\x04\0\0\0",
            b"\x05\0\0\0",
            b"\x06\0\0\0",
        )
    ):
        return "ctranslate2"
    raise WeightsError(
        f"{path} is not a Whisper weight file this program reads "
        "(CTranslate2 model.bin, Hugging Face .safetensors, OpenAI .pt)."
    )


def load_weights(
    source: Source, *, default_alignment_heads: np.ndarray | None = None
) -> WhisperWeights:
    """Read Whisper weights in any supported format.

    ``default_alignment_heads`` (from the catalog) is used when the weights do
    not name their own alignment heads (OpenAI checkpoints, HF without
    generation_config); otherwise openai-whisper's fallback applies.
    """
    kind = detect_format(source)
    if kind == "ctranslate2":
        from wruntime.weights.ctranslate2 import load_ctranslate2

        if isinstance(source, (str, Path)):
            return load_ctranslate2(Path(source))
        return load_ctranslate2([Path(p) for p in source])
    assert isinstance(source, (str, Path))
    if kind == "safetensors":
        from wruntime.weights.hf_safetensors import load_safetensors

        return load_safetensors(Path(source), default_alignment_heads=default_alignment_heads)
    from wruntime.weights.openai_pt import load_openai_pt

    path = Path(source)
    if path.is_dir():
        path = next(p for p in path.iterdir() if p.name.endswith((".pt", ".pth")))
    return load_openai_pt(path, default_alignment_heads=default_alignment_heads)
