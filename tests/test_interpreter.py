"""The MIL interpreter against numpy computed here, independently, op family by op family.

Small programs are built with coremltools' MIL builder, converted and saved as
real `.mlpackage`s (with the empty pass pipeline, so each op under test reaches
the package as written), then loaded back and run by the interpreter. The real
tiny.en packages are checked against wruntime.oracle at the end.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import get_new_symbol, types
from scipy.special import erf

from wruntime.errors import ExecutorError
from wruntime.executors import load_executor
from wruntime.executors.base import Executor
from wruntime.executors.interpreter import InterpreterModel, load_package, supported_ops

RNG = np.random.default_rng(1234)


def _save(
    prog,
    path: Path,
    *,
    inputs=None,
    fp16: bool = False,
    target=ct.target.iOS17,
    passes: bool = False,
) -> Path:
    """Convert a freshly built program and save it; returns the package path."""
    kwargs = {} if passes else {"pass_pipeline": ct.PassPipeline.EMPTY}
    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=target,
        compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
        inputs=inputs,
        skip_model_load=True,
        **kwargs,
    )
    model.save(str(path))
    return path


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------- op families


def test_elementwise_and_activations(tmp_path):
    @mb.program(
        input_specs=[mb.TensorSpec(shape=(2, 3, 8)), mb.TensorSpec(shape=(2, 3, 8))],
        opset_version=ct.target.iOS17,
    )
    def prog(x, y):
        ax = mb.add(x=mb.abs(x=x), y=np.float32(0.5))
        return (
            mb.add(x=x, y=y, name="add"),
            mb.sub(x=x, y=y, name="sub"),
            mb.mul(x=x, y=y, name="mul"),
            mb.real_div(x=x, y=ax, name="div"),
            mb.pow(x=ax, y=y, name="pow"),
            mb.sqrt(x=ax, name="sqrt"),
            mb.rsqrt(x=ax, epsilon=np.float32(1e-3), name="rsqrt"),
            mb.exp(x=x, name="exp"),
            mb.tanh(x=x, name="tanh"),
            mb.erf(x=x, name="erf"),
            mb.gelu(x=x, mode="EXACT", name="gelu_exact"),
            mb.gelu(x=x, mode="TANH_APPROXIMATION", name="gelu_tanh"),
            mb.gelu(x=x, mode="SIGMOID_APPROXIMATION", name="gelu_sigmoid"),
            mb.softmax(x=x, axis=-1, name="softmax_last"),
            mb.softmax(x=x, axis=1, name="softmax_mid"),
            mb.sigmoid(x=x, name="sigmoid"),
            mb.relu(x=x, name="relu"),
            mb.maximum(x=x, y=y, name="maximum"),
            mb.select(cond=mb.greater(x=x, y=y), a=x, b=y, name="select"),
            mb.cast(
                x=mb.logical_and(x=mb.less(x=x, y=y), y=mb.equal(x=x, y=x)),
                dtype="fp32",
                name="logic",
            ),
            mb.log(x=ax, name="log"),
            mb.clip(x=x, alpha=np.float32(-0.5), beta=np.float32(0.5), name="clip"),
        )

    model = InterpreterModel(_save(prog, tmp_path / "ew.mlpackage"))
    x, y = _randn(2, 3, 8), _randn(2, 3, 8)
    ax = np.abs(x) + np.float32(0.5)
    out = model.predict({"x": x, "y": y})

    def softmax(v, axis):
        e = np.exp(v - v.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    c = math.sqrt(2 / math.pi)
    expected = {
        "add": x + y,
        "sub": x - y,
        "mul": x * y,
        "div": x / ax,
        "pow": ax**y,
        "sqrt": np.sqrt(ax),
        "rsqrt": 1 / np.sqrt(ax + 1e-3),
        "exp": np.exp(x),
        "tanh": np.tanh(x),
        "erf": erf(x),
        "gelu_exact": 0.5 * x * (1 + erf(x / math.sqrt(2))),
        "gelu_tanh": 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x**3))),
        "gelu_sigmoid": x / (1 + np.exp(-1.702 * x)),
        "softmax_last": softmax(x, -1),
        "softmax_mid": softmax(x, 1),
        "sigmoid": 1 / (1 + np.exp(-x)),
        "relu": np.maximum(x, 0),
        "maximum": np.maximum(x, y),
        "select": np.where(x > y, x, y),
        "logic": (x < y).astype(np.float32),
        "log": np.log(ax),
        "clip": np.clip(x, -0.5, 0.5),
    }
    assert set(out) == set(expected)
    for name, ref in expected.items():
        assert out[name].dtype == np.float32, name
        np.testing.assert_allclose(out[name], ref, rtol=2e-6, atol=2e-6, err_msg=name)


def test_big_softmax_gelu_layer_norm_match_numpy(tmp_path):
    """Large enough to take the compiled (numba) paths of fast.py."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 64, 1, 96))], opset_version=ct.target.iOS17)
    def prog(x):
        return (
            mb.softmax(x=x, axis=1, name="sm1"),
            mb.softmax(x=x, axis=-1, name="sm3"),
            mb.gelu(x=x, mode="EXACT", name="gelu"),
            mb.layer_norm(x=x, axes=[-1], epsilon=np.float32(1e-5), name="ln"),
        )

    model = InterpreterModel(_save(prog, tmp_path / "big.mlpackage"))
    x = _randn(2, 64, 1, 96) * 3
    out = model.predict({"x": x})
    x64 = x.astype(np.float64)
    for name, axis in (("sm1", 1), ("sm3", -1)):
        e = np.exp(x64 - x64.max(axis=axis, keepdims=True))
        np.testing.assert_allclose(out[name], e / e.sum(axis=axis, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(out["gelu"], 0.5 * x64 * (1 + erf(x64 / math.sqrt(2))), atol=1e-5)
    mean = x64.mean(-1, keepdims=True)
    ln = (x64 - mean) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out["ln"], ln, atol=1e-5)


def test_products_reductions_and_norms(tmp_path):
    w_lin = _randn(6, 8)
    b_lin = _randn(6)
    gamma, beta = _randn(8), _randn(8)

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(2, 5, 8)), mb.TensorSpec(shape=(2, 7, 8))],
        opset_version=ct.target.iOS17,
    )
    def prog(x, y):
        return (
            mb.linear(x=x, weight=w_lin, bias=b_lin, name="linear"),
            mb.matmul(x=x, y=y, transpose_y=True, name="mm_ty"),
            mb.matmul(x=y, y=y, transpose_x=True, name="mm_tx"),
            mb.matmul(x=x, y=w_lin.T, name="mm_bcast"),
            mb.einsum(
                values=(
                    mb.expand_dims(x=x, axes=[2]),
                    mb.expand_dims(x=mb.transpose(x=y, perm=[0, 2, 1]), axes=[2]),
                ),
                equation="nchw,nwhu->nchu",
                name="einsum",
            ),
            mb.reduce_mean(x=x, axes=[-1], keep_dims=True, name="mean"),
            mb.reduce_sum(x=x, axes=[0, 2], keep_dims=False, name="sum"),
            mb.reduce_max(x=x, axes=[1], keep_dims=False, name="max"),
            mb.layer_norm(x=x, axes=[-1], gamma=gamma, beta=beta, epsilon=1e-5, name="ln"),
            mb.layer_norm(x=x, axes=[1, 2], epsilon=1e-3, name="ln2"),
            mb.reduce_argmax(x=x, axis=-1, name="argmax"),
        )

    model = InterpreterModel(_save(prog, tmp_path / "prod.mlpackage"))
    x, y = _randn(2, 5, 8), _randn(2, 7, 8)
    out = model.predict({"x": x, "y": y})

    def ln(v, axes, eps):
        mean = v.mean(axis=axes, keepdims=True)
        return (v - mean) / np.sqrt(v.var(axis=axes, keepdims=True) + eps)

    expected = {
        "linear": x @ w_lin.T + b_lin,
        "mm_ty": x @ y.transpose(0, 2, 1),
        "mm_tx": y.transpose(0, 2, 1) @ y,
        "mm_bcast": x @ w_lin.T,
        "einsum": (x @ y.transpose(0, 2, 1))[:, :, None, :],
        "mean": x.mean(-1, keepdims=True),
        "sum": x.sum(axis=(0, 2)),
        "max": x.max(axis=1),
        "ln": ln(x, -1, 1e-5) * gamma + beta,
        "ln2": ln(x, (1, 2), 1e-3),
    }
    for name, ref in expected.items():
        np.testing.assert_allclose(out[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(out["argmax"], x.argmax(-1))
    assert out["argmax"].dtype == np.int32


def test_linears_concatenated_run_as_one_product(tmp_path):
    """Split projections (the vocabulary, in four) are planned as one linear, same values."""
    ws = [_randn(n, 8) for n in (5, 7, 6)]
    b0 = _randn(5)
    w_big = _randn(131200, 8)  # over BLOCKED_BYTES: column blocks, shared among threads

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 8))], opset_version=ct.target.iOS17)
    def prog(x):
        parts = [
            mb.linear(x=x, weight=ws[0], bias=b0),
            mb.linear(x=x, weight=ws[1]),
            mb.linear(x=x, weight=ws[2]),
        ]
        kept = mb.linear(x=x, weight=ws[0], name="kept")  # also an output: not fused
        return (
            mb.concat(values=parts, axis=-1, name="fused"),
            mb.concat(values=[kept, mb.linear(x=x, weight=ws[1])], axis=2, name="not_fused"),
            kept,
            mb.linear(x=mb.reduce_mean(x=x, axes=[1]), weight=w_big, name="big"),
            mb.linear(x=mb.reduce_mean(x=x, axes=[0, 1]), weight=w_big, name="big_one_row"),
            mb.linear(  # more rows than FEW_ROWS: one product per block
                x=mb.tile(x=mb.reshape(x=x, shape=[6, 8]), reps=[4, 1]),
                weight=w_big,
                name="many_rows",
            ),
        )

    model = InterpreterModel(_save(prog, tmp_path / "fuse.mlpackage"))
    kinds = [s.op_type for s in model.plan.steps]
    assert kinds.count("linear") == 6 and kinds.count("concat") == 1
    for threads in ("1", "2"):  # one thread, and the big product split between two
        x = _randn(2, 3, 8)
        ref = np.concatenate([x @ ws[0].T + b0, x @ ws[1].T, x @ ws[2].T], axis=-1)
        os.environ["WRUNTIME_THREADS"] = threads
        try:
            out = model.predict({"x": x})
        finally:
            del os.environ["WRUNTIME_THREADS"]
        np.testing.assert_allclose(out["fused"], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            out["not_fused"],
            np.concatenate([x @ ws[0].T, x @ ws[1].T], axis=-1),
            rtol=1e-5,
            atol=1e-5,
        )
        np.testing.assert_allclose(out["kept"], x @ ws[0].T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["big"], x.mean(1) @ w_big.T, rtol=1e-5, atol=1e-4)
        ref_one = x.mean((0, 1)) @ w_big.T
        np.testing.assert_allclose(out["big_one_row"], ref_one, rtol=1e-5, atol=1e-4)
        ref_many = np.tile(x.reshape(6, 8), (4, 1)) @ w_big.T
        np.testing.assert_allclose(out["many_rows"], ref_many, rtol=1e-5, atol=1e-4)


