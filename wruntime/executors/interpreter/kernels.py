"""One numpy kernel per MIL op, prepared once at plan time.

A kernel builder gets the op (through `Args`) while the program is planned and
returns `(fn, vars)`: `fn(*values)` computes the op's output(s) from the runtime
values of `vars`. Attributes that MIL requires to be constant (axes, modes,
permutations, dtypes) are read and checked here, once, so a run never looks
anything up by name and never discovers an unsupported form halfway through.
Semantics follow coremltools' op definitions (mil/ops/defs/iOS15..iOS18).

Float tensors are fp32 throughout; fp16 values are fp32 arrays holding
fp16-exact values (see fp16.py). Integer tensors are int32, as in MIL.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from wruntime.errors import ExecutorError
from wruntime.executors.interpreter import fast, threads
from wruntime.executors.interpreter.fp16 import round_fp16

Kernel = tuple[Callable[..., Any], list[Any]]
_MISSING = object()


class Args:
    """Plan-time access to an op's inputs: constants by value, the rest as Vars."""

    def __init__(
        self,
        op: Any,
        known: Callable[[Any], Any],
        function: str,
        fp16_exact: Callable[[Any], bool] = lambda var: False,
    ) -> None:
        self.op = op
        self._known = known
        self._function = function
        self._fp16_exact = fp16_exact

    def fp16_exact(self, name: str) -> bool:
        """Whether input `name` is known at plan time to hold only fp16 values."""
        v = self.op.inputs.get(name)
        return v is not None and self._fp16_exact(v)

    def fail(self, why: str) -> ExecutorError:
        return ExecutorError(
            f"op '{self.op.op_type}' (named '{self.op.name}', in function {self._function}) {why}"
        )

    def has(self, name: str) -> bool:
        return self.op.inputs.get(name) is not None

    def var(self, name: str) -> Any:
        v = self.op.inputs.get(name)
        if v is None:
            raise self.fail(f"has no input '{name}'")
        return v

    def vars(self, name: str) -> list[Any]:
        v = self.var(name)
        return list(v) if isinstance(v, (list, tuple)) else [v]

    def const(self, name: str, default: Any = _MISSING) -> Any:
        """The plan-time value of an input; `default` if absent; error if not constant."""
        v = self.op.inputs.get(name)
        if v is None:
            if default is _MISSING:
                raise self.fail(f"has no input '{name}'")
            return default
        value = self._known(v)
        if value is None:
            raise self.fail(f"needs a constant '{name}', which is computed at run time here")
        return value

    def maybe_const(self, name: str) -> Any:
        """The plan-time value of an input, or None if it is absent or computed at run time."""
        v = self.op.inputs.get(name)
        return None if v is None else self._known(v)

    def const_list(self, name: str, default: Any = _MISSING) -> Any:
        value = self.const(name, default)
        if value is None or value is default:
            return value
        return (
            [int(i) for i in np.asarray(value).reshape(-1)]
            if np.asarray(value).dtype.kind in "iub"
            else list(np.asarray(value).reshape(-1))
        )

    def out_dtype(self, i: int = 0) -> Any:
        return self.op.outputs[i].dtype


KERNELS: dict[str, Callable[[Args], Kernel]] = {}


def kernel(*names: str) -> Callable[[Callable[[Args], Kernel]], Callable[[Args], Kernel]]:
    def register(builder: Callable[[Args], Kernel]) -> Callable[[Args], Kernel]:
        for name in names:
            KERNELS[name] = builder
        return builder

    return register


def _axis(axis: Any) -> int:
    return int(np.asarray(axis).reshape(()))


# --- element-wise -----------------------------------------------------------------

_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "pow": np.power,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "floor_div": np.floor_divide,
    "mod": np.mod,
    "equal": np.equal,
    "not_equal": np.not_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}


def _binary(a: Args) -> Kernel:
    return _BINARY[a.op.op_type], [a.var("x"), a.var("y")]


for _name in _BINARY:
    KERNELS[_name] = _binary


@kernel("real_div")
def _real_div(a: Args) -> Kernel:
    def real_div(x: Any, y: Any) -> Any:
        out = np.true_divide(x, y)
        if np.asarray(x).dtype.kind in "iu" and np.asarray(y).dtype.kind in "iu":
            return out.astype(np.int32)
        return out.astype(np.float32, copy=False)

    return real_div, [a.var("x"), a.var("y")]


def _sigmoid(x: Any) -> Any:
    return 1.0 / (1.0 + np.exp(-x))


def _erf(x: Any) -> Any:
    return fast.erf(x)


