"""MIL building blocks shared by the encoder and decoder programs.

Every block works on channels-first activations, (B, C, 1, S) in the encoder
and (B, C, T) in the decoder, and takes float32 numpy weights in
openai-whisper's layout. Programs are built directly in their compute
precision (`compute_dtype`): fp16 packages get fp16 constants and cast their
fp32 inputs/outputs at the boundary, so ct.convert has no precision pass to run
(its fp16 pass was the slowest part of a build).

Apple's Neural Engine principles (apple/ml-ane-transformers) are applied where
the tensor is made so, each with a comment starting "ANE:".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var, types

from wruntime.weights.canonical import WhisperWeights

#: openai-whisper's LayerNorm epsilon (torch's default).
LN_EPS = 1e-5
#: Floor for a position's largest |x - mean| in layer norm (a normal fp16 number),
#: so a constant input cannot divide by zero.
_LN_FLOOR = 2.0**-10


_DTYPE: list[type] = [np.float32]


@contextlib.contextmanager
def compute_dtype(fp16: bool) -> Iterator[None]:
    """Build the ops inside in fp16 (or fp32): constants, scalars and boundary casts."""
    _DTYPE.append(np.float16 if fp16 else np.float32)
    try:
        yield
    finally:
        _DTYPE.pop()


def is_fp16() -> bool:
    return _DTYPE[-1] is np.float16


def wt(a: np.ndarray) -> np.ndarray:
    """A weight in the compute precision (refusing values fp16 cannot hold)."""
    out = np.ascontiguousarray(a, dtype=_DTYPE[-1])
    if is_fp16() and not np.isfinite(out).all():
        raise ValueError("a weight exceeds the fp16 range (65504); build this model in fp32")
    return out


def scalar(v: float) -> np.generic:
    return _DTYPE[-1](v)


def to_compute(x: Var) -> Var:
    """An fp32 input in the compute precision."""
    return mb.cast(x=x, dtype="fp16") if is_fp16() and x.dtype != types.fp16 else x


def as_dtype(x: Var, dtype: str) -> Var:
    """Cast only when needed ("fp16" / "fp32")."""
    want = types.fp16 if dtype == "fp16" else types.fp32
    return x if x.dtype == want else mb.cast(x=x, dtype=dtype)


def output(x: Var, name: str) -> Var:
    """A program output named as the interface says, always fp32."""
    if x.dtype == types.fp32:
        return mb.identity(x=x, name=name)
    return mb.cast(x=x, dtype="fp32", name=name)


def conv_weight(w: np.ndarray, rank: int) -> np.ndarray:
    """A (out, in) linear weight as a 1x1 convolution kernel for an input of this rank."""
    # ANE: a 1x1 convolution in place of a linear layer, so the activations
    # stay channels-first and no transpose is needed around any projection.
    return wt(w).reshape(w.shape + (1,) * (rank - 2))


def project(x: Var, weight: np.ndarray, bias: np.ndarray | None, name: str | None = None) -> Var:
    """x @ W.T + b on channels-first x: a 1x1 convolution over the channel axis."""
    kwargs = {"name": name} if name else {}
    b = None if bias is None else wt(bias)
    return mb.conv(x=x, weight=conv_weight(weight, x.rank), bias=b, **kwargs)


def layer_norm_c(x: Var, gamma: np.ndarray, beta: np.ndarray, eps: float = LN_EPS) -> Var:
    """Layer norm over the channel axis (axis 1) of a channels-first tensor, fp16-safe.

    ANE: normalise over the channel axis of (B, C, 1, S) in place, no transpose.
    Written out rather than `layer_norm(axes=[1])`, whose fp16 form has been
    seen to overflow on the Neural Engine, and rather than mean((x - mean)^2),
    which fails both ways in fp16 on Whisper: the encoder's residual stream
    holds values near 600 whose squares overflow (max 65504), and the
    decoder's first layer norm sees a variance near 3e-4 whose terms are
    subnormal. So each position is first divided by its largest |x - mean|:
    the squares lie in [0, 1], their mean in [1/C, 1], all comfortably normal.
    ANE: fp16-safe epsilon. eps enters as (sqrt(eps) / max|x - mean|)^2, built
    from the normal fp16 number sqrt(1e-5); the constant 1e-5 itself would be
    subnormal in fp16 and may be flushed to zero.
    Exact algebra: (x - m) / sqrt(var + eps) = z / sqrt(mean(z^2) + eps / s^2)
    with z = (x - m) / s.
    """
    channels = int(x.shape[1])
    shape = (1, channels) + (1,) * (x.rank - 2)
    mean = mb.reduce_mean(x=x, axes=[1], keep_dims=True)
    centred = mb.sub(x=x, y=mean)
    peak = mb.reduce_max(x=mb.abs(x=centred), axes=[1], keep_dims=True)
    peak = mb.maximum(x=peak, y=scalar(_LN_FLOOR))
    z = mb.real_div(x=centred, y=peak)
    var_z = mb.reduce_mean(x=mb.mul(x=z, y=z), axes=[1], keep_dims=True)
    eps_z = mb.real_div(x=scalar(np.sqrt(eps)), y=peak)
    inv_std = mb.rsqrt(x=mb.add(x=var_z, y=mb.mul(x=eps_z, y=eps_z)), epsilon=scalar(0.0))
    normed = mb.mul(x=z, y=inv_std)
    return mb.add(x=mb.mul(x=normed, y=wt(gamma).reshape(shape)), y=wt(beta).reshape(shape))


def mlp(x: Var, w: WhisperWeights, prefix: str) -> Var:
    """Whisper's feed-forward block (Linear, exact GELU, Linear) as 1x1 convolutions."""
    h = project(x, w[f"{prefix}.0.weight"], w[f"{prefix}.0.bias"])
    h = mb.gelu(x=h, mode="EXACT")
    return project(h, w[f"{prefix}.2.weight"], w[f"{prefix}.2.bias"])