def test_matmul_of_concat_runs_on_the_parts(tmp_path):
    """A KV-cache-style concat feeding a matmul is never built; values as written."""
    q, r = _randn(2, 3, 6, 4), _randn(2, 3, 7, 5)
    s6, y4 = _randn(2, 3, 6, 7), _randn(2, 3, 4, 5)

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(2, 3, 4, 5)), mb.TensorSpec(shape=(2, 3, 4, 2))],
        opset_version=ct.target.iOS17,
    )
    def prog(a, b):
        def cat():
            return mb.concat(values=[a, b], axis=-1)

        flat = mb.concat(
            values=[mb.reshape(x=a, shape=[2, 12, 5]), mb.reshape(x=b, shape=[2, 12, 2])], axis=2
        )
        return (
            mb.matmul(x=q, y=cat(), name="n_axis"),
            mb.matmul(x=cat(), y=r, name="k_axis"),
            mb.matmul(x=cat(), y=y4, transpose_x=True, name="m_axis"),
            mb.matmul(x=s6, y=cat(), transpose_y=True, name="k_axis_ty"),
            mb.matmul(x=q, y=mb.reshape(x=flat, shape=[2, 3, 4, 7]), name="reshaped"),
            mb.matmul(
                x=mb.reshape(x=cat(), shape=[2, 3, 7, 4]),
                y=q.transpose(0, 1, 3, 2),
                name="other_reshape",
            ),
        )

    model = InterpreterModel(_save(prog, tmp_path / "catmm.mlpackage"))
    kinds = [s.op_type for s in model.plan.steps]
    # None is built; the one whose reshape moves the last axis is, at run time.
    assert kinds.count("concat") == 0
    a, b = _randn(2, 3, 4, 5), _randn(2, 3, 4, 2)
    out = model.predict({"a": a, "b": b})
    c = np.concatenate([a, b], axis=-1)
    expected = {
        "n_axis": q @ c,
        "k_axis": c @ r,
        "m_axis": c.transpose(0, 1, 3, 2) @ y4,
        "k_axis_ty": s6 @ c.transpose(0, 1, 3, 2),
        "reshaped": q @ c,
        "other_reshape": c.reshape(2, 3, 7, 4) @ q.transpose(0, 1, 3, 2),
    }
    for name, ref in expected.items():
        assert out[name].shape == ref.shape, name
        np.testing.assert_allclose(out[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_less_common_ops(tmp_path):
    @mb.program(
        input_specs=[
            mb.TensorSpec(shape=(2, 3, 5)),
            mb.TensorSpec(shape=(2, 4, 5)),
            mb.TensorSpec(shape=(2, 4, 5)),
            mb.TensorSpec(shape=(4,), dtype=types.int32),
            mb.TensorSpec(shape=(2, 2), dtype=types.int32),
        ],
        opset_version=ct.target.iOS18,
    )
    def prog(q, k, v, ints, nd):
        values, indices = mb.topk(x=q, k=2, axis=-1, ascending=False)
        return (
            mb.scaled_dot_product_attention(query=q, key=k, value=v, name="sdpa"),
            mb.identity(x=values, name="topk_v"),
            mb.identity(x=indices, name="topk_i"),
            mb.argsort(x=q, axis=1, ascending=True, name="argsort"),
            mb.cumsum(x=q, axis=2, exclusive=True, reverse=False, name="cumsum"),
            mb.gather_nd(x=q, indices=nd, name="gather_nd"),
            mb.pad(x=q, pad=[1, 1], mode="reflect", name="pad_reflect"),
            mb.pad(x=q, pad=[2, 0], mode="replicate", name="pad_edge"),
            mb.one_hot(indices=ints, one_hot_vector_size=6, axis=-1, name="one_hot"),
            mb.silu(x=q, name="silu"),
            mb.softplus(x=q, name="softplus"),
            mb.reduce_min(x=q, axes=[1], name="rmin"),
            mb.reduce_prod(x=q, axes=[2], keep_dims=True, name="rprod"),
            mb.reduce_l2_norm(x=q, axes=[2], name="rl2"),
            mb.reduce_log_sum_exp(x=q, axes=[2], name="rlse"),
            mb.sign(x=q, name="sign"),
            mb.floor_div(x=ints, y=np.int32(3), name="floordiv"),
            mb.mod(x=ints, y=np.int32(3), name="mod"),
            mb.squeeze(x=mb.expand_dims(x=q, axes=[0, 2]), name="squeeze_all"),
        )

    model = InterpreterModel(_save(prog, tmp_path / "misc.mlpackage", target=ct.target.iOS18))
    q, k, v = _randn(2, 3, 5), _randn(2, 4, 5), _randn(2, 4, 5)
    ints = np.array([0, 5, 3, 4], np.int32)
    nd = np.array([[1, 2], [0, 0]], np.int32)
    out = model.predict({"q": q, "k": k, "v": v, "ints": ints, "nd": nd})
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(5)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    order = np.argsort(-q, axis=-1, kind="stable")[..., :2]
    expected = {
        "sdpa": (e / e.sum(-1, keepdims=True)) @ v,
        "topk_v": np.take_along_axis(q, order, -1),
        "topk_i": order,
        "argsort": np.argsort(q, axis=1, kind="stable"),
        "cumsum": np.cumsum(q, axis=2) - q,
        "gather_nd": q[[1, 0], [2, 0]],
        "pad_reflect": np.pad(q, [(0, 0), (0, 0), (1, 1)], mode="reflect"),
        "pad_edge": np.pad(q, [(0, 0), (0, 0), (2, 0)], mode="edge"),
        "one_hot": np.eye(6)[ints],
        "silu": q / (1 + np.exp(-q)),
        "softplus": np.log1p(np.exp(q)),
        "rmin": q.min(1),
        "rprod": q.prod(2, keepdims=True),
        "rl2": np.sqrt((q * q).sum(2)),
        "rlse": np.log(np.exp(q).sum(2)),
        "sign": np.sign(q),
        "floordiv": ints // 3,
        "mod": ints % 3,
        "squeeze_all": q,
    }
    for name, ref in expected.items():
        assert out[name].shape == np.shape(ref), name
        np.testing.assert_allclose(out[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)


def _conv_ref(x, w, b, stride, pads, dilation, groups):
    """Direct (loop over kernel taps) N-D convolution, for checking the im2col kernel."""
    nsp = w.ndim - 2
    x = np.pad(x, [(0, 0), (0, 0), *pads])
    cout, cin_g = w.shape[:2]
    k = w.shape[2:]
    out_size = [
        (x.shape[2 + i] - ((k[i] - 1) * dilation[i] + 1)) // stride[i] + 1 for i in range(nsp)
    ]
    out = np.zeros((x.shape[0], cout, *out_size), np.float64)
    per_g = cout // groups
    for o in range(cout):
        g = o // per_g
        for tap in np.ndindex(*k):
            sl = tuple(
                slice(
                    tap[i] * dilation[i], tap[i] * dilation[i] + stride[i] * out_size[i], stride[i]
                )
                for i in range(nsp)
            )
            patch = x[(slice(None), slice(g * cin_g, (g + 1) * cin_g), *sl)]
            wt = w[(o, slice(None), *tap)].reshape((1, cin_g) + (1,) * nsp)
            out[:, o] += (patch * wt).sum(axis=1)
    return out if b is None else out + b.reshape((1, cout) + (1,) * nsp)


def test_conv_1d_2d_strides_pads_dilation_groups(tmp_path):
    w1 = _randn(6, 4, 3)
    b1 = _randn(6)
    w2 = _randn(8, 2, 3, 2)
    b2 = _randn(8)
    w_pw = _randn(5, 4, 1, 1)
    b_pw = _randn(5)

    w_pw1 = _randn(5, 4, 1)
    w_narrow, b_narrow = _randn(3, 4, 1), _randn(3)

    @mb.program(
        input_specs=[
            mb.TensorSpec(shape=(2, 4, 17)),
            mb.TensorSpec(shape=(1, 4, 9, 10)),
            mb.TensorSpec(shape=(3, 4, 2)),
            mb.TensorSpec(shape=(2, 4, 1, 3)),
        ],
        opset_version=ct.target.iOS17,
    )
    def prog(x1, x2, x3, x4):
        return (
            # Pointwise over a few positions (a decoder step): the vector-product path.
            mb.conv(x=x3, weight=w_pw1, bias=b_pw, name="c1_few"),
            mb.conv(x=x3, weight=w_narrow, bias=b_narrow, name="c1_few_narrow"),  # in > out
            mb.conv(x=x4, weight=w_pw, name="c2_few_nobias"),
            mb.conv(x=x1, weight=w1, bias=b1, pad_type="custom", pad=[1, 1], name="c1_pad"),
            mb.conv(x=x1, weight=w1, bias=b1, strides=[2], pad_type="same", name="c1_same"),
            mb.conv(x=x1, weight=w1, bias=b1, dilations=[2], pad_type="valid", name="c1_dil"),
            mb.conv(
                x=x2,
                weight=w2,
                bias=b2,
                strides=[2, 1],
                pad_type="custom",
                pad=[1, 0, 0, 1],
                groups=2,
                name="c2_groups",
            ),
            mb.conv(x=x2, weight=w_pw, bias=b_pw, name="c2_pointwise"),
        )

    model = InterpreterModel(_save(prog, tmp_path / "conv.mlpackage"))
    x1, x2 = _randn(2, 4, 17), _randn(1, 4, 9, 10)
    x3, x4 = _randn(3, 4, 2), _randn(2, 4, 1, 3)
    out = model.predict({"x1": x1, "x2": x2, "x3": x3, "x4": x4})
    # "same" with stride 2 over 17 with k=3: out 9, total pad 2 -> (1, 1).
    expected = {
        "c1_few": _conv_ref(x3, w_pw1, b_pw, [1], [(0, 0)], [1], 1),
        "c1_few_narrow": _conv_ref(x3, w_narrow, b_narrow, [1], [(0, 0)], [1], 1),
        "c2_few_nobias": _conv_ref(x4, w_pw, None, [1, 1], [(0, 0), (0, 0)], [1, 1], 1),
        "c1_pad": _conv_ref(x1, w1, b1, [1], [(1, 1)], [1], 1),
        "c1_same": _conv_ref(x1, w1, b1, [2], [(1, 1)], [1], 1),
        "c1_dil": _conv_ref(x1, w1, b1, [1], [(0, 0)], [2], 1),
        "c2_groups": _conv_ref(x2, w2, b2, [2, 1], [(1, 0), (0, 1)], [1, 1], 2),
        "c2_pointwise": _conv_ref(x2, w_pw, b_pw, [1, 1], [(0, 0), (0, 0)], [1, 1], 1),
    }
    for name, ref in expected.items():
        assert out[name].shape == ref.shape, name
        np.testing.assert_allclose(out[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_layout_and_indexing_ops(tmp_path):
    table = _randn(10, 4)

    @mb.program(
        input_specs=[
            mb.TensorSpec(shape=(2, 3, 4)),
            mb.TensorSpec(shape=(3,), dtype=types.int32),
            mb.TensorSpec(shape=(2, 3, 1), dtype=types.int32),
        ],
        opset_version=ct.target.iOS17,
    )
    def prog(x, idx, idx3):
        parts = mb.split(x=x, split_sizes=[1, 3], axis=2)
        halves = mb.split(x=x, num_splits=2, axis=-1)
        return (
            mb.identity(x=halves[0], name="half0"),
            mb.identity(x=halves[1], name="half1"),
            mb.reshape(x=x, shape=[0, -1, 2], name="reshape"),
            mb.transpose(x=x, perm=[2, 0, 1], name="transpose"),
            mb.expand_dims(x=x, axes=[0, -1], name="expand"),
            mb.squeeze(x=mb.expand_dims(x=x, axes=[1]), axes=[1], name="squeeze"),
            mb.concat(values=[x, x], axis=1, name="concat"),
            mb.concat(values=[x, x], axis=2, interleave=True, name="interleave"),
            mb.identity(x=parts[0], name="split0"),
            mb.identity(x=parts[1], name="split1"),
            mb.slice_by_index(
                x=x,
                begin=[0, 1, 0],
                end=[2, 3, 4],
                stride=[1, 1, 2],
                end_mask=[False, False, True],
                squeeze_mask=[True, False, False],
                name="sbi",
            ),
            mb.slice_by_size(x=x, begin=[1, 0, 1], size=[1, -1, 2], name="sbs"),
            mb.gather(x=table, indices=idx, axis=0, name="gather"),
            mb.gather_along_axis(x=x, indices=idx3, axis=2, name="gaa"),
            mb.band_part(x=x, lower=0, upper=1, name="band"),
            mb.fill(shape=mb.shape(x=x), value=3.0, name="fill"),
            mb.range_1d(
                start=np.int32(2),
                end=mb.squeeze(x=mb.slice_by_size(x=idx, begin=[0], size=[1])),
                step=np.int32(3),
                name="range",
            ),
            mb.tile(x=x, reps=[1, 2, 1], name="tile"),
            mb.stack(values=[x, x], axis=0, name="stack"),
            mb.pad(x=x, pad=[1, 2], mode="constant", constant_val=-1.0, name="pad"),
            mb.shape(x=x, name="shape"),
        )

    model = InterpreterModel(_save(prog, tmp_path / "layout.mlpackage"))
    x = _randn(2, 3, 4)
    idx = np.array([9, 0, 4], np.int32)
    idx3 = RNG.integers(0, 4, size=(2, 3, 1)).astype(np.int32)
    out = model.predict({"x": x, "idx": idx, "idx3": idx3})
    i, j = np.arange(3)[:, None], np.arange(4)[None, :]
    expected = {
        "reshape": x.reshape(2, 6, 2),
        "transpose": x.transpose(2, 0, 1),
        "expand": x[None, ..., None],
        "squeeze": x,
        "concat": np.concatenate([x, x], 1),
        "interleave": np.repeat(x, 2, axis=2),
        "split0": x[..., :1],
        "half0": x[..., :2],
        "half1": x[..., 2:],
        "split1": x[..., 1:],
        "sbi": x[0, 1:3, 0::2],
        "sbs": x[1:2, :, 1:3],
        "gather": table[idx],
        "gaa": np.take_along_axis(x, idx3, axis=2),
        "band": np.where((i - j <= 0) & (j - i <= 1), x, 0),
        "fill": np.full((2, 3, 4), 3.0),
        "range": np.arange(2, 9, 3),
        "tile": np.tile(x, (1, 2, 1)),
        "stack": np.stack([x, x]),
        "pad": np.pad(x, [(0, 0), (0, 0), (1, 2)], constant_values=-1),
        "shape": np.array([2, 3, 4]),
    }
    for name, ref in expected.items():
        assert out[name].shape == ref.shape, name
        np.testing.assert_array_equal(out[name], ref, err_msg=name)
    assert out["shape"].dtype == np.int32 and out["range"].dtype == np.int32


# --------------------------------------------------------------- shapes and inputs


def _flexible_program():
    t = get_new_symbol()

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1, t, 8)), mb.TensorSpec(shape=(t,), dtype=types.int32)],
        opset_version=ct.target.iOS17,
    )
    def prog(x, pos):
        # Dynamic-shape chain: shape -> slice -> concat -> reshape with a computed shape.
        shape = mb.shape(x=x)
        tlen = mb.slice_by_size(x=shape, begin=[1], size=[1])
        new_shape = mb.concat(
            values=[np.array([1, 2], np.int32), tlen, np.array([4], np.int32)], axis=0
        )
        heads = mb.reshape(x=x, shape=new_shape)  # (1, 2, T, 4)
        scores = mb.matmul(x=heads, y=heads, transpose_y=True)  # (1, 2, T, T)
        causal = mb.band_part(x=mb.fill(shape=mb.shape(x=scores), value=1.0), lower=-1, upper=0)
        masked = mb.add(x=scores, y=mb.mul(x=mb.sub(x=causal, y=1.0), y=1e4))
        att = mb.softmax(x=masked, axis=-1, name="att")
        table = np.arange(20 * 8, dtype=np.float32).reshape(20, 8)
        emb = mb.gather(x=table, indices=pos, axis=0, name="emb")
        return att, emb

    return prog


@pytest.fixture(scope="module")
def flexible(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("flex") / "flex.mlpackage"
    inputs = [
        ct.TensorType("x", shape=(1, ct.RangeDim(1, 6, default=1), 8)),
        ct.TensorType("pos", shape=(ct.RangeDim(1, 6, default=1),), dtype=np.int32),
    ]
    return _save(_flexible_program(), path, inputs=inputs, passes=True)


@pytest.mark.parametrize("t", [1, 3, 6])
def test_flexible_shapes(flexible, t):
    model = InterpreterModel(flexible)
    x = _randn(1, t, 8)
    pos = np.arange(t, dtype=np.int32)
    out = model.predict({"x": x, "pos": pos})
    h = x.reshape(1, 2, t, 4)
    s = h @ h.transpose(0, 1, 3, 2) + np.triu(np.full((t, t), -1e4, np.float32), 1)
    e = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(out["att"], e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["emb"], np.arange(160, dtype=np.float32).reshape(20, 8)[pos])


def test_pointwise_conv_over_flexible_length(tmp_path):
    """A decoder-like conv (flexible length): few positions and many, both weight layouts."""
    wide, narrow = _randn(12, 5, 1), _randn(3, 5, 1)  # more outputs than inputs; fewer
    b_wide = _randn(12)
    t = get_new_symbol()

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 5, t))], opset_version=ct.target.iOS17)
    def prog(x):
        return (
            mb.conv(x=x, weight=wide, bias=b_wide, name="wide"),
            mb.conv(x=x, weight=narrow, name="narrow"),
        )

    inputs = [ct.TensorType("x", shape=(2, 5, ct.RangeDim(1, 40, default=1)))]
    model = InterpreterModel(_save(prog, tmp_path / "flexconv.mlpackage", inputs=inputs))
    for length in (1, 3, 40):  # 2, 6 and 80 positions: vector products, then a GEMM
        x = _randn(2, 5, length)
        out = model.predict({"x": x})
        ref_wide = np.einsum("oc,nct->not", wide[..., 0], x) + b_wide[:, None]
        np.testing.assert_allclose(out["wide"], ref_wide, rtol=1e-5, atol=1e-5)
        ref_narrow = np.einsum("oc,nct->not", narrow[..., 0], x)
        np.testing.assert_allclose(out["narrow"], ref_narrow, rtol=1e-5, atol=1e-5)