_UNARY: dict[str, Callable[[Any], Any]] = {
    "abs": np.abs,
    "acos": np.arccos,
    "asin": np.arcsin,
    "atan": np.arctan,
    "atanh": np.arctanh,
    "ceil": np.ceil,
    "cos": np.cos,
    "cosh": np.cosh,
    "erf": _erf,
    "exp": np.exp,
    "exp2": np.exp2,
    "floor": np.floor,
    "round": np.round,
    "sign": np.sign,
    "sin": np.sin,
    "sinh": np.sinh,
    "sqrt": np.sqrt,
    "square": np.square,
    "tan": np.tan,
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, np.zeros((), x.dtype)),
    "relu6": lambda x: np.clip(x, 0, 6).astype(x.dtype, copy=False),
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "softplus": lambda x: np.logaddexp(x, np.zeros((), x.dtype)),
    "softsign": lambda x: x / (1.0 + np.abs(x)),
    "logical_not": np.logical_not,
}


def _unary(a: Args) -> Kernel:
    return _UNARY[a.op.op_type], [a.var("x")]


for _name in _UNARY:
    KERNELS[_name] = _unary


@kernel("rsqrt", "inverse", "log")
def _with_epsilon(a: Args) -> Kernel:
    default = {"rsqrt": 1e-12, "inverse": 1e-4, "log": 1e-45}[a.op.op_type]
    eps = np.float32(a.const("epsilon", default))
    kind = a.op.op_type
    if kind == "rsqrt":
        return (lambda x: 1.0 / np.sqrt(x + eps)), [a.var("x")]
    if kind == "inverse":
        return (lambda x: 1.0 / (x + eps)), [a.var("x")]
    return (lambda x: np.log(x + eps)), [a.var("x")]


@kernel("clip")
def _clip(a: Args) -> Kernel:
    return (lambda x, lo, hi: np.minimum(np.maximum(x, lo), hi)), [
        a.var("x"),
        a.var("alpha"),
        a.var("beta"),
    ]


@kernel("threshold")
def _threshold(a: Args) -> Kernel:
    return (lambda x, alpha: np.maximum(x, alpha)), [a.var("x"), a.var("alpha")]


@kernel("leaky_relu")
def _leaky_relu(a: Args) -> Kernel:
    alpha = np.float32(a.const("alpha", 0.01))
    return (lambda x: np.where(x >= 0, x, alpha * x)), [a.var("x")]


@kernel("elu")
def _elu(a: Args) -> Kernel:
    alpha = np.float32(a.const("alpha", 1.0))
    return (lambda x: np.where(x > 0, x, alpha * (np.exp(x) - 1.0))), [a.var("x")]


@kernel("gelu")
def _gelu(a: Args) -> Kernel:
    mode = str(a.const("mode", "EXACT"))
    if mode not in ("EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION"):
        raise a.fail(f"has mode {mode!r}, which the interpreter does not know")
    return (lambda x: fast.gelu(x, mode)), [a.var("x")]


@kernel("softmax")
def _softmax(a: Args) -> Kernel:
    axis = _axis(a.const("axis", -1))
    return (lambda x: fast.softmax(x, axis)), [a.var("x")]


@kernel("select")
def _select(a: Args) -> Kernel:
    return np.where, [a.var("cond"), a.var("a"), a.var("b")]


@kernel("identity")
def _identity(a: Args) -> Kernel:
    return (lambda x: x), [a.var("x")]


_CAST = {
    "fp32": np.float32,
    "fp64": np.float32,
    "int32": np.int32,
    "int64": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "bool": np.bool_,
}


@kernel("cast")
def _cast(a: Args) -> Kernel:
    dtype = str(a.const("dtype"))
    if dtype == "fp16":
        return (lambda x: round_fp16(x)), [a.var("x")]
    if dtype not in _CAST:
        raise a.fail(f"casts to {dtype!r}, which the interpreter does not know")
    target = _CAST[dtype]
    return (lambda x: np.asarray(x).astype(target, copy=False)), [a.var("x")]


# --- reductions --------------------------------------------------------------------


def _reduce_axes(a: Args) -> tuple[int, ...] | None:
    axes = a.const("axes", None)
    if axes is None:
        return None
    return tuple(int(i) for i in np.asarray(axes).reshape(-1))


