"""Compression recipes on the real tiny.en packages, and the interpreter running them.

Every constexpr op a recipe emits is decompressed three ways and compared:
coremltools' own decompression (`materialized_val_inference`, what the
interpreter materialises at load), an independent numpy decompression written
here from the op's documented semantics (affine, blockwise shift-scale, LUT in
its iOS 16 packed and iOS 18 grouped forms), and the original fp16 weight of the
same constant (within the recipe's expected error). Then the compressed model
directories transcribe real speech through the interpreter.

Built directories are cached under the test home: the first run builds tiny.en
in several precisions (minutes on a loaded machine), later runs take seconds.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from wruntime.catalog import CompressionRule, precisions

pytestmark = pytest.mark.filterwarnings("ignore")

#: Precision -> the largest relative RMS error of a decompressed weight vs fp16.
RECIPES = {"int8": 0.04, "int4": 0.25, "pal4": 0.2, "pal6": 0.05}


def _model(name: str):
    from wruntime.build.pipeline import ensure_model

    return ensure_model(name, progress=False)


def _program(path: Path):
    from wruntime.build.convert import load_program

    return load_program(path)


# --------------------------------------------------------------- independent numpy


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Sub-byte integers packed least significant bit first (Core ML's weight format)."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8).reshape(-1), bitorder="little")
    bits = bits[: count * nbits].reshape(count, nbits)
    return (bits * (1 << np.arange(nbits))).sum(axis=1)


def _expand(small: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat each entry of a per-block tensor over its block."""
    out = np.asarray(small)
    for axis, (n, m) in enumerate(zip(shape, out.shape, strict=True)):
        out = np.repeat(out, n // m, axis=axis)
    return out


def _numpy_decompress(op) -> np.ndarray:
    val = {k: v.val for k, v in op.inputs.items()}
    kind = op.op_type
    if kind == "constexpr_affine_dequantize":
        q = val["quantized_data"].astype(np.float64)
        shape = [1] * q.ndim
        shape[int(val["axis"])] = -1
        zp = np.asarray(val["zero_point"], dtype=np.float64)
        scale = np.asarray(val["scale"], dtype=np.float64)
        zp = zp.reshape(shape) if zp.ndim else zp
        scale = scale.reshape(shape) if scale.ndim else scale
        return (q - zp) * scale
    if kind == "constexpr_blockwise_shift_scale":
        data = val["data"].astype(np.float64)
        scale = _expand(val["scale"].astype(np.float64), data.shape)
        offset = val.get("offset")
        if offset is not None:
            data = data - _expand(np.asarray(offset, dtype=np.float64), data.shape)
        return data * scale
    if kind == "constexpr_lut_to_dense" and "shape" in val:  # iOS 16/17 form
        lut, shape = val["lut"].astype(np.float64), tuple(int(s) for s in val["shape"])
        nbits = int(np.log2(lut.shape[-1]))
        idx = _unpack_bits(val["indices"], nbits, int(np.prod(shape)))
        return lut[idx].reshape(shape)
    if kind == "constexpr_lut_to_dense":  # iOS 18 form: per-group tables
        indices, lut = np.asarray(val["indices"]).astype(np.int64), val["lut"].astype(np.float64)
        assert lut.shape[-1] == 1, "vector palettization is not used by any recipe"
        groups = lut.shape[: indices.ndim]
        blocks = [n // g for n, g in zip(indices.shape, groups, strict=True)]
        grid = np.indices(indices.shape)
        group_idx = tuple(grid[d] // blocks[d] for d in range(indices.ndim))
        return lut[(*group_idx, indices, 0)]
    raise AssertionError(f"no numpy decompression for {kind}")


# --------------------------------------------------------------- units


def test_weights_are_identified_by_value(tiny_weights):
    from wruntime.build.compress import identify_weights

    fp16 = _model("tiny.en-fp16")
    enc = {
        w.layer: w
        for w in identify_weights(_program(fp16.path / "encoder.mlpackage"), tiny_weights)
    }
    assert enc["encoder.conv1.weight"].shape == (384, 80, 1, 3)
    assert enc["encoder.positional_embedding"].segments[0].transposed
    assert enc["encoder.blocks.0.attn.query.weight"].segments[0].scale == pytest.approx(0.125)
    assert "decoder.blocks.3.cross_attn.value.weight" in enc  # cross K/V live in the encoder
    assert len(enc) == 2 + 1 + 4 * 6 + 2 * 4
    dec = identify_weights(_program(fp16.path / "decoder.mlpackage"), tiny_weights)
    layers = [w.layer for w in dec]
    fused = "+".join(f"decoder.blocks.0.attn.{k}.weight" for k in ("query", "key", "value"))
    assert fused in layers
    chunks = [x for x in layers if x.startswith("decoder.token_embedding.weight[")]
    assert chunks[0] == "decoder.token_embedding.weight[0:768]" and len(chunks) == 6
    special = next(w for w in dec if w.const == "token_embedding_special_rows")
    assert special.layer == "decoder.token_embedding.weight[50256:51864]" == chunks[-1]
    assert all(w.segments for w in dec), "every decoder weight matched a canonical one"
    stateful = identify_weights(_program(fp16.path / "decoder_stateful.mlpackage"), tiny_weights)
    assert {w.layer for w in stateful} == set(layers)  # the same keys for per-layer choices


def test_rules_fall_back_where_a_shape_cannot_take_them():
    from wruntime.build.compress import PackageWeight, effective_rule, rule_bits, rule_label

    int4 = CompressionRule.from_dict(
        {
            "target": "global",
            "kind": "linear_quantize",
            "dtype": "int4",
            "mode": "linear_symmetric",
            "granularity": "per_block",
            "block_size": 32,
        },
        "test",
    )
    conv1 = PackageWeight("c", (384, 80, 1, 3), ("conv",))
    fc = PackageWeight("f", (1536, 384, 1, 1), ("conv",))
    assert rule_label(effective_rule(int4, conv1)) == "int8"
    assert rule_label(effective_rule(int4, fc)) == "int4/32"
    assert rule_bits(int4, fc) == pytest.approx(4.5)  # one fp16 scale per 32 weights
    pal4 = CompressionRule.from_dict(
        {
            "target": "global",
            "kind": "palettize",
            "nbits": 4,
            "mode": "kmeans",
            "granularity": "per_grouped_channel",
            "group_size": 16,
        },
        "test",
    )
    odd = PackageWeight("o", (100, 384, 1), ("conv",))
    assert rule_label(effective_rule(pal4, odd)) == "pal4"
    assert rule_label(effective_rule(pal4, PackageWeight("s", (8, 8), ("conv",)))) == "fp16"


def test_recipes_match_by_canonical_name(tiny_weights):
    from wruntime.build.compress import identify_weights, plan_package, rule_label

    fp16 = _model("tiny.en-fp16")
    found = identify_weights(_program(fp16.path / "decoder.mlpackage"), tiny_weights)
    plan = plan_package(found, precisions()["mixed"].compression)
    by_layer = {w.layer: rule_label(r) for w, r in plan.values()}
    assert by_layer["decoder.blocks.1.mlp.0.weight"] == "pal4/g16"
    assert by_layer["decoder.blocks.1.attn.out.weight"] == "int8"
    assert by_layer["decoder.positional_embedding"] == "fp16"
    assert by_layer["decoder.token_embedding.weight[0:768]"] == "int8"


# --------------------------------------------------------------- packages


@pytest.mark.parametrize("precision", sorted(RECIPES))
def test_every_constexpr_decompresses_as_coremltools_and_near_fp16(precision):
    fp16 = _model("tiny.en-fp16")
    model = _model(f"tiny.en-{precision}")
    kinds: set[str] = set()
    checked = 0
    for package in ("encoder.mlpackage", "decoder.mlpackage"):
        # Constant names are generated per build, so each compressed weight is paired
        # with the fp16 constant of its shape that it is closest to (another layer of
        # the same shape is ~100% away; the right one is within the recipe's error).
        originals: dict[tuple[int, ...], list[np.ndarray]] = {}
        for op in _program(fp16.path / package).functions["main"].operations:
            value = op.outputs[0].val if op.op_type == "const" else None
            if isinstance(value, np.ndarray) and value.size > 1:
                originals.setdefault(value.shape, []).append(value.astype(np.float64))
        for op in _program(model.path / package).functions["main"].operations:
            if not op.op_type.startswith("constexpr_"):
                continue
            kinds.add(op.op_type)
            theirs = np.asarray(op.materialized_val_inference(), dtype=np.float64)
            ours = _numpy_decompress(op)
            np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-6, err_msg=op.name)
            candidates = originals.get(theirs.shape, [])
            assert candidates, f"{op.name}: no fp16 weight of shape {theirs.shape}"
            rel = min(
                np.sqrt(np.mean((theirs - original) ** 2) / np.mean(original**2))
                for original in candidates
            )
            assert rel < RECIPES[precision], f"{op.name}: relative error {rel:.3f}"
            checked += 1
    assert checked >= 30
    expected = {
        "int8": {"constexpr_affine_dequantize"},
        "int4": {"constexpr_blockwise_shift_scale"},
        "pal4": {"constexpr_lut_to_dense"},
        "pal6": {"constexpr_lut_to_dense"},
    }[precision]
    assert expected <= kinds


@pytest.mark.parametrize("precision", ["int8", "int4", "pal4"])
def test_compressed_models_transcribe_through_the_interpreter(precision):
    from conftest import CLIPS

    from wruntime import Transcriber

    _model(f"tiny.en-{precision}")
    t = Transcriber(f"tiny.en-{precision}", executor="interpreter")
    path, reference = CLIPS["jfk"]
    text = t.transcribe(str(path), temperature=0.0).text
    words = re.findall(r"[a-z']+", text.lower())
    want = re.findall(r"[a-z']+", reference.lower())
    same = sum(a == b for a, b in zip(words, want, strict=False))
    assert same >= len(want) - 2, text


def test_compressed_directory_is_smaller_in_proportion():
    from wruntime.build.model_dir import directory_size

    fp16 = directory_size(_model("tiny.en-fp16").path)
    int8 = directory_size(_model("tiny.en-int8").path)
    int4 = directory_size(_model("tiny.en-int4").path)
    assert 0.45 < int8 / fp16 < 0.6
    assert int4 < int8


def test_kmeans_tables_are_optimal_deterministic_and_fast(tiny_weights):
    """Our k-means palettization (exact 1-D k-means) beats scikit-learn's on real rows.

    coremltools' own "kmeans" mode (scikit-learn, random restarts) is what a table
    per vocabulary row would otherwise take hours with; ours must be at least as
    accurate, identical from run to run (multifunction packages deduplicate equal
    weights) and give one table per row of the tied embedding in seconds.
    """
    import time

    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    from wruntime.build.compress import _EXACT_VALUES, OptimalLut, simulate

    emb = tiny_weights["decoder.token_embedding.weight"][:2048].astype(np.float16)
    rows = emb[:48]

    def err(q: np.ndarray, ref: np.ndarray) -> float:
        ref = ref.astype(np.float32)
        return float(np.sum((q.astype(np.float32) - ref) ** 2) / np.sum(ref**2))

    theirs = palettize_weights.decompress(
        palettize_weights.grouped_channelwise_compress(rows, "KMEANS", 4, 0, 16)
    )
    rule = CompressionRule.from_dict(
        {"target": "global", "kind": "palettize", "nbits": 4, "mode": "kmeans",
         "granularity": "per_grouped_channel", "group_size": 16},
        "test",
    )  # fmt: skip
    ours = simulate(rows, rule)
    assert err(ours, rows) <= err(theirs, rows) * 1.0001
    assert np.array_equal(ours, simulate(rows, rule))

    per_row = CompressionRule.from_dict(
        {"target": "global", "kind": "palettize", "nbits": 4, "mode": "kmeans",
         "granularity": "per_grouped_channel", "group_size": 1},
        "test",
    )  # fmt: skip
    started = time.perf_counter()
    q = simulate(emb, per_row)
    assert time.perf_counter() - started < 60  # scikit-learn: minutes for these 2048 rows
    for i in (0, 777, 2047):  # every row uses at most 16 values, its own
        assert len(np.unique(q[i])) <= 16
    assert err(q, emb) < 0.7 * err(simulate(emb, rule), emb)  # a table per row is finer

    lut, idx = OptimalLut(2)(np.array([1.0, 1.0, 2.0], np.float16))  # fewer values than entries
    assert lut.shape == (4,) and np.array_equal(lut[idx], [1.0, 1.0, 2.0])

    # A large tensor's 8-bit table (past what kmeans1d solves quickly and in memory) comes
    # from weighted k-means over its distinct values: still 256 levels, and far finer
    # than the exact 6-bit table of the same values.
    big = tiny_weights["decoder.token_embedding.weight"][:800].astype(np.float16)
    lut8, idx8 = OptimalLut(8)(big)
    lut6, idx6 = OptimalLut(6)(big)
    assert lut8.shape == (256,) and idx8.max() < 256 and big.size > _EXACT_VALUES
    assert err(lut8[idx8], big.ravel()) < 0.5 * err(lut6[idx6], big.ravel())

    # Solved tables are remembered (a build meets each decoder weight once per function),
    # and what a caller gets back is its own copy.
    first = OptimalLut(4)(rows[0])
    first[1][:] = 0
    again = OptimalLut(4)(rows[0])
    solved = OptimalLut(4)._solve(np.ascontiguousarray(rows[0]).ravel())
    assert np.array_equal(again[0], solved[0]) and np.array_equal(again[1], solved[1])


def test_the_manifest_records_what_each_weight_became():
    """A model says per layer what it is made of (`wruntime inspect`), fallbacks included."""
    from wruntime.build.pipeline import inspect_model

    model = _model("tiny.en-int4")
    record = model.manifest["compression"]
    layers = record["layers"]
    assert layers["encoder.blocks.0.mlp.0.weight"] == "int4/32"
    assert layers["decoder.token_embedding.weight[0:768]"] == "int8"  # the recipe's rule
    assert layers["encoder.conv1.weight"] == "int8"  # 80 mel inputs cannot take blocks of 32
    assert record["seconds"] > 0
    summary = inspect_model("tiny.en-int4")["compression"]
    assert sum(summary["weights_per_rule"].values()) == len(layers)
    assert set(summary["weights_per_rule"]) == {"int4/32", "int8"}
    assert "compression" not in _model("tiny.en-fp16").manifest


def test_an_auto_model_builds_from_a_choice_made_elsewhere(tmp_path):
    """`build_model(choices=)`: the per-layer rules a caller chose (on its own clips or
    budget: `sensitivity --build`, the compression benchmark) are what the model stores,
    and nothing is measured at build time."""
    from wruntime.build.model_dir import load_model_dir, wruntime_home
    from wruntime.build.pipeline import build_model

    int8 = CompressionRule.from_dict(
        {
            "target": "global",
            "kind": "linear_quantize",
            "dtype": "int8",
            "mode": "linear_symmetric",
            "granularity": "per_channel",
        },
        "test",
    )
    chosen = ["encoder.blocks.0.mlp.0.weight", "decoder.blocks.1.attn.out.weight"]
    tables = wruntime_home() / "sensitivity"
    before = sorted(tables.glob("*")) if tables.is_dir() else []
    path = build_model(
        "tiny.en-auto@0.3", dest=tmp_path / "auto", choices=dict.fromkeys(chosen, int8)
    )
    after = sorted(tables.glob("*")) if tables.is_dir() else []
    assert after == before  # no sensitivity pass ran
    model = load_model_dir(path)
    layers = model.manifest["compression"]["layers"]
    # The chosen layers, and the control tokens' rows the catalog's auto fixes at int8.
    special = "decoder.token_embedding.weight[50256:51864]"
    assert {k: v for k, v in layers.items() if v != "fp16"} == dict.fromkeys(
        [*chosen, special], "int8"
    )
    assert len(layers) > 50  # every compressible weight is accounted for, kept ones too
    assert model.name == "tiny.en-auto@0.3"