def test_bad_inputs_refused(flexible):
    model = InterpreterModel(flexible)
    good = {"x": _randn(1, 2, 8), "pos": np.arange(2, dtype=np.int32)}
    with pytest.raises(ExecutorError, match="'pos' is missing"):
        model.predict({"x": good["x"]})
    with pytest.raises(ExecutorError, match=r"size 7 in dimension 1, outside the allowed \[1, 6\]"):
        model.predict({**good, "x": _randn(1, 7, 8)})
    with pytest.raises(ExecutorError, match="has rank 2"):
        model.predict({**good, "x": _randn(2, 8)})
    with pytest.raises(ExecutorError, match="'pos' is array of float32"):
        model.predict({**good, "pos": np.arange(2, dtype=np.float32)})
    with pytest.raises(ExecutorError, match="Unknown input 'tokens'"):
        model.predict({**good, "tokens": good["pos"]})
    with pytest.raises(ExecutorError, match="has no state"):
        model.predict(good, state=object())
    with pytest.raises(ExecutorError, match="has no state"):
        model.make_state()
    # float64 and python lists are cast to the declared dtypes, as Core ML does.
    out = model.predict({"x": good["x"].astype(np.float64), "pos": [0, 1]})
    assert out["att"].dtype == np.float32


def test_enumerated_shapes_and_fixed_shape(tmp_path):
    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1, get_new_symbol()))], opset_version=ct.target.iOS17
    )
    def prog(x):
        return mb.mul(x=x, y=2.0, name="y")

    shapes = ct.EnumeratedShapes(shapes=[(1, 2), (1, 5)], default=(1, 2))
    path = _save(
        prog, tmp_path / "enum.mlpackage", inputs=[ct.TensorType("x", shape=shapes)], passes=True
    )
    model = InterpreterModel(path)
    np.testing.assert_array_equal(model.predict({"x": np.ones((1, 5))})["y"], np.full((1, 5), 2.0))
    with pytest.raises(ExecutorError, match="accepts only"):
        model.predict({"x": np.ones((1, 3))})


