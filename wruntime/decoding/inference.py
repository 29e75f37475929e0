"""The decoder's self-attention cache across one window's decoding, behind one small API.

A session owns the cache and feeds the decoder executor. Its life:

1. ``prefill(prompt)`` — the whole prompt (<|startofprev|> + previous text +
   SOT sequence + prefix) in ONE decoder call; the prompt is the same for every
   row of the group, so it is run once and shared;
2. ``step(last_tokens)`` — one call per generated token for all B rows at once;
3. ``rearrange(source_rows)`` — after beam search picks its survivors, the
   cache rows follow their beams.

Two variants, chosen by what the model directory has (`WhisperModel.session`):

- `ExplicitCacheSession`: the cache lives here as numpy arrays (L, B, C, N);
  each call passes it in, and the decoder returns only the new positions' K/V,
  which are written in place. The prompt runs at batch 1 and its cache is
  copied to the B rows once, before the first step.
- `StatefulSession`: the cache lives in the executor's state (MLState on Core
  ML, fp16). The function has a fixed batch, so the prompt runs with its rows
  repeated; reordering beams costs nothing here but a ``beam_order`` input that
  the next call applies before writing.

Both build the additive mask and the positions the interface asks for. The
last call's cross-attention weights of the alignment heads are kept in
``alignment`` (B, A, T, S) for word timestamps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from wruntime.build.interface import MASK_NEG
from wruntime.errors import WruntimeError
from wruntime.executors.base import Executor


class DecoderSession(Protocol):
    #: Rows decoded together (beams or samples).
    batch: int
    #: Tokens already in the cache (the next token's position).
    position: int
    #: The alignment-head cross-attention weights of the last call, (rows, A, T, S), if any.
    alignment: np.ndarray | None

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed tokens shared by every row (the prompt); logits (T, V)."""
        ...

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row, (B,); logits (B, V)."""
        ...

    def rearrange(self, source_rows: Sequence[int]) -> None:
        """Row i of the cache becomes the old row source_rows[i]."""
        ...


def _logits(out: dict[str, np.ndarray]) -> np.ndarray:
    """The (B, T, V) logits. A decoder built for the Neural Engine returns the vocabulary in
    chunks (logits_0, logits_1, ...: no ANE tensor dimension may exceed 16384), joined here."""
    if "logits" in out:
        return out["logits"]
    chunks = sorted((k for k in out if k.startswith("logits_")), key=lambda k: int(k[7:]))
    if not chunks:
        raise WruntimeError("The decoder returned no logits; the model directory is damaged.")
    return np.concatenate([out[k] for k in chunks], axis=-1)


def _check_room(position: int, count: int, n_ctx: int) -> None:
    if position + count > n_ctx:
        raise WruntimeError(
            f"The decoder context holds {n_ctx} tokens; {position + count} were fed."
        )


class _Session:
    """What both sessions hold: the executor, the window's cross K/V and the position."""

    def __init__(
        self,
        executor: Executor,
        cross_k: np.ndarray,
        cross_v: np.ndarray,
        *,
        n_ctx: int,
        batch: int = 1,
    ) -> None:
        self.executor = executor
        self.cross_k = cross_k
        self.cross_v = cross_v
        self.n_ctx = n_ctx
        self.batch = batch
        self.position = 0
        self.alignment: np.ndarray | None = None


