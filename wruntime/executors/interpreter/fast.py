"""The element-wise hot spots (softmax, GELU, layer norm), compiled with numba when present.

Matrix products run on BLAS over both cores; numpy's ufuncs run on one core and
make one memory pass per operation, so in a Whisper encoder softmax and GELU
cost more than the matmuls (see shared/notes/numpy-speed-here.md). numba
(installed with librosa) fuses each into one parallel pass. Without numba the
same functions fall back to numpy with in-place ufuncs, same results.
fastmath stays off: exp/erf keep their IEEE behaviour, so the interpreter's
numerics are the reference a Core ML run is compared against.
"""

from __future__ import annotations

import math

import numpy as np

try:  # numba is optional: the numpy fallbacks below give the same numbers, slower.
    import numba
    from numba import prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba comes with librosa here
    HAVE_NUMBA = False

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_TANH_C = math.sqrt(2.0 / math.pi)
# Below this many elements a kernel call costs more than it saves.
_SMALL = 4096
# Inner-axis softmax works on blocks of this many columns per task.
_BLOCK = 256

if HAVE_NUMBA:

    @numba.njit(parallel=True, fastmath=False, cache=True)
    def _softmax_last(x, out):  # pragma: no cover - compiled
        rows, n = x.shape
        for r in prange(rows):
            m = x[r, 0]
            for j in range(1, n):
                if x[r, j] > m:
                    m = x[r, j]
            s = 0.0
            for j in range(n):
                e = math.exp(x[r, j] - m)
                out[r, j] = e
                s += e
            inv = 1.0 / s
            for j in range(n):
                out[r, j] *= inv

    @numba.njit(parallel=True, fastmath=False, cache=True)
    def _softmax_mid(x, out):  # pragma: no cover - compiled
        outer, n, inner = x.shape
        nblocks = (inner + _BLOCK - 1) // _BLOCK
        for task in prange(outer * nblocks):
            o = task // nblocks
            lo = (task % nblocks) * _BLOCK
            hi = min(lo + _BLOCK, inner)
            w = hi - lo
            m = np.empty(w, dtype=np.float32)
            s = np.zeros(w, dtype=np.float64)
            for c in range(w):
                m[c] = x[o, 0, lo + c]
            for j in range(1, n):
                for c in range(w):
                    if x[o, j, lo + c] > m[c]:
                        m[c] = x[o, j, lo + c]
            for j in range(n):
                for c in range(w):
                    e = math.exp(x[o, j, lo + c] - m[c])
                    out[o, j, lo + c] = e
                    s[c] += e
            for c in range(w):
                s[c] = 1.0 / s[c]
            for j in range(n):
                for c in range(w):
                    out[o, j, lo + c] *= s[c]

    @numba.njit(parallel=True, fastmath=False, cache=True)
    def _gelu_exact(x, out):  # pragma: no cover - compiled
        for i in prange(x.size):
            v = x[i]
            out[i] = 0.5 * v * (1.0 + math.erf(v * _SQRT_HALF))

    @numba.njit(parallel=True, fastmath=False, cache=True)
    def _gelu_tanh(x, out):  # pragma: no cover - compiled
        for i in prange(x.size):
            v = x[i]
            out[i] = 0.5 * v * (1.0 + math.tanh(_TANH_C * (v + 0.044715 * v * v * v)))

    @numba.njit(parallel=True, fastmath=False, cache=True)
    def _gelu_sigmoid(x, out):  # pragma: no cover - compiled
        for i in prange(x.size):
            v = x[i]
            out[i] = v / (1.0 + math.exp(-1.702 * v))

    @numba.njit(parallel=True, fastmath=False, cache=True)
    def _layer_norm_last(x, gamma, beta, eps, out):  # pragma: no cover - compiled
        rows, n = x.shape
        for r in prange(rows):
            s = 0.0
            for j in range(n):
                s += x[r, j]
            mean = s / n
            q = 0.0
            for j in range(n):
                d = x[r, j] - mean
                q += d * d
            inv = 1.0 / math.sqrt(q / n + eps)
            for j in range(n):
                out[r, j] = (x[r, j] - mean) * inv * gamma[j] + beta[j]


def _f32c(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Softmax along `axis` in one fused pass (max-subtracted, so it never overflows)."""
    x = np.asarray(x)
    axis = axis % x.ndim
    if HAVE_NUMBA and x.size >= _SMALL:
        x = _f32c(x)
        out = np.empty_like(x)
        n = x.shape[axis]
        outer = math.prod(x.shape[:axis])
        inner = math.prod(x.shape[axis + 1 :])
        if inner == 1:
            _softmax_last(x.reshape(outer, n), out.reshape(outer, n))
        else:
            _softmax_mid(x.reshape(outer, n, inner), out.reshape(outer, n, inner))
        return out
    out = x - np.max(x, axis=axis, keepdims=True)
    np.exp(out, out=out)
    out /= np.sum(out, axis=axis, keepdims=True)
    return out


def gelu(x: np.ndarray, mode: str) -> np.ndarray:
    """GELU in MIL's three modes (EXACT, TANH_APPROXIMATION, SIGMOID_APPROXIMATION)."""
    x = np.asarray(x)
    if HAVE_NUMBA and x.size >= _SMALL:
        x = _f32c(x)
        out = np.empty_like(x)
        kernel = {
            "EXACT": _gelu_exact,
            "TANH_APPROXIMATION": _gelu_tanh,
            "SIGMOID_APPROXIMATION": _gelu_sigmoid,
        }[mode]
        kernel(x.reshape(-1), out.reshape(-1))
        return out
    if mode == "EXACT":
        from scipy.special import erf

        return (0.5 * x * (1.0 + erf(x * np.float32(_SQRT_HALF)))).astype(x.dtype, copy=False)
    if mode == "TANH_APPROXIMATION":
        inner = np.float32(_TANH_C) * (x + np.float32(0.044715) * x * x * x)
        return 0.5 * x * (1.0 + np.tanh(inner))
    return x / (1.0 + np.exp(np.float32(-1.702) * x))


def layer_norm_last(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """Layer norm over the last axis; `gamma` and `beta` already have that axis' length."""
    x = np.asarray(x)
    n = x.shape[-1]
    if HAVE_NUMBA and x.size >= _SMALL:
        x = _f32c(x)
        out = np.empty_like(x)
        _layer_norm_last(
            x.reshape(-1, n), _f32c(gamma), _f32c(beta), float(eps), out.reshape(-1, n)
        )
        return out
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = np.mean(centered * centered, axis=-1, keepdims=True)
    centered /= np.sqrt(var + np.float32(eps))
    centered *= gamma
    centered += beta
    return centered