# ------------------------------------------------------------------------ loading


def test_unsupported_op_refused_at_load_by_name(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 4, 4))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.space_to_depth(x=x, block_size=2, name="y")

    path = _save(prog, tmp_path / "s2d.mlpackage")
    assert "space_to_depth" not in supported_ops()
    with pytest.raises(
        ExecutorError, match=r"op 'space_to_depth' \(in function main\) is not supported"
    ):
        InterpreterModel(path)


def test_not_a_package(tmp_path):
    with pytest.raises(ExecutorError, match=r"not a saved \.mlpackage"):
        InterpreterModel(tmp_path / "missing.mlpackage")
    with pytest.raises(ExecutorError, match="Unknown executor"):
        load_executor(tmp_path, kind="tpu")


def test_multifunction_package_selects_function(tmp_path):
    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    w = _randn(4, 4)
    paths = {}

    def scaled(scale: float):
        @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))], opset_version=ct.target.iOS17)
        def prog(x):
            return mb.mul(x=mb.linear(x=x, weight=w), y=np.float32(scale), name="y")

        return prog

    for name, scale in (("main", 1.0), ("double", 2.0)):
        paths[name] = _save(scaled(scale), tmp_path / f"{name}.mlpackage", passes=True)
    desc = MultiFunctionDescriptor()
    for name, path in paths.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = "main"
    merged = tmp_path / "multi.mlpackage"
    save_multifunction(desc, str(merged))

    package = load_package(merged)  # read once, shared by both functions
    assert set(package.functions) == {"main", "double"}
    x = _randn(1, 4)
    main = InterpreterModel(package).predict({"x": x})["y"]
    double = InterpreterModel(package, function_name="double").predict({"x": x})["y"]
    np.testing.assert_allclose(main, x @ w.T, rtol=1e-6)
    np.testing.assert_allclose(double, 2 * (x @ w.T), rtol=1e-6)
    with pytest.raises(ExecutorError, match="no function 'batch5'"):
        InterpreterModel(package, function_name="batch5")


