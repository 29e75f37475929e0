"""Half-precision rounding with fp32 storage.

The interpreter keeps every float tensor in fp32 so numpy's BLAS does the
products (numpy's own fp16 matmul has no BLAS and is two orders slower); an
fp16 value is an fp32 array whose values are exactly representable in fp16.
Rounding through float16 also reproduces fp16 overflow (to +-inf) and
underflow (to subnormals or zero), which is what studying fp16 numerics needs.
"""

from __future__ import annotations

import numpy as np


def round_fp16(x: np.ndarray) -> np.ndarray:
    """`x` rounded to the nearest fp16 value, returned as fp32 (a new array)."""
    return np.asarray(x, dtype=np.float16).astype(np.float32)


def is_float(x: object) -> bool:
    """Whether a runtime value is a float tensor (or scalar) that fp16 rounding applies to."""
    return isinstance(x, (np.ndarray, np.floating)) and x.dtype.kind == "f"