class ExplicitCacheSession(_Session):
    """Session over the explicit-cache decoder (k_cache/v_cache in, k_new/v_new out)."""

    def __init__(
        self,
        executor: Executor,
        cross_k: np.ndarray,
        cross_v: np.ndarray,
        *,
        n_ctx: int,
        batch: int = 1,
    ) -> None:
        super().__init__(executor, cross_k, cross_v, n_ctx=n_ctx, batch=batch)
        n_layer, _, n_state, _ = cross_k.shape
        self._stepped = False
        # Batch 1 until the first step: the shared prompt is computed once.
        self.k_cache = np.zeros((n_layer, 1, n_state, n_ctx), np.float32)
        self.v_cache = np.zeros_like(self.k_cache)
        # Cache row of each beam (see rearrange), and whether that is the identity.
        self._rows = np.arange(batch)
        self._in_order = True

    def _mask(self, count: int) -> np.ndarray:
        """(T, N + T): cache slots before `position` visible, new tokens causal among themselves."""
        n = self.n_ctx
        mask = np.full((count, n + count), MASK_NEG, np.float32)
        mask[:, : self.position] = 0.0
        if count == 1:  # a step: np.tril_indices alone costs more than the rest
            mask[0, n] = 0.0
        else:
            mask[:, n:][np.tril_indices(count)] = 0.0
        return mask

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """One decoder call for tokens (rows, T) at the next T positions; logits (rows, T, V)."""
        count = tokens.shape[1]
        _check_room(self.position, count, self.n_ctx)
        start = self.position
        out = self.executor.predict(
            {
                "tokens": np.ascontiguousarray(tokens, dtype=np.int32),
                "positions": np.arange(start, start + count, dtype=np.int32),
                "k_cache": self.k_cache,
                "v_cache": self.v_cache,
                "mask": self._mask(count),
                "cross_k": self.cross_k,
                "cross_v": self.cross_v,
            }
        )
        self.k_cache[..., start : start + count] = out["k_new"]
        self.v_cache[..., start : start + count] = out["v_new"]
        self.position += count
        self.alignment = out.get("alignment")
        return _logits(out)

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        if self.k_cache.shape[1] != 1 or self._stepped:
            raise RuntimeError("prefill comes before the first step")
        return self.forward(np.asarray(tokens, dtype=np.int32)[None])[0]

    def _widen(self) -> None:
        if self.k_cache.shape[1] != self.batch:
            self.k_cache = np.repeat(self.k_cache, self.batch, axis=1)
            self.v_cache = np.repeat(self.v_cache, self.batch, axis=1)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self._widen()
        self._stepped = True
        tokens = np.asarray(tokens, dtype=np.int32).reshape(self.batch)
        if self._in_order:
            return self.forward(tokens[:, None])[:, -1]
        feed = np.empty_like(tokens)
        feed[self._rows] = tokens  # each beam's token into its cache row
        logits = self.forward(feed[:, None])[self._rows, -1]
        if self.alignment is not None:
            self.alignment = self.alignment[self._rows]
        return logits

    def rearrange(self, source_rows: Sequence[int]) -> None:
        """Beams follow their sources by moving as little of the cache as possible.

        Beam i lives in cache row ``_rows[i]``, not necessarily row i: a beam
        whose source row no earlier beam has claimed takes that row over as it
        is, and only a second beam continuing the same source gets a copy, into
        a row no beam continues. The copies only ever read rows that stay and
        write rows that are free, and only the filled slots move.
        """
        if self.k_cache.shape[1] == 1:
            return  # before the first step every row is the prompt: nothing to move
        sources = [int(self._rows[r]) for r in source_rows]
        claimed = set(sources)
        free = [row for row in range(self.batch) if row not in claimed]
        rows: list[int] = []
        kept: set[int] = set()
        used = self.position
        for source in sources:
            if source not in kept:
                kept.add(source)
                rows.append(source)
                continue
            row = free.pop()
            self.k_cache[:, row, :, :used] = self.k_cache[:, source, :, :used]
            self.v_cache[:, row, :, :used] = self.v_cache[:, source, :, :used]
            rows.append(row)
        self._rows = np.asarray(rows, dtype=np.intp)
        self._in_order = rows == list(range(self.batch))


class StatefulSession(_Session):
    """Session over a stateful decoder function of fixed batch (cache in the executor's state)."""

    def __init__(
        self,
        executor: Executor,
        cross_k: np.ndarray,
        cross_v: np.ndarray,
        *,
        n_ctx: int,
        batch: int = 1,
    ) -> None:
        super().__init__(executor, cross_k, cross_v, n_ctx=n_ctx, batch=batch)
        self.state: Any = executor.make_state()
        self._identity = np.arange(batch, dtype=np.int32)
        self.beam_order = self._identity

    def _mask(self, count: int) -> np.ndarray:
        """(T, N) over the cache after this call's writes: token i sees slots [0, position + i]."""
        visible = np.arange(self.n_ctx)[None, :] <= self.position + np.arange(count)[:, None]
        return np.where(visible, 0.0, MASK_NEG).astype(np.float32)

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        count = tokens.shape[1]
        _check_room(self.position, count, self.n_ctx)
        start = self.position
        out = self.executor.predict(
            {
                "tokens": np.ascontiguousarray(tokens, dtype=np.int32),
                "positions": np.arange(start, start + count, dtype=np.int32),
                "beam_order": self.beam_order,
                "mask": self._mask(count),
                "cross_k": self.cross_k,
                "cross_v": self.cross_v,
            },
            state=self.state,
        )
        self.beam_order = self._identity
        self.position += count
        self.alignment = out.get("alignment")
        return _logits(out)

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        rows = np.repeat(np.asarray(tokens, dtype=np.int32)[None], self.batch, axis=0)
        return self.forward(rows)[0]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self.forward(np.asarray(tokens, dtype=np.int32).reshape(self.batch, 1))[:, -1]

    def rearrange(self, source_rows: Sequence[int]) -> None:
        # Compose with a reorder not yet applied: new row i continues old row order[rows[i]].
        self.beam_order = np.ascontiguousarray(
            self.beam_order[np.asarray(source_rows, dtype=np.intp)], dtype=np.int32
        )