def test_round_fp16_equals_numpy_float16_everywhere():
    """The bit-level rounding against numpy's float16, over every magnitude fp16 has."""
    from wruntime.executors.interpreter.fp16 import round_fp16

    scales = (1e-9, 1e-7, 3e-6, 1e-4, 1e-2, 1.0, 300.0, 3e4, 1e5)
    values = np.concatenate([_randn(20000) * np.float32(s) for s in scales])
    special = [0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, -65520, 2**-14, 2**-24, 2**-25]
    values = np.concatenate([values, np.array(special, np.float32), np.array([np.nan], np.float32)])
    with np.errstate(over="ignore"):
        ref = values.astype(np.float16).astype(np.float32)
    got = round_fp16(values)
    np.testing.assert_array_equal(got, ref)
    assert np.signbit(got[values.size - 11]) == np.signbit(ref[values.size - 11])  # -0.0


def test_fp16_package_and_emulation(tmp_path):
    w = _randn(16, 16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 16))], opset_version=ct.target.iOS17)
    def prog(x):
        h = mb.linear(x=x, weight=w, name="h")
        return mb.add(x=h, y=np.float32(1000.0), name="y")

    path = _save(prog, tmp_path / "fp16.mlpackage", fp16=True, passes=True)
    ops = {s.op_type for s in InterpreterModel(path).plan.steps}
    assert "cast" in ops  # the fp16 package casts in and out
    x = _randn(4, 16)
    ref = (x @ w.T).astype(np.float32) + np.float32(1000.0)

    plain = InterpreterModel(path).predict({"x": x})["y"]
    emulated = load_executor(path, fp16_emulation=True).predict({"x": x})["y"]
    # Near 1000 the fp16 spacing is 0.5: every emulated value is a multiple of it.
    np.testing.assert_array_equal(emulated, np.round(emulated * 2) / 2)
    assert np.max(np.abs(emulated - ref)) <= 0.25 + 0.05
    # Without emulation the interpreter computes in fp32: casts pass values on
    # unrounded, only the stored weights are fp16, and the sum is not a multiple of 0.5.
    w16 = w.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(plain, x @ w16.T + 1000.0, rtol=1e-6)
    assert not np.array_equal(plain, np.round(plain * 2) / 2)


