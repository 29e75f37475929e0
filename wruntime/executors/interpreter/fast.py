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


def product_by_columns(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out = x @ w for a few rows x, with w's columns shared among the threads.

    A decoder step's vocabulary projection is a vector-matrix product bound by
    memory: one core streams ~20 GB/s here, and OpenBLAS's own threads measured
    slower than one for it (the wake-up costs a scheduler tick). Each thread runs
    a one-thread BLAS product over its column block (strided views: no copies).
    """
    n = w.shape[1]
    parts = min(_WORKERS, threads.run_threads())
    cut = [(n * i // parts) // 16 * 16 for i in range(parts)] + [n]
    pool = _get_pool()
    futures = [
        pool.submit(np.matmul, x, w[:, cut[i] : cut[i + 1]], out=out[:, cut[i] : cut[i + 1]])
        for i in range(1, parts)
    ]
    np.matmul(x, w[:, : cut[1]], out=out[:, : cut[1]])
    for future in futures:
        future.result()


def _spans(n: int, step: int) -> list[tuple[int, int]]:
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _f32c(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


# ------------------------------------------------------------------------ softmax


def _softmax_block(xb: np.ndarray, ob: np.ndarray, axis: int) -> None:
    m = xb.max(axis=axis, keepdims=True)
    np.subtract(xb, m, out=ob)
    np.exp(ob, out=ob)
    s = ob.sum(axis=axis, keepdims=True)
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
