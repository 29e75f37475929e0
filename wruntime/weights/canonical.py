"""The one in-memory form every weight reader produces.

Parameter names and shapes are openai-whisper's `state_dict` names (e.g.
``encoder.blocks.0.attn.query.weight`` with shape (out, in),
``encoder.conv1.weight`` with shape (n_audio_state, n_mels, 3)), so that the
oracle, the builder and any reference comparison speak the same language
whatever format the weights arrived in. Every array is float32 and C-contiguous.

Key projections carry no bias (openai-whisper has none; CTranslate2 stores a
zero slice, which readers drop). ``encoder.positional_embedding`` is always
present (computed sinusoids when a format does not store it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def first_special_token(n_vocab: int) -> int | None:
    """<|endoftext|>, the first id after the text tokens; None for a vocabulary not Whisper's.

    Every id from it on is a control token (end of text, start, languages, tasks,
    timestamps): 1,608 of them in tiny.en and base. English-only vocabularies have
    50,256 text tokens (GPT-2's), multilingual ones 50,257.
    """
    if not 51864 <= n_vocab <= 51866:  # English-only .. large-v3's extra language
        return None
    return 50257 if n_vocab >= 51865 else 50256


@dataclass(frozen=True)
class ModelDims:
    """Whisper's architecture hyper-parameters (openai-whisper's ModelDimensions)."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    @property
    def is_multilingual(self) -> bool:
        # openai-whisper's rule: English-only vocabularies have 51,864 ids.
        return self.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        # large-v3 added Cantonese (100 languages); 99 before it.
        return self.n_vocab - 51765 - int(self.is_multilingual)

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class WhisperWeights:
    """A whole Whisper model's parameters, plus what travels with them."""

    dims: ModelDims
    params: dict[str, np.ndarray]
    #: (layer, head) pairs of the decoder cross-attention heads that align
    #: text with audio, used for word timestamps; shape (N, 2), int64.
    alignment_heads: np.ndarray
    #: Files the tokenizer is built from (tokenizer.json, vocabulary.txt, ...),
    #: by file name; empty when the format carries none.
    tokenizer_files: dict[str, Path] = field(default_factory=dict)
    #: Where the weights were read from, for messages and manifests.
    source: str = ""

    def __getitem__(self, name: str) -> np.ndarray:
        return self.params[name]

    @property
    def num_parameters(self) -> int:
        return int(sum(a.size for a in self.params.values()))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """openai-whisper's fixed encoder positional embedding."""
    assert channels % 2 == 0
    log_timescale_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-log_timescale_increment * np.arange(channels // 2, dtype=np.float32))
    scaled_time = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)