def test_quantized_weights_materialised(tmp_path):
    import coremltools.optimize.coreml as cto

    w = _randn(32, 64)

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 64))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.linear(x=x, weight=w, name="y")

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
        compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
    )
    config = cto.OptimizationConfig(
        global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", weight_threshold=0)
    )
    quantized = cto.linear_quantize_weights(model, config)
    path = tmp_path / "int8.mlpackage"
    quantized.save(str(path))
    interp = InterpreterModel(path)
    assert any(k.startswith("constexpr_") for k in interp.plan.op_counts)
    x = _randn(3, 64)
    # Independent dequantisation: symmetric int8 per output channel.
    scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
    w_q = np.clip(np.round(w / scale), -127, 127) * scale
    np.testing.assert_allclose(interp.predict({"x": x})["y"], x @ w_q.T, rtol=1e-4, atol=1e-4)


def test_palettized_and_blockwise_weights_materialised(tmp_path):
    """4-bit LUT (constexpr_lut_to_dense) and int4 per-block (constexpr_blockwise_shift_scale)."""
    import coremltools.optimize.coreml as cto

    w = _randn(32, 64)

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 64))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=w, name="y")

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
    )
    x = _randn(3, 64)
    exact = x @ w.T
    configs = {
        "lut": cto.OptimizationConfig(
            global_config=cto.OpPalettizerConfig(mode="uniform", nbits=4, weight_threshold=0)
        ),
        "int4": cto.OptimizationConfig(
            global_config=cto.OpLinearQuantizerConfig(
                mode="linear_symmetric",
                dtype="int4",
                granularity="per_block",
                block_size=32,
                weight_threshold=0,
            )
        ),
    }
    for name, config in configs.items():
        if name == "lut":
            compressed = cto.palettize_weights(model, config)
        else:
            compressed = cto.linear_quantize_weights(model, config)
        path = tmp_path / f"{name}.mlpackage"
        compressed.save(str(path))
        interp = InterpreterModel(path)
        assert any(k.startswith("constexpr_") for k in interp.plan.op_counts), name
        got = interp.predict({"x": x})["y"]
        # 4 bits: close to the exact product, but not equal to it.
        err = _rel(got, exact)
        assert 1e-4 < err < 0.25, (name, err)


