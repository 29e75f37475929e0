"""Rules that forbid tokens before each choice, as openai-whisper applies them.

Each filter sees the current logits (B, V) of every sequence in the group and
the tokens so far (B, length), prompt included, and writes -inf over what may
not come next, in place. The search (greedy, sampling, beams) then never has to
know why a token was impossible — WhisperKit's logits-filter stage.

The timestamp rules are the subtle part: a segment is <|t0|> text <|t1|>, so
timestamps come in pairs (except the last one before the end token), never go
backwards, and a decoding must open with one; and whenever the timestamp
tokens together are more likely than the single best text token, a timestamp
is forced, which is what makes openai-whisper's segments land where they do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

NEG_INF = -np.inf


class LogitFilter(Protocol):
    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        """Mask logits (B, V) in place, given the tokens (B, length) so far."""
        ...


class SuppressBlank:
    """No blank at the very start: the first sampled token may not be a space or the end token."""

    def __init__(self, blank_tokens: Sequence[int], sample_begin: int) -> None:
        # The tokenizer's encode(" ") plus eot: passed in so the filter needs no tokenizer.
        self.blank_tokens = np.asarray(sorted(set(blank_tokens)), dtype=np.int64)
        self.sample_begin = sample_begin

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        if tokens.shape[1] == self.sample_begin:
            logits[:, self.blank_tokens] = NEG_INF


class SuppressTokens:
    """Tokens that are never emitted (non-speech symbols, task and start tokens...)."""

    def __init__(self, suppress_tokens: Iterable[int]) -> None:
        self.suppress_tokens = np.asarray(sorted(set(suppress_tokens)), dtype=np.int64)

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        logits[:, self.suppress_tokens] = NEG_INF


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) per row, -inf for an all -inf row (no NaN, no warning)."""
    top = x.max(axis=-1)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(x - safe[:, None]).sum(axis=-1)) + safe


class ApplyTimestampRules:
    """openai-whisper's timestamp grammar over the sampled part of each sequence.

    ``timestamp_begin`` is <|0.00|>; every id from it up is a timestamp, and ids
    below ``eot`` are text. ``no_timestamps`` is masked always: decoding without
    timestamps is chosen by the prompt, not sampled.
    """

    def __init__(
        self,
        *,
        eot: int,
        timestamp_begin: int,
        no_timestamps: int | None,
        sample_begin: int,
        max_initial_timestamp_index: int | None,
    ) -> None:
        self.eot = eot
        self.timestamp_begin = timestamp_begin
        self.no_timestamps = no_timestamps
        self.sample_begin = sample_begin
        self.max_initial_timestamp_index = max_initial_timestamp_index

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        tb = self.timestamp_begin
        if self.no_timestamps is not None:
            logits[:, self.no_timestamps] = NEG_INF

        sampled = tokens[:, self.sample_begin :]
        n = sampled.shape[1]
        if n > 0:
            is_ts = sampled >= tb
            last_ts = is_ts[:, -1]
            # With fewer than two sampled tokens the "penultimate" counts as a
            # timestamp, so a lone opening timestamp must be followed by text.
            penult_ts = is_ts[:, -2] if n >= 2 else np.ones_like(last_ts)

            # Pairs: after <|t|><|t|> comes text; after text <|t|> comes a timestamp or the end.
            logits[last_ts & penult_ts, tb:] = NEG_INF
            logits[last_ts & ~penult_ts, : self.eot] = NEG_INF

            # Monotonic: no timestamp below the last one; and, except to close a
            # segment just opened, none equal to it either (no zero-length segments).
            has_ts = is_ts.any(axis=1)
            if has_ts.any():
                last_index = n - 1 - np.argmax(is_ts[:, ::-1], axis=1)
                last_value = sampled[np.arange(len(sampled)), last_index]
                closing = last_ts & ~penult_ts
                upper = np.where(closing, last_value, last_value + 1)  # exclusive bound
                for k in np.flatnonzero(has_ts):
                    logits[k, tb : upper[k]] = NEG_INF

        if tokens.shape[1] == self.sample_begin:
            # The first sampled token is a timestamp, and not too late a one.
            logits[:, :tb] = NEG_INF
            if self.max_initial_timestamp_index is not None:
                logits[:, tb + self.max_initial_timestamp_index + 1 :] = NEG_INF

        # If the timestamps together outweigh the best text token, a timestamp it is.
        # (Comparing log-sum-exp of raw logits with their max is the same test as
        # openai's on log-softmax values: both sides shift by the same normalizer.)
        # (float64 for the timestamps only: the max of the text part is exact in float32.)
        ts_mass = _logsumexp_rows(logits[:, tb:].astype(np.float64))
        best_text = logits[:, :tb].max(axis=1).astype(np.float64)
        logits[ts_mass > best_text, :tb] = NEG_INF