def query_projection(w: WhisperWeights, prefix: str, n_head: int) -> tuple[np.ndarray, np.ndarray]:
    """The query weight and bias with the attention scale d^-0.5 folded in.

    openai-whisper scales q and k by d^-0.25 each; folding the whole scale into
    the query keeps the keys raw (the interface's cross_k / k_new are raw key
    projections) and removes a multiply per attention.
    """
    weight = w[f"{prefix}.query.weight"]
    scale = np.float32((weight.shape[0] // n_head) ** -0.5)
    return weight * scale, w[f"{prefix}.query.bias"] * scale


def split_heads_attention(q: Var, k: Var, v: Var, n_head: int) -> Var:
    """Unmasked multi-head attention on (1, C, 1, S) tensors, one head at a time.

    The query is already scaled (see `query_projection`).
    """
    # ANE: split the attention per head, so the largest intermediate is one
    # head's (1, S, 1, S) score map rather than all heads' (H, S, S) at once,
    # and every product is the ANE-friendly einsum "nchw,nwhu->nchu" on
    # channels-first tensors (no reshape between (B, C, 1, S) layouts).
    k_t = mb.transpose(x=k, perm=[0, 3, 2, 1])  # (1, S_k, 1, C): keys on axis 1
    qs = mb.split(x=q, num_splits=n_head, axis=1)
    ks = mb.split(x=k_t, num_splits=n_head, axis=3)
    vs = mb.split(x=v, num_splits=n_head, axis=1)
    heads = []
    for q_h, k_h, v_h in zip(qs, ks, vs, strict=True):
        # scores[0, key, 0, query] = sum_d k[d, key] q[d, query]
        scores = mb.einsum(values=(k_h, q_h), equation="nchw,nwhu->nchu")
        weights = mb.softmax(x=scores, axis=1)
        # out[0, d, 0, query] = sum_key v[d, key] weights[key, query]
        heads.append(mb.einsum(values=(v_h, weights), equation="nchw,nwhu->nchu"))
    return mb.concat(values=heads, axis=1)


def dynamic_shape(parts: Sequence[Var | Sequence[int]]) -> Var:
    """A shape tensor from runtime dimensions (int32 (1,) vars) and constant ones.

    The decoder's batch and token counts are flexible, and coremltools' type
    inference mishandles 0 ("keep this dimension") in reshape with symbolic
    dimensions, so reshapes there take their shape from the input at runtime.
    """
    values = [p if isinstance(p, Var) else np.asarray(p, dtype=np.int32) for p in parts]
    return mb.concat(values=values, axis=0)


def dim(shape: Var, axis: int) -> Var:
    """One dimension of a runtime shape tensor, as an int32 (1,) tensor."""
    return mb.slice_by_size(x=shape, begin=[axis], size=[1])