# ----------------------------------------------------------------------- states


def _stateful_program():
    @mb.program(
        input_specs=[
            mb.StateTensorSpec((2, 6), dtype=types.fp16),
            mb.TensorSpec((2, 1), dtype=types.fp16),
            mb.TensorSpec((1,), dtype=types.int32),
        ],
        opset_version=ct.target.iOS18,
    )
    def prog(cache, value, pos):
        old = mb.read_state(input=cache)
        end = mb.add(x=pos, y=np.int32(1))
        begin = mb.concat(values=[np.array([0], np.int32), pos], axis=0)
        stop = mb.concat(values=[np.array([2], np.int32), end], axis=0)
        new = mb.slice_update(x=old, update=value, begin=begin, end=stop)
        new = mb.coreml_update_state(state=cache, value=new)
        return mb.reduce_sum(x=new, axes=[1], keep_dims=False, name="total")

    return prog


def test_stateful_cache_across_predicts(tmp_path):
    path = _save(
        _stateful_program(),
        tmp_path / "state.mlpackage",
        inputs=[
            ct.TensorType("value", shape=(2, 1)),
            ct.TensorType("pos", shape=(1,), dtype=np.int32),
        ],
        fp16=True,
        target=ct.target.iOS18,
        passes=True,
    )
    model = InterpreterModel(path)
    assert isinstance(model, Executor)
    with pytest.raises(ExecutorError, match="stateful"):
        model.predict({"value": np.zeros((2, 1)), "pos": np.array([0])})
    state = model.make_state()
    other = model.make_state()
    expected = np.zeros((2, 6), np.float32)
    for step in range(4):
        value = np.array([[0.1 * step + 1.0], [-2.5 * step]], np.float32)
        out = model.predict({"value": value, "pos": np.array([step], np.int32)}, state)
        expected[:, step] = value[:, 0].astype(np.float16)
        np.testing.assert_allclose(out["total"], expected.sum(axis=1), rtol=1e-3)
        np.testing.assert_array_equal(state.read_state("cache"), expected.astype(np.float16))
    assert not np.any(other.read_state("cache"))  # states are independent
    state.write_state("cache", np.ones((2, 6)))
    out = model.predict({"value": np.zeros((2, 1)), "pos": np.array([5], np.int32)}, state)
    np.testing.assert_allclose(out["total"], [5.0, 5.0])


# ------------------------------------------------ the real tiny.en packages vs the oracle


@pytest.fixture(scope="module")
def jfk_mel() -> np.ndarray:
    from conftest import CLIPS

    from wruntime.audio import load_audio
    from wruntime.features import N_SAMPLES, log_mel_spectrogram, pad_or_trim

    audio = pad_or_trim(load_audio(str(CLIPS["jfk"][0])), N_SAMPLES)
    return np.asarray(log_mel_spectrogram(audio, 80), np.float32)[None, :, :3000]


@pytest.fixture(scope="module")
def oracle_run(tiny_weights, jfk_mel):
    """The oracle's cross K/V and a short greedy decode: (ck, cv, [(tokens, positions)])."""
    from wruntime import oracle

    ck, cv = oracle.cross_kv(tiny_weights, oracle.encode(tiny_weights, jfk_mel))
    return ck, cv


def _model_dir(test_home, name: str):
    from wruntime.build.pipeline import ensure_model

    return ensure_model(name, progress=False)


def _greedy_against_oracle(weights, decoder, ck, cv, cross, steps: int = 3):
    """Prefill <|startoftranscript|><|notimestamps|>, then greedy steps; the caches are
    written from the oracle's own K/V so each call is compared on identical inputs.
    Yields (interpreter outputs, oracle outputs) per call."""
    from wruntime import oracle
    from wruntime.build.interface import MASK_NEG

    d = weights.dims
    n = d.n_text_ctx
    kc = np.zeros((d.n_text_layer, 1, d.n_text_state, n), np.float32)
    vc = np.zeros_like(kc)
    seq = np.array([[50257, 50362]], np.int32)
    start = 0
    for _ in range(steps + 1):
        pos = np.arange(start, start + seq.shape[1], dtype=np.int32)
        mask = oracle.causal_mask(pos, n)
        assert mask.min() == MASK_NEG
        out = decoder.predict(
            {"tokens": seq, "positions": pos, "k_cache": kc, "v_cache": vc, "mask": mask, **cross}
        )
        ref = oracle.decode(weights, seq, pos, kc, vc, ck, cv, mask)
        yield out, ref
        kc[..., pos], vc[..., pos] = ref.k_new, ref.v_new
        start += seq.shape[1]
        seq = np.array([[int(np.argmax(ref.logits[0, -1]))]], np.int32)


@pytest.mark.slow
def test_real_fp32_packages_match_oracle(test_home, tiny_weights, jfk_mel, oracle_run):
    model_dir = _model_dir(test_home, "tiny.en-fp32")
    ck, cv = oracle_run
    encoder = load_executor(model_dir.package("encoder"))
    cross = encoder.predict({"mel": jfk_mel})
    assert _rel(cross["cross_k"], ck) <= 1e-4
    assert _rel(cross["cross_v"], cv) <= 1e-4

    decoder = load_executor(model_dir.package("decoder"))
    for out, ref in _greedy_against_oracle(tiny_weights, decoder, ck, cv, cross):
        assert _rel(out["logits"], ref.logits) <= 1e-4
        assert _rel(out["k_new"], ref.k_new) <= 1e-4
        assert _rel(out["v_new"], ref.v_new) <= 1e-4
        assert _rel(out["alignment"], ref.alignment) <= 1e-4
        assert np.argmax(out["logits"][0, -1]) == np.argmax(ref.logits[0, -1])