def _mean(x: Any, axis: Any, keepdims: bool) -> Any:
    """np.mean's own arithmetic (np.add.reduce, then a true divide by the count)
    without its Python-level argument handling: ~3x faster on a decoder step's
    384 values, where that handling is most of the time."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        return np.mean(x, axis=axis, keepdims=keepdims)
    total = np.add.reduce(x, axis=axis, keepdims=keepdims)
    count = x.size if axis is None else math.prod(x.shape[i] for i in axis)
    return np.true_divide(total, count)


def _log_sum_exp(x: Any, axis: Any, keepdims: bool) -> Any:
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


_REDUCE: dict[str, Callable[..., Any]] = {
    "reduce_mean": _mean,
    "reduce_sum": np.sum,
    "reduce_max": np.max,
    "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(
        np.sum(x * x, axis=axis, keepdims=keepdims)
    ),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": _log_sum_exp,
}


#: Reductions whose numpy function is just this ufunc's reduce (np.sum, np.max and
#: np.min add only argument handling, a few us a call on a decoder step's vectors).
_REDUCE_UFUNC = {"reduce_sum": np.add, "reduce_max": np.maximum, "reduce_min": np.minimum}


def _reduce(a: Args) -> Kernel:
    fn = _REDUCE[a.op.op_type]
    ufunc = _REDUCE_UFUNC.get(a.op.op_type)
    axes = _reduce_axes(a)
    keep = bool(a.const("keep_dims", False))

    def reduce(x: Any) -> Any:
        axis = None if axes is None else tuple(i % x.ndim for i in axes)
        if ufunc is not None and x.dtype.kind == "f":
            return np.asarray(ufunc.reduce(x, axis=axis, keepdims=keep))
        return np.asarray(fn(x, axis=axis, keepdims=keep))

    return reduce, [a.var("x")]


for _name in _REDUCE:
    KERNELS[_name] = _reduce


@kernel("reduce_argmax", "reduce_argmin")
def _reduce_arg(a: Args) -> Kernel:
    fn = np.argmax if a.op.op_type == "reduce_argmax" else np.argmin
    axis = _axis(a.const("axis", -1))
    keep = bool(a.const("keep_dims", False))
    return (lambda x: fn(x, axis=axis, keepdims=keep).astype(np.int32)), [a.var("x")]


# --- normalisation -----------------------------------------------------------------


@kernel("layer_norm")
def _layer_norm(a: Args) -> Kernel:
    axes = _reduce_axes(a)
    eps = float(a.const("epsilon", 1e-5))
    gamma = a.const("gamma", None)
    beta = a.const("beta", None)
    rank = a.var("x").rank

    if axes is not None and len(axes) == 1 and axes[0] % rank == rank - 1:
        n = a.var("x").shape[-1]
        if not isinstance(n, (int, np.integer)):
            n = None

        def layer_norm_last(x: Any) -> Any:
            g = np.ones(x.shape[-1], np.float32) if gamma is None else gamma
            b = np.zeros(x.shape[-1], np.float32) if beta is None else beta
            return fast.layer_norm_last(x, g, b, eps)

        return layer_norm_last, [a.var("x")]

    def layer_norm(x: Any) -> Any:
        axis = tuple(range(x.ndim)) if axes is None else tuple(i % x.ndim for i in axes)
        mean = x.mean(axis=axis, keepdims=True)
        centered = x - mean
        var = np.mean(centered * centered, axis=axis, keepdims=True)
        out = centered / np.sqrt(var + np.float32(eps))
        # gamma/beta have the shape of the normalised axes, which MIL requires to be the
        # trailing ones, so plain broadcasting lines them up.
        if gamma is not None:
            out = out * gamma
        if beta is not None:
            out = out + beta
        return out

    return layer_norm, [a.var("x")]


@kernel("batch_norm")
def _batch_norm(a: Args) -> Kernel:
    eps = np.float32(a.const("epsilon", 1e-5))
    mean = np.asarray(a.const("mean"), np.float32)
    var = np.asarray(a.const("variance"), np.float32)
    gamma = np.asarray(a.const("gamma", np.ones_like(mean)), np.float32)
    beta = np.asarray(a.const("beta", np.zeros_like(mean)), np.float32)
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale

    def batch_norm(x: Any) -> Any:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)

    return batch_norm, [a.var("x")]


# --- products ----------------------------------------------------------------------


class _VectorWeight:
    """A product's weight, copied once into the layout its vector products stream fastest.

    A decoder step multiplies a few vectors by every weight: memory bound, and
    OpenBLAS's speed there depends on the layout. With more outputs than inputs a
    C-contiguous (in, out) matrix streams fastest (the 51864 x 384 vocabulary
    projection: 4.0 ms for one token against 11 ms through the transposed view
    of the stored (out, in) one; 1152 x 384: 105 us against 180 us); with more
    inputs than outputs the (out, in) one does (384 x 1536: 150 us against
    195 us). Large products are unaffected: GEMM packs either layout, so they
    use a view of the same copy.
    """

    def __init__(self, pieces: Sequence[np.ndarray]) -> None:
        """`pieces`: (out_i, in) weights, stacked along out (one copy, no temporaries)."""
        nin = pieces[0].shape[1]
        nout = sum(p.shape[0] for p in pieces)
        self.by_out = nin > nout
        if self.by_out:
            self.w = np.concatenate(pieces, axis=0, dtype=np.float32)
        else:
            self.w = np.empty((nin, nout), np.float32)
            start = 0
            for p in pieces:
                self.w[:, start : start + p.shape[0]] = p.T
                start += p.shape[0]
        #: (in, out) and (out, in) views of the one copy.
        self.in_out = self.w.T if self.by_out else self.w
        self.out_in = self.w if self.by_out else self.w.T

    def rows(self, x2: np.ndarray, out2: np.ndarray) -> None:
        """out2 = x2 @ (in, out) for a few rows, row by row: the weight, read once
        from memory, stays in cache for the other rows (GEMM pads a few rows to
        its kernel height: 5 rows by 1152 x 384 took 0.27 ms against 0.19 ms)."""
        threads.for_product(0)
        if self.by_out:
            for r in range(x2.shape[0]):
                np.matmul(self.w, x2[r], out=out2[r])
        else:
            for r in range(x2.shape[0]):
                np.matmul(x2[r], self.w, out=out2[r])


#: A product with at most this many rows is a few vector-matrix products.
FEW_ROWS = 16
#: Weights of at least this many bytes are multiplied in column blocks (see
#: fast.BlockedWeight); smaller ones fit in cache whole.
BLOCKED_BYTES = 4 << 20


def linear_kernel(
    weights: Sequence[np.ndarray], bias: np.ndarray | None, lazy: bool = False
) -> Callable[[Any], Any]:
    """`x @ weight.T + bias` over the last axis of x, for (out_i, in) weights stacked on out.

    plan.py fuses linears of one input into one (see plan._fuse_linear_concat) and
    drops their own kernels: those are built `lazy`, so a weight is copied into its
    product layout only by the kernel that runs (the vocabulary projection: 80 MB).
    """
    nin = weights[0].shape[1]
    nout = sum(w.shape[0] for w in weights)
    bias = None if bias is None or not np.any(bias) else np.asarray(bias, np.float32)
    vw: _VectorWeight | None = None
    blocked: fast.BlockedWeight | None = None

    def prepare() -> _VectorWeight:
        nonlocal vw, blocked
        made = _VectorWeight(weights)
        if made.w.nbytes >= BLOCKED_BYTES and not made.by_out:
            blocked = fast.BlockedWeight(made.w)
        vw = made
        return made

    if not lazy:
        prepare()

    def linear(x: Any) -> Any:
        vw_ = vw if vw is not None else prepare()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, nin)
        out = np.empty((*lead, nout), np.float32)  # owned by the result: never copied again
        out2 = out.reshape(-1, nout)
        rows = x2.shape[0]
        if blocked is not None:
            fast.blocked_product(x2, blocked, out2, FEW_ROWS)
        elif rows <= FEW_ROWS:
            vw_.rows(x2, out2)
        else:
            threads.for_product(x.size * nout)
            np.matmul(x2, vw_.in_out, out=out2)
        if bias is not None:
            out2 += bias
        return out

    return linear


@kernel("linear")
def _linear(a: Args) -> Kernel:
    weight = np.asarray(a.const("weight"), np.float32)
    return linear_kernel([weight], a.const("bias", None), lazy=True), [a.var("x")]


@kernel("matmul")
def _matmul(a: Args) -> Kernel:
    tx = bool(a.const("transpose_x", False))
    ty = bool(a.const("transpose_y", False))

    def matmul(x: Any, y: Any) -> Any:
        if tx and x.ndim >= 2:
            x = np.swapaxes(x, -1, -2)
        if ty and y.ndim >= 2:
            y = np.swapaxes(y, -1, -2)
        if x.ndim >= 2 and y.ndim >= 2:
            threads.for_product(max(x.size * y.shape[-1], y.size * x.shape[-2]))
        return np.matmul(x, y)

    return matmul, [a.var("x"), a.var("y")]


def _einsum_as_matmul(equation: str) -> Callable[[Any, Any], Any] | None:
    """Plan a two-operand einsum as one batched matmul, or None if it has another form.

    np.einsum does not use BLAS for batched contractions; a permutation into
    (batch, free, contracted) order and one np.matmul does.
    """
    eq = equation.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        return None
    xa, xb = ops
    if len(set(xa)) != len(xa) or len(set(xb)) != len(xb) or len(set(out)) != len(out):
        return None
    if any(c not in xa and c not in xb for c in out):
        return None
    batch = [c for c in out if c in xa and c in xb]
    free_a = [c for c in out if c in xa and c not in xb]
    free_b = [c for c in out if c in xb and c not in xa]
    contract = [c for c in xa if c in xb and c not in out]
    if any(c not in out and c not in contract for c in xa + xb):
        return None  # an index summed inside one operand only
    perm_a = [xa.index(c) for c in batch + free_a + contract]
    perm_b = [xb.index(c) for c in batch + contract + free_b]
    res_labels = batch + free_a + free_b
    perm_out = [res_labels.index(c) for c in out]
    identity_out = perm_out == list(range(len(out)))
    nb, nfa, nfb = len(batch), len(free_a), len(free_b)

    def einsum(x: Any, y: Any) -> Any:
        ta = np.transpose(x, perm_a)
        tb = np.transpose(y, perm_b)
        bshape = ta.shape[:nb]
        if tb.shape[:nb] != bshape:
            return np.einsum(equation, x, y)
        fa = ta.shape[nb : nb + nfa]
        fb = tb.shape[tb.ndim - nfb :] if nfb else ()
        k = math.prod(ta.shape[nb + nfa :])
        m = math.prod(fa)
        n = math.prod(fb)
        threads.for_product(math.prod(bshape) * m * k * n)
        res = np.matmul(ta.reshape((*bshape, m, k)), tb.reshape((*bshape, k, n)))
        res = res.reshape((*bshape, *fa, *fb))
        return res if identity_out else np.transpose(res, perm_out)

    return einsum


@kernel("einsum")
def _einsum(a: Args) -> Kernel:
    equation = str(a.const("equation"))
    values = a.vars("values")
    fn = _einsum_as_matmul(equation) if len(values) == 2 else None
    if fn is None:
        return (lambda *xs: np.einsum(equation, *xs)), values
    return fn, values


def _conv_pads(
    pad_type: str,
    pad: Sequence[int],
    size: Sequence[int],
    kernel_eff: Sequence[int],
    strides: Sequence[int],
) -> list[tuple[int, int]]:
    if pad_type == "valid":
        return [(0, 0)] * len(size)
    if pad_type == "custom":
        return [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(len(size))]
    pads = []
    for n, k, s in zip(size, kernel_eff, strides, strict=True):
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        small = total // 2
        pads.append((small, total - small) if pad_type == "same" else (total - small, small))
    return pads


#: A pointwise conv over at most this many positions (batch x length) runs as
#: vector-matrix products over its transposed weight.
FEW_POSITIONS = FEW_ROWS


@kernel("conv")
def _conv(a: Args) -> Kernel:
    weight = np.asarray(a.const("weight"), np.float32)
    bias = a.const("bias", None)
    nsp = weight.ndim - 2
    strides = a.const_list("strides", None) or [1] * nsp
    dilations = a.const_list("dilations", None) or [1] * nsp
    pad_type = str(a.const("pad_type", "valid"))
    pad = a.const_list("pad", None) or [0] * (2 * nsp)
    groups = int(a.const("groups", 1))
    if pad_type not in ("valid", "same", "same_lower", "custom"):
        raise a.fail(f"has pad_type {pad_type!r}, which the interpreter does not know")
    cout = weight.shape[0]
    cin_g = weight.shape[1]
    ksize = weight.shape[2:]
    keff = [(k - 1) * d + 1 for k, d in zip(ksize, dilations, strict=True)]
    # A pointwise conv over a few positions (a decoder step) is a few
    # vector-matrix products (see _VectorWeight); other convs use a view of the
    # same copy. An input whose shape is fixed at more positions (the encoder's)
    # keeps the stored layout, which its GEMMs measured a few % faster with.
    xshape = a.var("x").shape
    fixed = all(isinstance(d, (int, np.integer)) for d in xshape)
    many = fixed and xshape[0] * math.prod(xshape[2:]) > FEW_POSITIONS
    if groups == 1 and not many:
        vw: _VectorWeight | None = _VectorWeight([weight.reshape(cout, -1)])
        wmat = vw.out_in[None]
    else:
        vw = None
        wmat = np.ascontiguousarray(weight.reshape(groups, cout // groups, -1))
    bias_col = None if bias is None else np.asarray(bias, np.float32).reshape(cout, 1)
    pointwise = all(k == 1 for k in ksize) and all(s == 1 for s in strides)
    # A pointwise conv pads nothing whatever the size, unless told to ("same" of a
    # 1-wide kernel is no padding).
    never_pads = pointwise and (pad_type != "custom" or not any(pad))
    bias_row = None if bias_col is None else bias_col.reshape(cout)
    strides_prod = math.prod(strides)
    sp_axes = tuple(range(2, 2 + nsp))

    def few_positions(x: Any, n: int, positions: int) -> Any:
        """The decoder-step case, with as little numpy around the products as possible."""
        out = np.empty((n, positions, cout), np.float32)
        if positions == 1:  # (n, cin, 1...) is already (n, cin) in memory
            vw.rows(x.reshape(n, cin_g), out.reshape(n, cout))
            if bias_row is not None:
                out += bias_row
            return out.reshape(n, cout, *x.shape[2:])
        xt = np.swapaxes(x.reshape(n, cin_g, positions), 1, 2).reshape(-1, cin_g)
        vw.rows(xt, out.reshape(-1, cout))
        if bias_row is not None:
            out += bias_row
        return np.ascontiguousarray(np.swapaxes(out, 1, 2)).reshape(n, cout, *x.shape[2:])

    def conv(x: Any) -> Any:
        n = x.shape[0]
        if vw is not None and never_pads and x.size:
            positions = x.size // (n * cin_g)
            if n * positions <= FEW_POSITIONS:
                return few_positions(x, n, positions)
        size = x.shape[2:]
        threads.for_product(x.size // max(x.shape[1], 1) * weight.size // max(strides_prod, 1))
        pads = _conv_pads(pad_type, pad, size, keff, strides)
        if pointwise and not any(p for pp in pads for p in pp):
            out_size = size
            out = np.matmul(wmat, x.reshape(n, groups, cin_g, -1))
        else:
            if any(p for pp in pads for p in pp):
                x = np.pad(x, [(0, 0), (0, 0), *pads])
            win = np.lib.stride_tricks.sliding_window_view(x, keff, axis=sp_axes)
            idx = (slice(None), slice(None))
            idx += tuple(slice(None, None, s) for s in strides)
            idx += tuple(slice(None, None, d) for d in dilations)
            win = win[idx]  # (n, cin, *out_size, *ksize)
            out_size = win.shape[2 : 2 + nsp]
            win = win.reshape(n, groups, cin_g, *out_size, *ksize)
            order = (0, 1, 2, *range(3 + nsp, 3 + 2 * nsp), *range(3, 3 + nsp))
            cols = np.transpose(win, order).reshape(n, groups, cin_g * math.prod(ksize), -1)
            out = np.matmul(wmat, cols)
        out = out.reshape(n, cout, -1)
        if bias_col is not None:
            out += bias_col
        return out.reshape(n, cout, *out_size)

    return conv, [a.var("x")]


@kernel("scaled_dot_product_attention")
def _sdpa(a: Args) -> Kernel:
    has_mask = a.has("attn_mask")

    def sdpa(q: Any, k: Any, v: Any, mask: Any = None) -> Any:
        threads.for_product(q.size * k.shape[-2])
        scores = np.matmul(q, np.swapaxes(k, -1, -2))
        scores *= np.float32(1.0 / math.sqrt(q.shape[-1]))
        if mask is not None:
            if mask.dtype == np.bool_:
                scores = np.where(mask, scores, np.float32(-np.inf))
            else:
                scores = scores + mask
        return np.matmul(fast.softmax(scores, -1), v)

    inputs = [a.var("query"), a.var("key"), a.var("value")]
    return sdpa, [*inputs, a.var("attn_mask")] if has_mask else inputs


# --- shapes and layout -------------------------------------------------------------


@kernel("reshape")
def _reshape(a: Args) -> Kernel:
    def reshape(x: Any, shape: Any) -> Any:
        shape = np.asarray(shape).reshape(-1).tolist()
        if 0 in shape and len(shape) == x.ndim:
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return np.reshape(x, shape)

    return reshape, [a.var("x"), a.var("shape")]


@kernel("transpose")
def _transpose(a: Args) -> Kernel:
    perm = a.const_list("perm")
    return (lambda x: np.transpose(x, perm)), [a.var("x")]


@kernel("expand_dims")
def _expand_dims(a: Args) -> Kernel:
    axes = tuple(a.const_list("axes"))
    return (lambda x: np.expand_dims(x, axes)), [a.var("x")]


@kernel("squeeze")
def _squeeze(a: Args) -> Kernel:
    axes = a.const_list("axes", None)
    if axes is None:
        return np.squeeze, [a.var("x")]
    axes_t = tuple(axes)
    return (lambda x: np.squeeze(x, axis=axes_t)), [a.var("x")]


@kernel("shape")
def _shape(a: Args) -> Kernel:
    return (lambda x: np.array(np.shape(x), dtype=np.int32)), [a.var("x")]


@kernel("concat")
def _concat(a: Args) -> Kernel:
    axis = _axis(a.const("axis"))
    interleave = bool(a.const("interleave", False))
    values = a.vars("values")
    if not interleave:
        return (lambda *xs: np.concatenate(xs, axis=axis)), values

    def concat_interleave(*xs: Any) -> Any:
        ax = axis % xs[0].ndim
        stacked = np.stack(xs, axis=ax + 1)
        shape = list(xs[0].shape)
        shape[ax] *= len(xs)
        return stacked.reshape(shape)

    return concat_interleave, values


@kernel("stack")
def _stack(a: Args) -> Kernel:
    axis = _axis(a.const("axis"))
    return (lambda *xs: np.stack(xs, axis=axis)), a.vars("values")


@kernel("split")
def _split(a: Args) -> Kernel:
    axis = _axis(a.const("axis"))
    sizes = a.const_list("split_sizes", None)
    nsplits = len(a.op.outputs)

    def split(x: Any) -> tuple[Any, ...]:
        # Views by slicing (np.split's own bookkeeping cost more than the views here).
        ax = axis % x.ndim
        n = x.shape[ax]
        if sizes is None:
            if n % nsplits:
                raise ValueError(f"{n} values do not split into {nsplits} equal parts")
            bounds = list(range(0, n + 1, n // nsplits))
        else:
            bounds = [0, *np.cumsum(sizes).tolist()]
        lead = (slice(None),) * ax
        return tuple(x[(*lead, slice(a, b))] for a, b in itertools.pairwise(bounds))

    return split, [a.var("x")]


def _index(begin: Any, end: Any, stride: Any, bmask: Any, emask: Any, smask: Any) -> tuple:
    idx = []
    for i in range(len(begin)):
        if smask is not None and smask[i]:
            idx.append(int(begin[i]))
            continue
        b = None if bmask is not None and bmask[i] else int(begin[i])
        e = None if emask is not None and emask[i] else int(end[i])
        s = 1 if stride is None else int(stride[i])
        idx.append(slice(b, e, s))
    return tuple(idx)


def _slice_masks(a: Args) -> tuple[Any, Any, Any, Any]:
    stride = a.const_list("stride", None)
    bmask = a.const_list("begin_mask", None)
    emask = a.const_list("end_mask", None)
    smask = a.const_list("squeeze_mask", None)
    return stride, bmask, emask, smask


@kernel("slice_by_index")
def _slice_by_index(a: Args) -> Kernel:
    stride, bmask, emask, smask = _slice_masks(a)

    begin_c, end_c = a.maybe_const("begin"), a.maybe_const("end")
    fixed = (
        None
        if begin_c is None or end_c is None
        else _index(
            np.asarray(begin_c).reshape(-1),
            np.asarray(end_c).reshape(-1),
            stride,
            bmask,
            emask,
            smask,
        )
    )

    def slice_by_index(x: Any, begin: Any, end: Any) -> Any:
        idx = fixed if fixed is not None else _index(begin, end, stride, bmask, emask, smask)
        return np.asarray(x[idx])

    return slice_by_index, [a.var("x"), a.var("begin"), a.var("end")]


@kernel("slice_by_size")
def _slice_by_size(a: Args) -> Kernel:
    def slice_by_size(x: Any, begin: Any, size: Any) -> Any:
        idx = []
        for i in range(x.ndim):
            b = int(begin[i]) % x.shape[i] if x.shape[i] else 0
            s = int(size[i])
            idx.append(slice(b, None if s == -1 else b + s))
        return x[tuple(idx)]

    return slice_by_size, [a.var("x"), a.var("begin"), a.var("size")]


@kernel("slice_update")
def _slice_update(a: Args) -> Kernel:
    stride, bmask, emask, smask = _slice_masks(a)

    def slice_update(x: Any, update: Any, begin: Any, end: Any) -> Any:
        out = np.array(x, copy=True)
        idx = _index(begin, end, stride, bmask, emask, smask)
        target = out[idx]
        out[idx] = np.reshape(update, np.shape(target))
        return out

    return slice_update, [a.var("x"), a.var("update"), a.var("begin"), a.var("end")]


@kernel("gather")
def _gather(a: Args) -> Kernel:
    axis = _axis(a.const("axis", 0))
    batch_dims = int(a.const("batch_dims", 0))
    if batch_dims != 0:
        raise a.fail("uses batch_dims, which the interpreter does not support")

    def gather(x: Any, idx: Any) -> Any:
        idx = np.asarray(idx)
        # The stateful decoder gathers its whole cache by beam_order every step; in
        # order (no beam reordering) that is the cache itself, and kernels never
        # write into their inputs, so no copy is needed.
        n = idx.shape[0] if idx.ndim == 1 else -1
        if 0 < n <= 64 and n == np.shape(x)[axis] and np.array_equal(idx, np.arange(n)):
            return x
        return np.take(x, idx.astype(np.intp), axis=axis)

    return gather, [a.var("x"), a.var("indices")]


@kernel("gather_along_axis")
def _gather_along_axis(a: Args) -> Kernel:
    axis = _axis(a.const("axis", 0))

    def gather_along_axis(x: Any, idx: Any) -> Any:
        idx = np.asarray(idx).astype(np.intp)
        idx = np.where(idx < 0, idx + x.shape[axis], idx)
        return np.take_along_axis(x, idx, axis=axis)

    return gather_along_axis, [a.var("x"), a.var("indices")]


@kernel("gather_nd")
def _gather_nd(a: Args) -> Kernel:
    def gather_nd(x: Any, idx: Any) -> Any:
        idx = np.asarray(idx)
        return x[tuple(np.moveaxis(idx, -1, 0))]

    return gather_nd, [a.var("x"), a.var("indices")]


@kernel("band_part")
def _band_part(a: Args) -> Kernel:
    lower = int(a.const("lower", -1))
    upper = int(a.const("upper", -1))

    def band_part(x: Any) -> Any:
        m, n = x.shape[-2:]
        i = np.arange(m)[:, None]
        j = np.arange(n)[None, :]
        keep = np.ones((m, n), dtype=bool)
        if lower >= 0:
            keep &= i - j <= lower
        if upper >= 0:
            keep &= j - i <= upper
        return np.where(keep, x, np.zeros((), x.dtype))

    return band_part, [a.var("x")]


@kernel("fill")
def _fill(a: Args) -> Kernel:
    value = a.const("value", np.float32(0.0))
    value = np.asarray(value)

    def fill(shape: Any) -> Any:
        return np.full([int(s) for s in np.asarray(shape).reshape(-1)], value, dtype=value.dtype)

    return fill, [a.var("shape")]


@kernel("fill_like")
def _fill_like(a: Args) -> Kernel:
    value = np.asarray(a.const("value", np.float32(0.0)))
    return (lambda ref: np.full(np.shape(ref), value, dtype=value.dtype)), [a.var("ref_tensor")]


@kernel("range_1d")
def _range_1d(a: Args) -> Kernel:
    def range_1d(end: Any, start: Any, step: Any) -> Any:
        dtype = np.result_type(np.asarray(start), np.asarray(end), np.asarray(step))
        return np.arange(start, end, step, dtype=dtype)

    return range_1d, [a.var("end"), a.var("start"), a.var("step")]


@kernel("tile")
def _tile(a: Args) -> Kernel:
    return (lambda x, reps: np.tile(x, [int(r) for r in np.asarray(reps).reshape(-1)])), [
        a.var("x"),
        a.var("reps"),
    ]


@kernel("pad")
def _pad(a: Args) -> Kernel:
    mode = str(a.const("mode", "constant"))
    value = float(a.const("constant_val", 0.0))
    np_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.get(mode)
    if np_mode is None:
        raise a.fail(f"has mode {mode!r}, which the interpreter does not know")

    def pad(x: Any, pads: Any) -> Any:
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        n = len(pads) // 2
        width = [(0, 0)] * (x.ndim - n) + [(pads[2 * i], pads[2 * i + 1]) for i in range(n)]
        if np_mode == "constant":
            return np.pad(x, width, mode="constant", constant_values=value)
        return np.pad(x, width, mode=np_mode)

    return pad, [a.var("x"), a.var("pad")]


@kernel("cumsum")
def _cumsum(a: Args) -> Kernel:
    axis = _axis(a.const("axis", 0))
    exclusive = bool(a.const("exclusive", False))
    reverse = bool(a.const("reverse", False))

    def cumsum(x: Any) -> Any:
        y = np.flip(x, axis) if reverse else x
        out = np.cumsum(y, axis=axis, dtype=x.dtype)
        if exclusive:
            out = out - y
        return np.flip(out, axis) if reverse else out

    return cumsum, [a.var("x")]


@kernel("topk")
def _topk(a: Args) -> Kernel:
    k = int(a.const("k", 1))
    axis = _axis(a.const("axis", -1))
    ascending = bool(a.const("ascending", False))

    def topk(x: Any) -> tuple[Any, Any]:
        order = np.argsort(x if ascending else -x, axis=axis, kind="stable")
        idx = np.take(order, np.arange(k), axis=axis)
        return np.take_along_axis(x, idx, axis=axis), idx.astype(np.int32)

    return topk, [a.var("x")]


@kernel("argsort")
def _argsort(a: Args) -> Kernel:
    axis = _axis(a.const("axis", -1))
    ascending = bool(a.const("ascending", False))

    def argsort(x: Any) -> Any:
        return np.argsort(x if ascending else -x, axis=axis, kind="stable").astype(np.int32)

    return argsort, [a.var("x")]


@kernel("one_hot")
def _one_hot(a: Args) -> Kernel:
    axis = _axis(a.const("axis", -1))
    on = a.const("on_value", 1)
    off = a.const("off_value", 0)

    def one_hot(idx: Any, depth: Any) -> Any:
        idx = np.asarray(idx)
        hot = np.expand_dims(idx, axis) == np.arange(int(depth)).reshape(
            [-1 if i == axis % (idx.ndim + 1) else 1 for i in range(idx.ndim + 1)]
        )
        return np.where(hot, on, off)

    return one_hot, [a.var("indices"), a.var("one_hot_vector_size")]


# --- states (iOS 18) ---------------------------------------------------------------
# A state var's runtime value is a _StateSlot (model.py): reading returns the array,
# writing replaces it (rounded to fp16, the only state dtype Core ML has). A saved
# package stores write_state + read_state; coremltools' loader turns the pair back
# into coreml_update_state.


@kernel("read_state")
def _read_state(a: Args) -> Kernel:
    return (lambda slot: slot.value), [a.var("input")]


@kernel("coreml_update_state")
def _coreml_update_state(a: Args) -> Kernel:
    # A KV cache update is a slice_update of the state read back: already fp16, so
    # it is stored as is rather than rounded again (a full pass over the cache).
    exact = a.fp16_exact("value")

    def coreml_update_state(slot: Any, value: Any) -> Any:
        return slot.write(value, exact)

    return coreml_update_state, [a.var("state"), a.var("value")]


#: Ops with side effects: never folded at plan time, never skipped.
STATEFUL_OPS = frozenset({"read_state", "coreml_update_state"})
