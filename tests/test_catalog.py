"""The catalog: names, data, and where weights come from (real packages, no network)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from wruntime import catalog
from wruntime.errors import ModelNameError, WeightsError
from wruntime.weights import ModelDims

ARCHITECTURES = [
    "tiny",
    "tiny.en",
    "base",
    "base.en",
    "small",
    "small.en",
    "medium",
    "medium.en",
    "large-v3",
    "large-v3-turbo",
]
PRECISIONS = ["fp32", "fp16", "int8", "int4", "pal8", "pal6", "pal4", "pal4-lut8", "mixed", "auto"]


def test_every_name_parses_back_to_its_parts():
    names = catalog.list_model_names()
    assert len(names) == len(ARCHITECTURES) * len(PRECISIONS)
    for arch in ARCHITECTURES:
        for precision in PRECISIONS:
            spec = catalog.resolve_model_name(f"{arch}-{precision}")
            assert spec.name == f"{arch}-{precision}" in names
            assert spec.architecture.name == arch
            assert spec.precision.name == precision


def test_names_with_dots_and_dashes():
    spec = catalog.resolve_model_name("large-v3-turbo-int4")
    assert spec.architecture.name == "large-v3-turbo" and spec.precision.name == "int4"
    assert spec.dims.n_text_layer == 4 and spec.dims.n_mels == 128
    assert catalog.resolve_model_name(" Tiny.EN-FP16 ").name == "tiny.en-fp16"


@pytest.mark.parametrize("bad", ["tiny.en-int9", "huge-fp16", "tiny.en_fp16", "", "fp16", "-fp16"])
def test_unknown_names_list_the_valid_ones(bad):
    with pytest.raises(ModelNameError) as info:
        catalog.resolve_model_name(bad)
    message = str(info.value)
    assert all(a in message for a in ARCHITECTURES)
    assert all(p in message for p in PRECISIONS)
    assert "\n" not in message


def test_architecture_without_precision_says_so():
    with pytest.raises(ModelNameError, match=r"no precision: use base\.en-<precision>"):
        catalog.resolve_model_name("base.en")


def test_dims_are_openai_whispers():
    archs = catalog.architectures()
    assert list(archs) == ARCHITECTURES
    large = archs["large-v3"].dims
    assert (large.n_mels, large.n_vocab, large.n_audio_state, large.n_audio_layer) == (
        128,
        51866,
        1280,
        32,
    )
    assert archs["large-v3-turbo"].dims == ModelDims(**{**large.to_dict(), "n_text_layer": 4})
    assert archs["medium.en"].dims.n_vocab == 51864 and not archs["medium.en"].dims.is_multilingual
    assert archs["small"].dims.n_audio_head == 12 and archs["small"].dims.num_languages == 99
    assert large.num_languages == 100
    for a in archs.values():
        heads = a.alignment_heads_array
        assert heads.shape[1] == 2 and len(heads) > 0
        assert heads[:, 0].max() < a.dims.n_text_layer and heads[:, 1].max() < a.dims.n_text_head


def test_precisions_data():
    p = catalog.precisions()
    assert list(p) == PRECISIONS
    assert p["fp32"].compute_precision == "float32" and p["fp32"].compression == ()
    assert p["fp16"].compute_precision == "float16" and not p["fp16"].is_compressed
    assert p["int8"].minimum_deployment_target == "iOS17"
    int8 = p["int8"].compression[-1]
    assert (int8.target, int8.kind, int8.dtype, int8.granularity) == (
        "global",
        "linear_quantize",
        "int8",
        "per_channel",
    )
    int4 = p["int4"].compression[-1]
    assert (int4.dtype, int4.granularity, int4.block_size) == ("int4", "per_block", 32)
    assert p["int4"].minimum_deployment_target == "iOS18"
    assert [p[f"pal{n}"].compression[-1].nbits for n in (8, 6, 4)] == [8, 6, 4]
    assert p["mixed"].sensitivity is None  # a fixed recipe
    assert p["auto"].sensitivity  # chosen from measured sensitivity
    for spec in p.values():
        # Exactly one catch-all, and it comes last (first match wins).
        globals_ = [r for r in spec.compression if r.target == "global"]
        assert len(globals_) <= 1
        if globals_:
            assert spec.compression[-1] is globals_[0]


def test_catalog_data_is_reachable_from_the_package():
    """wruntime/_models (what a wheel carries) is the same data as models/."""
    here = Path(__file__).resolve().parent.parent
    data = catalog.data_dir()
    assert (data / "architectures.json").read_bytes() == (
        here / "models" / "architectures.json"
    ).read_bytes()


def test_installed_package_dims_equal_the_catalogs(tiny_weights, base_weights):
    archs = catalog.architectures()
    assert tiny_weights.dims == archs["tiny.en"].dims
    assert base_weights.dims == archs["base"].dims
    # The packages' own heads agree with openai-whisper's defaults.
    np.testing.assert_array_equal(
        tiny_weights.alignment_heads, archs["tiny.en"].alignment_heads_array
    )
    np.testing.assert_array_equal(base_weights.alignment_heads, archs["base"].alignment_heads_array)


def test_weights_are_cached_and_read_only(tiny_weights):
    again = catalog.load_architecture_weights("tiny.en")
    assert again is tiny_weights
    with pytest.raises(ValueError):
        again["decoder.ln.weight"][0] = 1.0


def test_explicit_source_and_env_var(tiny_weights, tmp_path, monkeypatch):
    model_dir = Path(tiny_weights.source).parent
    target = tmp_path / "tiny.en"
    target.mkdir()
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        (target / name).symlink_to(model_dir / name)
    w = catalog.load_architecture_weights("tiny.en", source=target)
    assert w.source == str(target.resolve() / "model.bin")
    np.testing.assert_array_equal(w["decoder.ln.weight"], tiny_weights["decoder.ln.weight"])
    monkeypatch.setenv("WRUNTIME_WEIGHTS_DIR", str(tmp_path))
    assert catalog._find_source(catalog.architecture("tiny.en"), None) == [target]
    monkeypatch.setenv(catalog.env_var_for("tiny.en"), str(target / "model.bin"))
    assert catalog._find_source(catalog.architecture("tiny.en"), None) == [target / "model.bin"]
    assert catalog.env_var_for("large-v3-turbo") == "WRUNTIME_WEIGHTS_LARGE_V3_TURBO"


def test_weights_of_another_architecture_are_refused(tiny_weights):
    model_dir = Path(tiny_weights.source).parent
    with pytest.raises(
        WeightsError, match=r"are not base\.en weights: n_audio_state 384 \(not 512\)"
    ):
        catalog.load_architecture_weights("base.en", source=model_dir)


def test_split_parts_from_env_var(base_weights, monkeypatch, tmp_path):
    parts = base_weights.source.split(" + ")
    assert len(parts) == 2
    monkeypatch.setenv("WRUNTIME_WEIGHTS_BASE", ":".join(parts))
    found = catalog._find_source(catalog.architecture("base"), None)
    assert [str(p) for p in found] == parts
    copy = tmp_path / "model.bin.part1"
    shutil.copy(parts[0], copy)
    with pytest.raises(WeightsError, match="truncated"):
        catalog.load_architecture_weights("base", source=copy)


def _run_with_deadline(fn, seconds: float):
    """Run fn in a thread; fail the test (instead of hanging) if it does not return in time."""
    outcome: list = []

    def target():
        try:
            outcome.append(("ok", fn()))
        except BaseException as e:
            outcome.append(("raised", e))

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert outcome, f"did not finish within {seconds} s"
    return outcome[0]


def test_no_weights_anywhere_fails_with_the_options(monkeypatch):
    """small has no package here and the hub is unreachable: a prompt, one-sentence error."""
    monkeypatch.delenv("WRUNTIME_WEIGHTS_SMALL", raising=False)
    monkeypatch.delenv("WRUNTIME_WEIGHTS_DIR", raising=False)
    kind, value = _run_with_deadline(lambda: catalog.load_architecture_weights("small"), 60)
    assert kind == "raised" and isinstance(value, WeightsError), value
    message = str(value)
    assert "--weights PATH" in message and "WRUNTIME_WEIGHTS_SMALL" in message
    assert "\n" not in message


def test_offline_hub_is_not_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WRUNTIME_WEIGHTS_MEDIUM_EN", raising=False)
    monkeypatch.delenv("WRUNTIME_WEIGHTS_DIR", raising=False)
    kind, value = _run_with_deadline(lambda: catalog.load_architecture_weights("medium.en"), 30)
    assert kind == "raised" and isinstance(value, WeightsError)
    assert "WRUNTIME_WEIGHTS_MEDIUM_EN" in str(value)


def test_unknown_architecture():
    with pytest.raises(ModelNameError, match=r"the architectures are tiny, tiny\.en"):
        catalog.load_architecture_weights("tiny-en")


def test_an_auto_model_name_can_carry_a_size_budget():
    """`tiny.en-auto@0.3`: the catalog's search, to 30% of fp16; `@40mb`: to 40 MB."""
    from wruntime.build.sensitivity import Budget

    auto = catalog.precisions()["auto"]
    frac = catalog.resolve_model_name("Tiny.en-auto@0.3")
    assert frac.name == "tiny.en-auto@0.3" and frac.architecture.name == "tiny.en"
    assert frac.precision.name == "auto@0.3"
    assert Budget.from_spec(frac.precision.sensitivity["budget"]) == Budget(max_fraction=0.3)
    # Everything but the budget is the catalog's auto.
    assert frac.precision.sensitivity["candidates"] == auto.sensitivity["candidates"]
    assert frac.precision.sensitivity["max_noise"] == auto.sensitivity["max_noise"]
    assert frac.precision.minimum_deployment_target == auto.minimum_deployment_target
    assert "30% of fp16" in frac.precision.description
    mb = catalog.resolve_model_name("large-v3-turbo-auto@40MB")
    assert mb.architecture.name == "large-v3-turbo"
    assert Budget.from_spec(mb.precision.sensitivity["budget"]) == Budget(max_mb=40.0)

    for bad, why in [
        ("tiny.en-int8@0.3", "fixed recipe"),
        ("tiny.en-auto@1.5", "fraction of the fp16 size below 1"),
        ("tiny.en-auto@0", "fraction of the fp16 size below 1"),
        ("tiny.en-auto@small", "fraction of the fp16 size below 1"),
        ("tiny.en-auto@0.3@0.2", "fraction of the fp16 size below 1"),
        ("tiny.xx-auto@0.3", "Unknown model 'tiny.xx-auto'"),
    ]:
        with pytest.raises(ModelNameError, match=why):
            catalog.resolve_model_name(bad)
    # The CLI names what it builds with the same form the parser reads back.
    for fraction, mb, budget in [
        (0.3, None, Budget(max_fraction=0.3)),
        (None, 40, Budget(max_mb=40)),
    ]:
        name = "tiny.en-auto" + catalog.budget_suffix(fraction, mb)
        spec = catalog.resolve_model_name(name).precision.sensitivity["budget"]
        assert Budget.from_spec(spec) == budget