@pytest.mark.slow
def test_real_fp16_packages_with_emulation(test_home, tiny_weights, jfk_mel, oracle_run):
    model_dir = _model_dir(test_home, "tiny.en-fp16")
    ck, cv = oracle_run
    encoder = load_executor(model_dir.package("encoder"), fp16_emulation=True)
    cross = encoder.predict({"mel": jfk_mel})
    assert _rel(cross["cross_k"], ck) <= 2e-2
    decoder = load_executor(model_dir.package("decoder"), fp16_emulation=True)
    for out, ref in _greedy_against_oracle(tiny_weights, decoder, ck, cv, cross):
        err = _rel(out["logits"], ref.logits)
        assert 0 < err <= 2e-2  # fp16 really rounds, and stays close
        assert np.argmax(out["logits"][0, -1]) == np.argmax(ref.logits[0, -1])


@pytest.mark.slow
def test_real_stateful_decoder_matches_explicit(test_home, tiny_weights, oracle_run):
    """The MLState decoder against the explicit-cache one on the same token stream.

    The state is fp16 (Core ML's rule), so the explicit decoder gets the same
    fp16-rounded cache; what still differs is the new tokens' own K/V (the
    stateful decoder rounds them into its cache before attending): ~1e-4.
    """
    model_dir = _model_dir(test_home, "tiny.en-fp32")
    ck, cv = oracle_run
    cross = {"cross_k": ck, "cross_v": cv}
    package = load_package(model_dir.package("decoder_stateful"))
    stateful = InterpreterModel(package, function_name="main")
    explicit = InterpreterModel(model_dir.package("decoder"))
    d = tiny_weights.dims
    n = d.n_text_ctx
    kc = np.zeros((d.n_text_layer, 1, d.n_text_state, n), np.float32)
    vc = np.zeros_like(kc)
    state = stateful.make_state()
    seq = np.array([[50257, 50362]], np.int32)
    start = 0
    from wruntime import oracle

    for _ in range(4):
        pos = np.arange(start, start + seq.shape[1], dtype=np.int32)
        out_e = explicit.predict(
            {
                "tokens": seq,
                "positions": pos,
                "k_cache": kc,
                "v_cache": vc,
                "mask": oracle.causal_mask(pos, n),
                **cross,
            }
        )
        mask = np.where(np.arange(n)[None, :] <= pos[:, None], 0.0, -1e4).astype(np.float32)
        out_s = stateful.predict(
            {
                "tokens": seq,
                "positions": pos,
                "beam_order": np.zeros(1, np.int32),
                "mask": mask,
                **cross,
            },
            state,
        )
        assert _rel(out_s["logits"], out_e["logits"]) <= 5e-4
        assert _rel(out_s["alignment"], out_e["alignment"]) <= 5e-4
        assert np.argmax(out_s["logits"][0, -1]) == np.argmax(out_e["logits"][0, -1])
        kc[..., pos] = out_e["k_new"].astype(np.float16)
        vc[..., pos] = out_e["v_new"].astype(np.float16)
        # The state holds exactly what the explicit runtime would have written, in fp16.
        k_state = state.read_state("k_cache")
        assert k_state.dtype == np.float16
        np.testing.assert_allclose(
            k_state[..., : start + len(pos)], kc[..., : start + len(pos)], atol=2e-3, rtol=2e-3
        )
        start += seq.shape[1]
        seq = np.array([[int(np.argmax(out_e["logits"][0, -1]))]], np.int32)


@pytest.mark.slow
def test_real_stateful_batch5_reorders_beams(test_home, tiny_weights, oracle_run):
    """beam_order picks the cache rows each beam continues, as the explicit runtime would."""
    from wruntime import oracle

    model_dir = _model_dir(test_home, "tiny.en-fp32")
    ck, cv = oracle_run
    cross = {"cross_k": ck, "cross_v": cv}
    stateful = InterpreterModel(model_dir.package("decoder_stateful"), function_name="batch5")
    explicit = InterpreterModel(model_dir.package("decoder"))
    d = tiny_weights.dims
    n, b = d.n_text_ctx, 5
    kc = np.zeros((d.n_text_layer, b, d.n_text_state, n), np.float32)
    vc = np.zeros_like(kc)
    state = stateful.make_state()
    steps = [
        (np.tile([[50257, 50362]], (b, 1)), np.arange(b)),
        (np.array([[440], [400], [1025], [843], [314]]), np.arange(b)),
        (np.array([[11], [13], [11], [262], [13]]), np.array([2, 2, 0, 1, 4])),
    ]
    start = 0
    for tokens, order in steps:
        tokens = tokens.astype(np.int32)
        pos = np.arange(start, start + tokens.shape[1], dtype=np.int32)
        kc, vc = kc[:, order], vc[:, order]  # the explicit runtime's reorder
        out_e = explicit.predict(
            {
                "tokens": tokens,
                "positions": pos,
                "k_cache": kc,
                "v_cache": vc,
                "mask": oracle.causal_mask(pos, n),
                **cross,
            }
        )
        mask = np.where(np.arange(n)[None, :] <= pos[:, None], 0.0, -1e4).astype(np.float32)
        out_s = stateful.predict(
            {
                "tokens": tokens,
                "positions": pos,
                "beam_order": order.astype(np.int32),
                "mask": mask,
                **cross,
            },
            state,
        )
        assert out_s["logits"].shape == (b, tokens.shape[1], d.n_vocab)
        assert _rel(out_s["logits"], out_e["logits"]) <= 5e-4
        kc[..., pos] = out_e["k_new"].astype(np.float16)
        vc[..., pos] = out_e["v_new"].astype(np.float16)
        start += tokens.shape[1]
    # Beams 0 and 1 continued the same row: their caches agree up to the last token.
    k_state = state.read_state("k_cache").astype(np.float32)
    np.testing.assert_array_equal(k_state[:, 0, :, :3], k_state[:, 1, :, :3])
    assert not np.array_equal(k_state[:, 0, :, 3], k_state[:, 1, :, 3])
