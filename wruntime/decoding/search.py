"""Choosing the next token: greedy, sampling, and beam search; and ranking the results.

A search sees filtered logits (B, V) for a group of B sequences of one audio
window and extends the tokens (B, length). Beam search also tells the
inference session how the surviving beams map onto the previous rows, so the
KV cache can follow; it never calls the decoder itself — every beam goes
through the decoder in the same single call per step.

Semantics are openai-whisper's, including its float32 accumulation of
log-probabilities and its bookkeeping of finished beams (a dict keyed by the
whole token sequence, in score order), so the same logits give the same choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis (torch's formula: x - max - log sum exp)."""
    x = logits.astype(np.float32, copy=False)
    top = x.max(axis=-1, keepdims=True)
    shifted = x - top
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class TokenSearch(Protocol):
    def reset(self) -> None: ...

    def update(
        self, tokens: np.ndarray, logits: np.ndarray, sum_logprobs: np.ndarray
    ) -> tuple[np.ndarray, bool]:
        """Append one token per row; update sum_logprobs (float32, in place); say if done."""
        ...

    def finalize(
        self, tokens: np.ndarray, sum_logprobs: np.ndarray
    ) -> tuple[list[list[int]], list[float]]:
        """Candidate sequences (each ending in eot) and their summed log-probabilities."""
        ...


class GreedySearch:
    """Argmax at temperature 0; otherwise one sample per row from softmax(logits / T)."""

    def __init__(self, temperature: float, eot: int, rng: np.random.Generator | None = None):
        self.temperature = float(temperature)
        self.eot = eot
        self.rng = rng if rng is not None else np.random.default_rng()

    def reset(self) -> None:
        pass

    def _choose(self, logits: np.ndarray) -> np.ndarray:
        if self.temperature == 0:
            return np.argmax(logits, axis=-1)
        # Gumbel-max: argmax(logits/T + Gumbel noise) is an exact draw from
        # softmax(logits/T), vectorized over rows, and -inf logits stay impossible.
        gumbel = -np.log(-np.log(self.rng.random(logits.shape)))
        return np.argmax(logits.astype(np.float64) / self.temperature + gumbel, axis=-1)

    def update(
        self, tokens: np.ndarray, logits: np.ndarray, sum_logprobs: np.ndarray
    ) -> tuple[np.ndarray, bool]:
        next_tokens = self._choose(logits)
        logprobs = log_softmax(logits)
        rows = np.arange(len(next_tokens))
        running = tokens[:, -1] != self.eot
        sum_logprobs += logprobs[rows, next_tokens] * running.astype(np.float32)
        # A finished row keeps emitting eot (and is fed it) so the batch stays rectangular.
        next_tokens = np.where(running, next_tokens, self.eot)
        tokens = np.concatenate([tokens, next_tokens[:, None].astype(tokens.dtype)], axis=1)
        return tokens, bool((tokens[:, -1] == self.eot).all())

    def finalize(
        self, tokens: np.ndarray, sum_logprobs: np.ndarray
    ) -> tuple[list[list[int]], list[float]]:
        # Every sequence ends in at least one eot, even when sample_len cut it short.
        return [[*row.tolist(), self.eot] for row in tokens], [float(s) for s in sum_logprobs]


class BeamSearch:
    """Beam search over one audio window with beam_size rows, patience and openai's bookkeeping.

    Each step takes the beam_size + 1 best continuations of every beam, keeps
    the beam_size best unfinished ones as the new beams, and sets aside the
    sequences that just ended; decoding stops once round(beam_size * patience)
    have ended. ``rearrange`` is told the source row of every new beam.
    """

    def __init__(
        self,
        beam_size: int,
        eot: int,
        rearrange: Callable[[Sequence[int]], None],
        patience: float | None = None,
    ) -> None:
        self.beam_size = beam_size
        self.eot = eot
        self.rearrange = rearrange
        self.patience = patience or 1.0
        self.max_candidates = round(beam_size * self.patience)
        if self.max_candidates <= 0:
            raise ValueError(f"beam_size {beam_size} with patience {patience} keeps no candidates")
        self.finished: dict[tuple[int, ...], float] = {}

    def reset(self) -> None:
        self.finished = {}

    def update(
        self, tokens: np.ndarray, logits: np.ndarray, sum_logprobs: np.ndarray
    ) -> tuple[np.ndarray, bool]:
        if tokens.shape[0] != self.beam_size:
            raise ValueError(f"expected {self.beam_size} beams, got {tokens.shape[0]}")
        logprobs = log_softmax(logits)
        k = self.beam_size + 1
        top = np.argpartition(logprobs, -k, axis=-1)[:, -k:]  # the k best of each row
        top_lp = np.take_along_axis(logprobs, top, axis=-1)
        # Best first; equal log-probabilities in token order, so ties are deterministic.
        order = np.lexsort((top, -top_lp), axis=-1)
        top = np.take_along_axis(top, order, axis=-1)

        scores: dict[tuple[int, ...], float] = {}
        sources: dict[tuple[int, ...], int] = {}
        for j in range(self.beam_size):
            prefix = tuple(tokens[j].tolist())
            for tok in top[j].tolist():
                seq = (*prefix, tok)
                # float32 sum, as openai's (tensor + tensor).item()
                scores[seq] = float(sum_logprobs[j] + logprobs[j, tok])
                sources[seq] = j

        next_tokens: list[tuple[int, ...]] = []
        source_rows: list[int] = []
        newly_finished: dict[tuple[int, ...], float] = {}
        for seq in sorted(scores, key=scores.__getitem__, reverse=True):
            if seq[-1] == self.eot:
                newly_finished[seq] = scores[seq]
            else:
                sum_logprobs[len(next_tokens)] = scores[seq]
                next_tokens.append(seq)
                source_rows.append(sources[seq])
                if len(next_tokens) == self.beam_size:
                    break

        tokens = np.asarray(next_tokens, dtype=tokens.dtype)
        self.rearrange(source_rows)

        for seq in sorted(newly_finished, key=newly_finished.__getitem__, reverse=True):
            if len(self.finished) >= self.max_candidates:
                break
            self.finished[seq] = newly_finished[seq]
        return tokens, len(self.finished) >= self.max_candidates

    def finalize(
        self, tokens: np.ndarray, sum_logprobs: np.ndarray
    ) -> tuple[list[list[int]], list[float]]:
        finished = self.finished
        if len(finished) < self.beam_size:
            # Not enough ended in time: the best unfinished beams count, closed with eot.
            for j in list(np.argsort(sum_logprobs))[::-1]:
                finished[(*tokens[j].tolist(), self.eot)] = float(sum_logprobs[j])
                if len(finished) >= self.beam_size:
                    break
        return [list(seq) for seq in finished], list(finished.values())


def rank(
    candidates: Sequence[Sequence[int]],
    sum_logprobs: Sequence[float],
    length_penalty: float | None,
) -> int:
    """Index of the best candidate: log-probability over length (or Google NMT's penalty)."""
    scores = []
    for seq, logprob in zip(candidates, sum_logprobs, strict=True):
        length = max(len(seq), 1)  # an empty candidate would divide by zero (openai raises)
        penalty = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
        scores.append(logprob / penalty)
    return int(np.argmax(scores))
