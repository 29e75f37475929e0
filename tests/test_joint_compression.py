"""Joint compression: palettized weights whose look-up tables are themselves int8.

coremltools stores such a weight as a chain of two constexpr ops (the int8 table
entries through ``constexpr_blockwise_shift_scale``, then ``constexpr_lut_to_dense``);
the second has no value of its own for the table, so the interpreter has to feed it
the first one's result. Each chain is checked against coremltools' own decompression
(its ``WeightDecompressor`` pass, op after op), against `simulate`, and against the
fp16 weight; then ``tiny.en-pal4-lut8`` transcribes real speech through the
interpreter. The tiny.en build is cached under the test home (about 90 s the first
time on a loaded 2-core machine).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from wruntime.catalog import CompressionRule, precisions

pytestmark = pytest.mark.filterwarnings("ignore")

LUT8 = CompressionRule.from_dict(
    {
        "target": "global",
        "kind": "palettize",
        "nbits": 4,
        "mode": "kmeans",
        "granularity": "per_grouped_channel",
        "group_size": 16,
        "weight_threshold": 2048,
        "lut_dtype": "int8",
    },
    "test",
)


def _program(path: Path):
    from wruntime.build.convert import load_program

    return load_program(path)


def _decompressed(path: Path):
    """The package's program with every constexpr replaced by coremltools' own value."""
    from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

    program = _program(path)
    WeightDecompressor(op_selector=lambda op: True).apply(program)
    return program


def _chains(program) -> list:
    """The constexpr_lut_to_dense ops whose table is an int8 constexpr_blockwise_shift_scale."""
    out = []
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type != "constexpr_lut_to_dense":
                continue
            source = op.lut.op
            if source.op_type == "constexpr_blockwise_shift_scale":
                assert source.data.val.dtype == np.int8, op.name
                assert source.scale.val.size == 1, op.name  # one scale for all the tables
                out.append(op)
    return out


def _const_values(program, function: str = "main") -> dict[str, np.ndarray]:
    return {
        op.name: op.outputs[0].val
        for op in program.functions[function].operations
        if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray)
    }


def _template_equal(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, str):
        return a == b
    return np.array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------- rules


def test_rule_label_bits_and_validation():
    from wruntime.build.compress import PackageWeight, rule_bits, rule_label

    weight = PackageWeight("w", (1536, 384), ("linear",))
    assert rule_label(LUT8) == "pal4/g16+lut8"
    tables = 1536 // 16
    assert rule_bits(LUT8, weight) == pytest.approx(4 + (tables * 16 * 8 + 16) / weight.size)
    plain = CompressionRule.from_dict({**LUT8.to_dict(), "lut_dtype": None}, "test")
    assert rule_bits(plain, weight) - rule_bits(LUT8, weight) == pytest.approx(
        (tables * 16 * 8 - 16) / weight.size
    )
    with pytest.raises(ValueError, match="lut_dtype"):
        CompressionRule.from_dict(
            {"target": "global", "kind": "linear_quantize", "dtype": "int8", "lut_dtype": "int8"},
            "test",
        )
    with pytest.raises(ValueError, match="lut_dtype"):
        CompressionRule.from_dict({**LUT8.to_dict(), "lut_dtype": "int4"}, "test")
    spec = precisions()["pal4-lut8"]
    assert spec.minimum_deployment_target == "iOS18"
    assert [r.lut_dtype for r in spec.compression] == [None, "int8"]  # embedding's table fp16


# --------------------------------------------------------------- a small program


def test_small_program_chain_runs_as_coremltools_decompresses(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from wruntime.build.compress import compress_model, identify_weights, simulate
    from wruntime.executors.interpreter import InterpreterModel

    rng = np.random.default_rng(0)
    # Rows of different scales, so that one scale for all the tables matters.
    w = (rng.standard_normal((64, 256)) * rng.uniform(0.02, 1.0, (64, 1))).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 256))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=w, bias=b, name="y")

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )
    (weight,) = identify_weights(model, None)
    compressed = compress_model(model, {weight.const: LUT8})
    path = tmp_path / "joint.mlpackage"
    compressed.save(str(path))

    (chain,) = _chains(_program(path))
    assert chain.lut.shape == (4, 1, 16, 1)  # a table per group of 16 output channels
    dense = _const_values(_decompressed(path))[chain.outputs[0].name].astype(np.float64)
    fp16 = w.astype(np.float16)
    np.testing.assert_array_equal(dense, simulate(fp16, LUT8).astype(np.float64))
    plain = CompressionRule.from_dict({**LUT8.to_dict(), "lut_dtype": None}, "test")
    assert not np.array_equal(dense, simulate(fp16, plain))  # the int8 tables changed values
    rel = np.sqrt(np.mean((dense - w) ** 2) / np.mean(w.astype(np.float64) ** 2))
    assert 0.01 < rel < 0.2

    x = rng.standard_normal((3, 256)).astype(np.float32)
    got = InterpreterModel(path).predict({"x": x})["y"].astype(np.float64)
    want = x.astype(np.float64) @ dense.T + b.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# --------------------------------------------------------------- tiny.en


@pytest.fixture(scope="module")
def lut8_model(test_home):
    from wruntime.build.pipeline import ensure_model

    return ensure_model("tiny.en-pal4-lut8", progress=False)


@pytest.mark.parametrize("package", ["encoder", "decoder"])
def test_tiny_chains_decompress_as_coremltools_and_near_fp16(lut8_model, package):
    """The interpreter's plan holds exactly coremltools' weights; each is near the fp16 one."""
    from wruntime.build.pipeline import ensure_model
    from wruntime.executors.interpreter.plan import compile_function

    path = lut8_model.path / f"{package}.mlpackage"
    program = _program(path)
    chains = _chains(program)
    assert len(chains) >= {"encoder": 30, "decoder": 25}[package]
    plain = [
        op
        for f in program.functions.values()
        for op in f.operations
        if op.op_type == "constexpr_lut_to_dense" and op not in chains
    ]
    assert all(op.lut.val.shape[-2] == 256 for op in plain)  # only the embedding's tables

    reference = _decompressed(path)
    for function in program.functions:
        ours = compile_function(program, function).template
        theirs = compile_function(reference, function).template
        assert len(ours) == len(theirs)
        assert all(_template_equal(a, b) for a, b in zip(ours, theirs, strict=True)), function

    fp16 = _program(ensure_model("tiny.en-fp16", progress=False).path / f"{package}.mlpackage")
    originals: dict[tuple[int, ...], list[np.ndarray]] = {}
    for value in _const_values(fp16).values():
        if value.size >= 2048 and value.dtype == np.float16:
            originals.setdefault(value.shape, []).append(value)
    dense = _const_values(reference)
    for op in chains:
        value = dense[op.outputs[0].name].astype(np.float64)
        errors = [
            np.sqrt(np.mean((value - o) ** 2) / np.mean(o.astype(np.float64) ** 2))
            for o in originals[value.shape]
        ]
        assert min(errors) < 0.2, f"{op.name}: relative error {min(errors):.3f}"
    # simulate() predicts the package exactly (one 384 x 384 weight: k-means is the slow part).
    from wruntime.build.compress import simulate

    op = next(op for op in chains if op.outputs[0].shape[:2] == (384, 384))
    value = dense[op.outputs[0].name]
    source = min(originals[value.shape], key=lambda o: np.mean((value.astype(np.float64) - o) ** 2))
    np.testing.assert_array_equal(simulate(source, LUT8), value)


def test_tiny_lut8_is_smaller_than_pal4_and_transcribes(lut8_model):
    from conftest import CLIPS

    from wruntime import Transcriber
    from wruntime.build.model_dir import directory_size
    from wruntime.build.pipeline import ensure_model

    pal4 = directory_size(ensure_model("tiny.en-pal4", progress=False).path)
    assert directory_size(lut8_model.path) < pal4
    # The stateful decoder's functions (one per batch size) hold the decoder's chains each.
    stateful = _program(lut8_model.path / "decoder_stateful.mlpackage")
    assert len(_chains(stateful)) == len(stateful.functions) * len(
        _chains(_program(lut8_model.path / "decoder.mlpackage"))
    )

    t = Transcriber("tiny.en-pal4-lut8", executor="interpreter")
    path, reference = CLIPS["jfk"]
    text = t.transcribe(str(path), temperature=0.0).text
    words = re.findall(r"[a-z']+", text.lower())
    want = re.findall(r"[a-z']+", reference.lower())
    same = sum(a == b for a, b in zip(words, want, strict=False))
    assert same >= len(want) - 2, text
