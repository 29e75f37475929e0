"""Half-precision rounding with fp32 storage.

The interpreter keeps every float tensor in fp32 so numpy's BLAS does the
products (numpy's own fp16 matmul has no BLAS and is two orders slower); an
fp16 value is an fp32 array whose values are exactly representable in fp16.
Rounding through float16 also reproduces fp16 overflow (to +-inf) and
underflow (to subnormals or zero), which is what studying fp16 numerics needs.
"""

from __future__ import annotations

import numpy as np

_MIN_NORMAL = np.float32(2.0**-14)
_MAX = np.float32(65504.0)
_HALF = np.float32(0.5)


def _slow(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow to +-inf is what fp16 does
        return np.asarray(x, dtype=np.float16).astype(np.float32)


def round_fp16(x: np.ndarray) -> np.ndarray:
    """`x` rounded to the nearest fp16 value, returned as fp32 (a new array).

    numpy's float16 conversions cost ~3 ms per direction on a 2.75 MB KV cache
    here, and far more on subnormals (a softmax output took 140 ms). Instead:
    rounding the fp32 bit pattern to 10 mantissa bits (round to nearest even) is
    exact in fp16's normal range; fp16 subnormals (|x| < 2^-14) are multiples
    of 2^-24, and adding then removing 0.5 (whose fp32 spacing is 2^-24) rounds
    them exactly. Overflowing values, rare, go through float16 itself.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size < 1024:
        return _slow(x)
    u = np.ascontiguousarray(x).view(np.uint32)
    r = u >> 13
    r &= 1
    r += 0x0FFF
    r += u
    r &= 0xFFFFE000
    a = np.abs(x)
    tiny = a < _MIN_NORMAL
    if tiny.any():
        sub = a + _HALF
        sub -= _HALF
        np.copysign(sub, x, out=sub)
        # Branch-free select of the subnormal results with bit masks (np.where with
        # a scattered mask measured 5x slower than these integer passes).
        mask = tiny.view(np.uint8).astype(np.uint32)
        np.negative(mask, out=mask)  # 0 or 0xFFFFFFFF
        bits = sub.view(np.uint32)
        bits ^= r
        bits &= mask
        r ^= bits
    out = r.view(np.float32).reshape(x.shape)
    huge = a > _MAX  # NaN compares False, and its bits stay NaN above
    if huge.any():
        out[huge] = _slow(x[huge])
    return out


def is_float(x: object) -> bool:
    """Whether a runtime value is a float tensor (or scalar) that fp16 rounding applies to."""
    return isinstance(x, (np.ndarray, np.floating)) and x.dtype.kind == "f"
