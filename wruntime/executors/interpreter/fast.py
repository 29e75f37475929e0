"""The element-wise hot spots (softmax, GELU, layer norm) as cache-sized numpy passes.

Matrix products run on BLAS; in a Whisper encoder softmax and GELU cost more
than the matmuls (see shared/notes/numpy-speed-here.md), because each numpy
ufunc makes one pass over memory. Two measured facts shape this module:

* numpy's own exp/tanh are SIMD (AVX-512 here) and several times faster per value
  than a numba loop calling libm (numba has no SVML here): 2.25 M exps take ~1 ms.
  So the work stays in numpy ufuncs, and erf -- which numpy lacks and scipy
  computes one value at a time -- is built from exp and a polynomial
  (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7, below fp32 resolution near 1).
* A chain of ufuncs over a 9 MB tensor streams it through memory once per ufunc;
  over 64 KB blocks with preallocated scratch it stays in L2. Big tensors are cut
  into such blocks, and the blocks are shared among threads (numpy releases the GIL
  in ufuncs) when threads.py says the cores are free. The exact GELU measured 10x
  faster this way than a numba loop over math.erf.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from wruntime.executors.interpreter import threads

#: Elements per block: 64 KB of fp32, a few blocks of scratch fit in L2.
BLOCK = 1 << 14
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
    global _pool
    if size < PARALLEL or threads.run_threads() == 1 or len(tasks) < 2:
        for lo, hi in tasks:
            work(lo, hi)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="wruntime-fast")
    per = -(-len(tasks) // _WORKERS)
    groups = [tasks[i : i + per] for i in range(0, len(tasks), per)]

    def run(group: list[tuple[int, int]]) -> None:
        for lo, hi in group:
            work(lo, hi)

    for future in [_pool.submit(run, g) for g in groups]:
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
    """Softmax along `axis`, max-subtracted so it never overflows."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    axis = axis % x.ndim
    if x.size <= BLOCK:
        out = np.empty_like(x)
        _softmax_block(x, out, axis)
        return out
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    n = x.shape[axis]
    outer = math.prod(x.shape[:axis])
    inner = math.prod(x.shape[axis + 1 :])
    if inner == 1:
        x2, o2 = x.reshape(outer, n), out.reshape(outer, n)
        rows = max(1, BLOCK // n)
        _parallel(
            _spans(outer, rows),
            lambda lo, hi: _softmax_block(x2[lo:hi], o2[lo:hi], 1),
            x.size,
        )
        return out
    # Softmax across rows of a (n, inner) slab: numpy reduces over axis 0 with SIMD
    # along the contiguous inner axis, so slabs are cut by columns, a few per thread.
    x3, o3 = x.reshape(outer, n, inner), out.reshape(outer, n, inner)
    cols = max(256, -(-inner // _WORKERS))
    col_spans = _spans(inner, cols)
    tasks = [(o, c0, c1) for o in range(outer) for c0, c1 in col_spans]

    def work(lo: int, hi: int) -> None:
        for o, c0, c1 in tasks[lo:hi]:
            _softmax_block(x3[o, :, c0:c1], o3[o, :, c0:c1], 0)

    _parallel(_spans(len(tasks), 1), work, x.size)
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
    if flat.size <= BLOCK:
        block(flat, out, _scratch(flat.size))
        return out.reshape(x.shape)

    def work(lo: int, hi: int) -> None:
        scratch = _scratch(BLOCK)
        for a, b in _spans(hi - lo, BLOCK):
            block(flat[lo + a : lo + b], out[lo + a : lo + b], scratch)

    per = BLOCK * 8
    _parallel(_spans(flat.size, per), work, flat.size)
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
