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
    shifted = x - x.max(axis=-1, keepdims=True)
    shifted -= np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return shifted


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of each row, best first, equal values in index order.

    k rounds of argmax (which returns the first of equal maxima) over a copy.
    np.argpartition is the textbook tool but its introselect is slow on rows
    that are mostly -inf, which is every row the timestamp rules force to a
    timestamp: 50 ms there against 0.15 ms for this on (5, 51864).
    """
    work = np.array(values, dtype=values.dtype, copy=True)
    rows = np.arange(work.shape[0])
    out = np.empty((work.shape[0], k), dtype=np.intp)
    for i in range(k):
        best = work.argmax(axis=-1)
        out[:, i] = best
        work[rows, best] = -np.inf
    # A row with fewer than k finite values would pick an index twice (argmax of a
    # row of -inf is its first index): those rows (rare: the timestamp rules at the
    # end of a window) take a stable sort.
    exhausted = np.isneginf(work).all(axis=-1)
    for r in np.flatnonzero(exhausted).tolist():
        out[r] = np.argsort(-values[r], kind="stable")[:k]
    return out


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
        top = top_k(logprobs, self.beam_size + 1)
        # float32 sums, as openai's (tensor + tensor).item()
        sums = sum_logprobs[:, None] + np.take_along_axis(logprobs, top, axis=-1)

        # openai keys its candidates by the whole sequence in a dict: beams with the
        # same tokens (all of them, at the first step) give the same key, which keeps
        # its first place in the order but takes the last beam's score and row. A
        # sequence is (beam prefix, token), so (first row with that prefix, token) is
        # the same key without hashing whole sequences.
        same = (tokens[:, None, :] == tokens[None, :, :]).all(axis=-1)
        prefix_of = same.argmax(axis=1).tolist()  # first identical row (itself if unique)
        top_list, sums_list = top.tolist(), sums.tolist()
        scores: dict[tuple[int, int], float] = {}
        sources: dict[tuple[int, int], int] = {}
        for j in range(self.beam_size):
            p = prefix_of[j]
            for tok, score in zip(top_list[j], sums_list[j], strict=True):
                scores[p, tok] = score
                sources[p, tok] = j

        next_tokens: list[int] = []
        source_rows: list[int] = []
        newly_finished: list[tuple[int, float]] = []  # (source row, score)
        for key in sorted(scores, key=scores.__getitem__, reverse=True):
            if key[1] == self.eot:
                newly_finished.append((sources[key], scores[key]))
            else:
                sum_logprobs[len(next_tokens)] = scores[key]
                next_tokens.append(key[1])
                source_rows.append(sources[key])
                if len(next_tokens) == self.beam_size:
                    break

        # Only now whole sequences: the few that end here (already in score order).
        room = self.max_candidates - len(self.finished)
        for row, score in newly_finished[: max(room, 0)]:
            self.finished[(*tokens[row].tolist(), self.eot)] = score

        rows = np.asarray(source_rows, dtype=np.intp)
        new_tokens = np.empty((len(rows), tokens.shape[1] + 1), dtype=tokens.dtype)
        new_tokens[:, :-1] = tokens[rows]
        new_tokens[:, -1] = next_tokens
        self.rearrange(source_rows)
        return new_tokens, len(self.finished) >= self.max_candidates

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
