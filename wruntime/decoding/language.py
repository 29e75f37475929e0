"""Spoken-language identification from the decoder's first position.

openai-whisper's method: run the decoder on <|startoftranscript|> alone (at
position 0, so nothing earlier can sway it) and read its next-token
distribution restricted to the language tokens. The logits come from the same
session that then decodes the window, so when there is no previous-text prompt
the detection call doubles as the first token of the prompt.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wruntime.errors import WruntimeError


def language_probs(logits_at_sot: np.ndarray, tokenizer: Any) -> tuple[str, dict[str, float]]:
    """The most likely language code and every language's probability, from logits (V,) at SOT."""
    lang_tokens = np.asarray(tokenizer.all_language_tokens, dtype=np.int64)
    codes = list(tokenizer.all_language_codes)
    if len(lang_tokens) == 0:
        raise WruntimeError("This model is English-only and has no language tokens to detect.")
    x = np.asarray(logits_at_sot, dtype=np.float64)[lang_tokens]
    # Softmax over the language tokens only = openai's softmax after masking the rest to -inf.
    p = np.exp(x - x.max())
    p /= p.sum()
    # argmax over vocabulary order, as openai's argmax over masked logits picks the lowest id.
    by_id = np.argsort(lang_tokens, kind="stable")
    best = by_id[int(np.argmax(x[by_id]))]
    return codes[best], {c: float(v) for c, v in zip(codes, p, strict=True)}


def detect_language(model: Any, cross: Any) -> tuple[str, dict[str, float]]:
    """Detect the language of one encoded window with a one-token decoder call."""
    if not model.is_multilingual:
        raise WruntimeError("This model is English-only and has no language tokens to detect.")
    tokenizer = model.tokenizer
    session = model.session(cross, batch=1)
    return language_probs(session.prefill([tokenizer.sot])[0], tokenizer)
