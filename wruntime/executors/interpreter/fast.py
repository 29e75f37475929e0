"""The element-wise hot spots (softmax, GELU, layer norm) as cache-sized numpy passes.

Matrix products run on BLAS; in a Whisper encoder softmax and GELU cost more
than the matmuls (see shared/notes/numpy-speed-here.md), because each numpy
ufunc makes one pass over memory. Two measured facts shape this module:

* numpy's own exp/tanh are SIMD (AVX-512 here) and several times faster per value
  than a numba loop calling libm (numba has no SVML here): 2.25 M exps take ~1 ms.
  So the work stays in numpy ufuncs, and erf -- which numpy lacks and scipy
  computes one value at a time -- is built from exp and a polynomial
  (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7, below fp32 resolution near 1).
* A chain of ~20 ufuncs (the GELU) over a 9 MB tensor streams it through memory
  once per ufunc; over 1 MB blocks with preallocated scratch it stays in cache.
  Softmax (5 passes) is faster on whole arrays. Work is shared among threads
  (numpy releases the GIL in ufuncs) when threads.py says the cores are free. The exact GELU measured 10x
  faster this way than a numba loop over math.erf.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from wruntime.executors.interpreter import threads

#: Elements per GELU block: its ~20 passes stay in cache (256 K measured best,
#: against 16 K-4 M: per-call overhead below, memory traffic above).
GELU_BLOCK = 1 << 18
#: From this many elements on, blocks are spread over threads.
PARALLEL = 1 << 18

_WORKERS = max(1, min(os.cpu_count() or 1, 8))
_pool: ThreadPoolExecutor | None = None

_F = np.float32
_INV_SQRT2 = _F(1.0 / math.sqrt(2.0))
_AS_P = _F(0.3275911)
_AS_A = tuple(_F(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))
_TANH_C = _F(math.sqrt(2.0 / math.pi))
_TANH_K = _F(0.044715)
_HALF, _ONE = _F(0.5), _F(1.0)


def _parallel(tasks: list[tuple[int, int]], work: Callable[[int, int], None], size: int) -> None:
    """Run `work(lo, hi)` over `tasks`, on threads when the tensor is big."""
    if size < PARALLEL or threads.run_threads() == 1 or len(tasks) < 2:
        for lo, hi in tasks:
            work(lo, hi)
        return
    pool = _get_pool()
    per = -(-len(tasks) // _WORKERS)
    groups = [tasks[i : i + per] for i in range(0, len(tasks), per)]

    def run(group: list[tuple[int, int]]) -> None:
        for lo, hi in group:
            work(lo, hi)

    for future in [pool.submit(run, g) for g in groups]:
        future.result()


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="wruntime-fast")
    return _pool


#: Bytes per column block of a large weight: a product of a few rows reads a
#: block from memory once and multiplies every row by it while it is in cache.
BLOCK_BYTES = 3 << 20


class BlockedWeight:
    """An (in, out) weight, C-contiguous, with views of its column blocks.

    A product of a few rows (a beam of decoder steps) is memory bound, and
    OpenBLAS's GEMM pads a few rows to its kernel's height: 5 rows by the
    51864 x 384 vocabulary projection took 12.5 ms against 3.8 ms for one row.
    Row by row over blocks of about BLOCK_BYTES (read from memory once, then
    from cache for the other rows) it took 8.5 ms.
    """

    def __init__(self, wt: np.ndarray) -> None:
        nin, nout = wt.shape
        width = max(256, BLOCK_BYTES // (4 * max(nin, 1)) // 16 * 16)
        self.full = np.ascontiguousarray(wt, np.float32)
        self.shape = wt.shape
        self.starts = [*range(0, nout, width), nout]
        self.blocks = [
            self.full[:, a:b] for a, b in zip(self.starts[:-1], self.starts[1:], strict=True)
        ]


def _block_range(x: np.ndarray, w: BlockedWeight, out: np.ndarray, lo: int, hi: int) -> None:
    if x.shape[0] == 1:  # one vector: the whole range in one call
        a, b = w.starts[lo], w.starts[hi]
        np.matmul(x, w.full[:, a:b], out=out[:, a:b])
        return
    for i in range(lo, hi):
        a, b = w.starts[i], w.starts[i + 1]
        for r in range(x.shape[0]):
            np.matmul(x[r], w.blocks[i], out=out[r, a:b])


def blocked_product(x: np.ndarray, w: BlockedWeight, out: np.ndarray, few_rows: int) -> None:
    """out = x @ w for a 2-D x.

    Up to `few_rows` rows run as one-thread vector-matrix products (row by row
    over the blocks, see BlockedWeight), with the blocks shared among the threads
    when the cores are free: one core streams ~20 GB/s here, and OpenBLAS's own
    threads measured slower than one for this (the wake-up costs a scheduler
    tick). More rows are one BLAS product, on BLAS's threads.
    """
    rows = x.shape[0]
    nblocks = len(w.blocks)
    if rows > few_rows:
        threads.for_product(x.size * w.shape[1])
        np.matmul(x, w.full, out=out)
        return
    threads.for_product(0)
    parts = min(_WORKERS, threads.run_threads(), nblocks)
    if parts < 2:
        _block_range(x, w, out, 0, nblocks)
        return
    cut = [nblocks * i // parts for i in range(parts + 1)]
    pool = _get_pool()
    futures = [pool.submit(_block_range, x, w, out, cut[i], cut[i + 1]) for i in range(1, parts)]
    _block_range(x, w, out, cut[0], cut[1])
    for future in futures:
        future.result()


def _spans(n: int, step: int) -> list[tuple[int, int]]:
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _f32c(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


# ------------------------------------------------------------------------ softmax


def _softmax_block(xb: np.ndarray, ob: np.ndarray, axis: int) -> None:
    # The ufuncs' own reduces: x.max() and x.sum() are these plus argument handling.
    m = np.maximum.reduce(xb, axis=axis, keepdims=True)
    np.subtract(xb, m, out=ob)
    np.exp(ob, out=ob)
    s = np.add.reduce(ob, axis=axis, keepdims=True)
    np.reciprocal(s, out=s)
    ob *= s


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Softmax along `axis`, max-subtracted so it never overflows.

    Five whole-array passes: cutting a (1500, 1500) score map into blocks, by rows
    or by columns, measured slower here than numpy's whole-array SIMD loops, so
    blocks are used only to share the work among threads (by leading index).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    axis = axis % x.ndim
    out = np.empty_like(x)
    outer = math.prod(x.shape[:axis])
    if outer < 2 or x.size < PARALLEL or threads.run_threads() == 1:
        _softmax_block(x, out, axis)
        return out
    shape3 = (outer, x.shape[axis], -1)
    x3, o3 = x.reshape(shape3), out.reshape(shape3)
    per = -(-outer // _WORKERS)
    _parallel(
        _spans(outer, per),
        lambda lo, hi: _softmax_block(x3[lo:hi], o3[lo:hi], 1),
        x.size,
    )
    return out


# --------------------------------------------------------------------------- GELU


def _erfc_half(z: np.ndarray, t: np.ndarray, p: np.ndarray) -> None:
    """p = erfc(z) / 2 for z >= 0 (A&S 7.1.26); z is overwritten."""
    np.multiply(z, _AS_P, out=t)
    t += _ONE
    np.reciprocal(t, out=t)
    a1, a2, a3, a4, a5 = _AS_A
    np.multiply(t, a5, out=p)
    p += a4
    p *= t
    p += a3
    p *= t
    p += a2
    p *= t
    p += a1
    p *= t
    np.multiply(z, z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    p *= z
    p *= _HALF


def _gelu_exact_block(x: np.ndarray, out: np.ndarray, scratch: tuple[np.ndarray, ...]) -> None:
    n = x.size
    z, t, p = (s[:n] for s in scratch)
    np.abs(x, out=z)
    z *= _INV_SQRT2
    _erfc_half(z, t, p)  # p = erfc(|x|/sqrt2)/2, so Phi(x) = 1/2 + sign(x) (1/2 - p)
    np.subtract(_HALF, p, out=z)
    np.copysign(z, x, out=z)  # a SIMD ufunc; a masked copy is 50x slower here
    z += _HALF
    np.multiply(x, z, out=out)


def _gelu_tanh_block(x: np.ndarray, out: np.ndarray, scratch: tuple[np.ndarray, ...]) -> None:
    n = x.size
    z = scratch[0][:n]
    np.multiply(x, x, out=z)
    z *= _TANH_K
    z *= x
    z += x
    z *= _TANH_C
    np.tanh(z, out=z)
    z += _ONE
    z *= _HALF
    np.multiply(x, z, out=out)


def _gelu_sigmoid_block(x: np.ndarray, out: np.ndarray, scratch: tuple[np.ndarray, ...]) -> None:
    n = x.size
    z = scratch[0][:n]
    np.multiply(x, _F(-1.702), out=z)
    np.exp(z, out=z)
    z += _ONE
    np.divide(x, z, out=out)


_GELU = {
    "EXACT": _gelu_exact_block,
    "TANH_APPROXIMATION": _gelu_tanh_block,
    "SIGMOID_APPROXIMATION": _gelu_sigmoid_block,
}


def _scratch(n: int) -> tuple[np.ndarray, ...]:
    return (np.empty(n, _F), np.empty(n, _F), np.empty(n, _F))


def gelu(x: np.ndarray, mode: str) -> np.ndarray:
    """GELU in MIL's three modes (EXACT, TANH_APPROXIMATION, SIGMOID_APPROXIMATION)."""
    x = _f32c(x)
    block = _GELU[mode]
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    if flat.size <= GELU_BLOCK:
        block(flat, out, _scratch(flat.size))
        return out.reshape(x.shape)

    def work(lo: int, hi: int) -> None:
        scratch = _scratch(GELU_BLOCK)
        for a, b in _spans(hi - lo, GELU_BLOCK):
            block(flat[lo + a : lo + b], out[lo + a : lo + b], scratch)

    _parallel(_spans(flat.size, GELU_BLOCK * 4), work, flat.size)
    return out.reshape(x.shape)


def erf(x: np.ndarray) -> np.ndarray:
    """erf from the same SIMD-friendly approximation as the exact GELU."""
    x = _f32c(x)
    flat = x.reshape(-1)
    z, t, p = _scratch(flat.size)
    np.abs(flat, out=z)
    _erfc_half(z, t, p)
    np.multiply(p, _F(-2.0), out=z)
    z += _ONE  # erf(|x|)
    np.copysign(z, flat, out=z)
    return z.reshape(x.shape)


# --------------------------------------------------------------------- layer norm


def layer_norm_last(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """Layer norm over the last axis; `gamma` and `beta` have that axis' length."""
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = np.mean(centered * centered, axis=-1, keepdims=True)
    var += _F(eps)
    np.sqrt(var, out=var)
    centered /= var
    centered *= gamma
    centered += beta
    return centered
