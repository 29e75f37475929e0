"""The Core ML executor, everywhere but the call into Core ML itself.

On Linux the executor runs with the MIL interpreter as its backend factory, on the real
tiny.en packages: every line around `predict` (spec-driven input casting, shape checks for
beams, output collection, states, compute units, OS checks, variant choice, the compiled
cache) is the code a Mac runs. Tests marked `macos` need the real framework and are skipped
elsewhere; with WRUNTIME_TEST_EXECUTOR=coreml on a Mac the end-to-end tests also run the
real Core ML backend and compare it with the interpreter.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wruntime.build.interface import (
    DECODER_FILE,
    ENCODER_FILE,
    MASK_NEG,
    MAX_BATCH,
    STATEFUL_DECODER_FILE,
)
from wruntime.errors import ExecutorError
from wruntime.executors import load_executor
from wruntime.executors.compiled_cache import (
    CompiledModelCache,
    CompiledModelRebuilt,
    cache_key,
    package_fingerprint,
)
from wruntime.executors.compute_units import (
    DEFAULT_COMPUTE_UNITS,
    EXPLICIT,
    STATEFUL,
    ComputeUnits,
    Host,
    check_compute_units,
    check_deployment_target,
    choose_decoder_variant,
    min_macos_for_target,
    parse_compute_units,
    parse_version,
    require_coreml,
    resolve_compute_units,
)
from wruntime.executors.coreml import (
    CoreMLBackend,
    CoreMLExecutor,
    interpreter_backend,
    read_package_info,
)

ON_MACOS = sys.platform == "darwin"
REAL_COREML = ON_MACOS and os.environ.get("WRUNTIME_TEST_EXECUTOR", "").lower() == "coreml"
macos = pytest.mark.macos
needs_macos = pytest.mark.skipif(not ON_MACOS, reason="needs the Core ML framework (macOS only)")

APPLE_SILICON_15 = Host("Darwin", (15, 1), "arm64")
APPLE_SILICON_14 = Host("Darwin", (14, 6), "arm64")
INTEL_15 = Host("Darwin", (15, 1), "x86_64")
LINUX = Host("Linux", (), "x86_64")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_dir(test_home: Path) -> Path:
    """The real tiny.en fp32 model directory, built once into the test home."""
    from wruntime.build import ensure_model

    return Path(ensure_model("tiny.en-fp32", progress=False))


@pytest.fixture(scope="session")
def backend():
    """The factory under test: the interpreter here, real Core ML on a Mac when asked."""
    return CoreMLBackend() if REAL_COREML else interpreter_backend


@pytest.fixture(scope="session")
def host():
    """The host the executor checks against: this Mac, or a current Apple-silicon one."""
    from wruntime.executors.compute_units import current_host

    return current_host() if REAL_COREML else APPLE_SILICON_15


def _pair(package: Path, backend, host) -> tuple:
    """(plain interpreter, Core ML executor) on one package.

    With the interpreter factory the executor's backend *is* a plain interpreter on the same
    package, so it doubles as the reference (loading one costs seconds); with real Core ML
    the reference is loaded separately.
    """
    wrapped = CoreMLExecutor(package, factory=backend, host=host)
    plain = load_executor(package, kind="interpreter") if REAL_COREML else wrapped.backend
    return plain, wrapped


@pytest.fixture(scope="session")
def encoder_pair(tiny_dir, backend, host):
    return _pair(tiny_dir / ENCODER_FILE, backend, host)


@pytest.fixture(scope="session")
def decoder_pair(tiny_dir, backend, host):
    return _pair(tiny_dir / DECODER_FILE, backend, host)


@pytest.fixture(scope="session")
def encoded(encoder_pair, mel) -> tuple[dict, dict]:
    """The jfk window through the plain interpreter and through the executor."""
    plain, wrapped = encoder_pair
    return plain.predict({"mel": mel}), wrapped.predict({"mel": mel})


@pytest.fixture(scope="session")
def mel() -> np.ndarray:
    from tests.conftest import CLIPS
    from wruntime.audio import load_audio
    from wruntime.features import log_mel_spectrogram

    audio = load_audio(CLIPS["jfk"][0])
    features = np.asarray(log_mel_spectrogram(audio, n_mels=80, padding=480000), np.float32)
    return np.ascontiguousarray(features[:, :3000][None])


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal through the interpreter; fp16-level agreement through real Core ML."""
    if REAL_COREML:
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05 * float(np.abs(b).max()))
    else:
        np.testing.assert_array_equal(a, b)


def _decoder_inputs(dims, cross, batch: int, tokens: list[int]) -> dict[str, np.ndarray]:
    """An explicit-cache prefill call: `tokens` at positions 0.. with an empty cache."""
    L, C, N = dims.n_text_layer, dims.n_text_state, dims.n_text_ctx
    T = len(tokens)
    mask = np.full((T, N + T), MASK_NEG, np.float32)
    mask[:, N:] = np.triu(np.full((T, T), MASK_NEG, np.float32), 1)
    return {
        "tokens": np.tile(np.asarray(tokens, np.int32), (batch, 1)),
        "positions": np.arange(T, dtype=np.int32),
        "k_cache": np.zeros((L, batch, C, N), np.float32),
        "v_cache": np.zeros((L, batch, C, N), np.float32),
        "mask": mask,
        "cross_k": cross["cross_k"],
        "cross_v": cross["cross_v"],
    }


# --------------------------------------------------------------------------- compute units


def test_compute_unit_names_parse_case_insensitively():
    assert parse_compute_units("cpu_and_ne") is ComputeUnits.CPU_AND_NE
    assert parse_compute_units("CPU-And-GPU") is ComputeUnits.CPU_AND_GPU
    assert parse_compute_units(" all ") is ComputeUnits.ALL
    assert parse_compute_units("ane") is ComputeUnits.CPU_AND_NE
    assert parse_compute_units("cpu") is ComputeUnits.CPU_ONLY
    assert str(ComputeUnits.CPU_AND_NE) == "cpu_and_ne"


def test_compute_units_names_match_coremltools():
    import coremltools as ct

    assert {u.name for u in ComputeUnits} == {u.name for u in ct.ComputeUnit}


def test_unknown_compute_units_say_what_to_choose():
    with pytest.raises(ExecutorError, match=r"Unknown compute units 'npu'; choose one of cpu_only"):
        parse_compute_units("npu")


def test_per_stage_defaults_and_overrides():
    assert resolve_compute_units() == {
        "encoder": ComputeUnits.CPU_AND_NE,
        "decoder": ComputeUnits.CPU_AND_GPU,
    }
    assert resolve_compute_units("cpu_only") == dict.fromkeys(
        DEFAULT_COMPUTE_UNITS, ComputeUnits.CPU_ONLY
    )
    assert resolve_compute_units({"decoder": "all"}) == {
        "encoder": ComputeUnits.CPU_AND_NE,
        "decoder": ComputeUnits.ALL,
    }
    assert resolve_compute_units("encoder=cpu_and_gpu, decoder=CPU_ONLY") == {
        "encoder": ComputeUnits.CPU_AND_GPU,
        "decoder": ComputeUnits.CPU_ONLY,
    }
    with pytest.raises(ExecutorError, match="Unknown stage 'vocoder'"):
        resolve_compute_units({"vocoder": "all"})
    with pytest.raises(ExecutorError, match=r"write e.g. encoder=cpu_and_ne"):
        resolve_compute_units("encoder=")


def test_versions_and_targets():
    assert parse_version("15.1.1") == (15, 1, 1)
    assert parse_version("15.0") == (15,) == parse_version("15")
    assert min_macos_for_target("iOS18") == (15,)
    assert min_macos_for_target("iOS17") == (14,)
    assert min_macos_for_target(9) == (15,)
    assert min_macos_for_target("macOS15") == (15,)
    with pytest.raises(ExecutorError, match="Unknown deployment target 'iOS99x'"):
        min_macos_for_target("iOS99x")


def test_optimization_hints_normalize_and_need_macos_15():
    import coremltools as ct

    from wruntime.executors.compute_units import parse_optimization_hints

    hints = parse_optimization_hints(
        {
            "specialization_strategy": "fast_prediction",
            "reshapeFrequency": "INFREQUENT",
            "allow_low_precision_accumulation_on_gpu": True,
        },
        APPLE_SILICON_15,
    )
    assert hints == {
        "specializationStrategy": "FastPrediction",
        "reshapeFrequency": "Infrequent",
        "allowLowPrecisionAccumulationOnGPU": True,
    }
    # The member names are the ones coremltools' enums have.
    assert ct.SpecializationStrategy[hints["specializationStrategy"]]
    assert ct.ReshapeFrequency[hints["reshapeFrequency"]]
    assert parse_optimization_hints(None, APPLE_SILICON_14) == {}
    with pytest.raises(ExecutorError, match=r"hints need macOS 15 or newer.*runs macOS 14\.6"):
        parse_optimization_hints({"reshape_frequency": "frequent"}, APPLE_SILICON_14)
    with pytest.raises(ExecutorError, match="use Frequent or Infrequent"):
        parse_optimization_hints({"reshape_frequency": "sometimes"}, APPLE_SILICON_15)
    with pytest.raises(ExecutorError, match="Unknown optimization hint 'turbo'"):
        parse_optimization_hints({"turbo": True}, APPLE_SILICON_15)


# --------------------------------------------------------------------------- clear errors


def test_core_ml_on_linux_says_use_the_interpreter():
    with pytest.raises(ExecutorError) as err:
        require_coreml(LINUX)
    assert str(err.value) == "Core ML runs only on macOS; use --executor interpreter."


@pytest.mark.skipif(ON_MACOS, reason="checks the non-macOS refusal")
def test_coreml_executor_refuses_off_macos(tiny_dir, monkeypatch):
    from wruntime.executors.coreml import BACKEND_ENV

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    with pytest.raises(ExecutorError, match=r"^Core ML runs only on macOS; use --executor"):
        load_executor(tiny_dir / ENCODER_FILE, kind="coreml")


def test_neural_engine_refused_on_intel_macs():
    with pytest.raises(ExecutorError, match=r"This Mac \(x86_64\) has no Neural Engine"):
        check_compute_units(ComputeUnits.CPU_AND_NE, INTEL_15, "encoder")
    check_compute_units(ComputeUnits.CPU_AND_GPU, INTEL_15)  # the GPU is there
    check_compute_units(ComputeUnits.CPU_AND_NE, APPLE_SILICON_14)
    with pytest.raises(ExecutorError, match="cpu_and_ne needs macOS 13"):
        check_compute_units(ComputeUnits.CPU_AND_NE, Host("Darwin", (12, 7), "arm64"))


def test_intel_macs_default_the_encoder_to_the_gpu(tiny_dir):
    from wruntime.executors.compute_units import default_compute_units

    assert default_compute_units("encoder", INTEL_15) is ComputeUnits.CPU_AND_GPU
    assert default_compute_units("encoder", APPLE_SILICON_14) is ComputeUnits.CPU_AND_NE
    assert default_compute_units("encoder", LINUX) is ComputeUnits.CPU_AND_NE
    assert default_compute_units("decoder", INTEL_15) is ComputeUnits.CPU_AND_GPU
    executor = CoreMLExecutor(tiny_dir / ENCODER_FILE, factory=interpreter_backend, host=INTEL_15)
    assert executor.compute_units is ComputeUnits.CPU_AND_GPU


def test_package_newer_than_the_os_is_refused_by_name():
    with pytest.raises(ExecutorError) as err:
        check_deployment_target("decoder_stateful.mlpackage", 9, APPLE_SILICON_14)
    assert str(err.value) == (
        "decoder_stateful.mlpackage targets iOS18 and needs macOS 15.0 or newer, but this Mac "
        "runs macOS 14.6; update macOS or build the model for an older target."
    )
    check_deployment_target("decoder.mlpackage", 8, APPLE_SILICON_14)


def test_executor_applies_the_checks_with_the_interpreter_behind_it(tiny_dir):
    with pytest.raises(ExecutorError, match="has no Neural Engine, so encoder cannot use"):
        CoreMLExecutor(
            tiny_dir / ENCODER_FILE,
            "main",
            "cpu_and_ne",
            factory=interpreter_backend,
            host=INTEL_15,
        )
    too_old = Host("Darwin", (13, 6), "arm64")
    with pytest.raises(ExecutorError, match=r"encoder.mlpackage targets iOS1[78] and needs macOS"):
        CoreMLExecutor(
            tiny_dir / ENCODER_FILE, "main", "cpu_only", factory=interpreter_backend, host=too_old
        )
    with pytest.raises(ExecutorError, match="fp16 emulation is an interpreter option"):
        CoreMLExecutor(tiny_dir / ENCODER_FILE, factory=interpreter_backend, fp16_emulation=True)
    with pytest.raises(ExecutorError, match="has no function 'batch3'"):
        CoreMLExecutor(tiny_dir / DECODER_FILE, "batch3", factory=interpreter_backend, host=LINUX)


# --------------------------------------------------------------------------- decoder variant


def test_decoder_variant_follows_the_os_version():
    both = {EXPLICIT: "iOS17", STATEFUL: "iOS18"}
    assert choose_decoder_variant(both, (15, 0)) == STATEFUL
    assert choose_decoder_variant(both, (26, 1)) == STATEFUL
    assert choose_decoder_variant(both, (14, 6)) == EXPLICIT
    assert choose_decoder_variant(both, None) == STATEFUL  # interpreter: no OS constraint
    assert choose_decoder_variant({EXPLICIT: "iOS17"}, (15, 1)) == EXPLICIT
    assert choose_decoder_variant(both, (15, 1), prefer=EXPLICIT) == EXPLICIT
    with pytest.raises(ExecutorError, match=r"stateful decoder needs macOS 15.0 or newer"):
        choose_decoder_variant(both, (14, 6), prefer=STATEFUL)
    with pytest.raises(ExecutorError, match="has no stateful decoder"):
        choose_decoder_variant({EXPLICIT: "iOS17"}, (15, 1), prefer=STATEFUL)
    with pytest.raises(ExecutorError, match=r"Every decoder in this model needs macOS 15.0"):
        choose_decoder_variant({STATEFUL: "iOS18"}, (14, 6))


def test_decoder_variant_from_the_real_directory(tiny_dir):
    from wruntime.build import load_model_dir
    from wruntime.executors.coreml import decoder_variant_for_directory

    manifest = load_model_dir(tiny_dir).manifest
    has_stateful = "decoder_stateful" in manifest["packages"]
    assert has_stateful == (tiny_dir / STATEFUL_DECODER_FILE).is_dir()
    for source in (manifest, None):  # the manifest's targets, or each package's spec
        assert decoder_variant_for_directory(tiny_dir, (14, 6), source) == EXPLICIT
        assert decoder_variant_for_directory(tiny_dir, (15, 1), source) == (
            STATEFUL if has_stateful else EXPLICIT
        )
    # The manifest is what decides: a directory whose stateful decoder targets a newer OS.
    newer = {**manifest, "packages": {**manifest["packages"]}}
    newer["packages"]["decoder_stateful"] = {
        **manifest["packages"].get("decoder_stateful", {"file": STATEFUL_DECODER_FILE}),
        "deployment_target": "iOS26",
    }
    assert decoder_variant_for_directory(tiny_dir, (15, 1), newer) == EXPLICIT
    assert decoder_variant_for_directory(tiny_dir, (26, 0), newer) == STATEFUL


# --------------------------------------------------------------------------- end to end


def test_encoder_matches_the_plain_interpreter(encoded):
    want, got = encoded
    assert set(got) == {"cross_k", "cross_v"}
    for name in got:
        assert got[name].dtype == np.float32
        _close(got[name], want[name])


def test_inputs_are_cast_to_the_spec_dtypes(encoded, decoder_pair, tiny_weights):
    plain, decoder = decoder_pair
    cross = encoded[1]
    inputs = _decoder_inputs(tiny_weights.dims, cross, 2, [50257, 50362])
    feed = decoder.prepare_inputs(
        {
            **inputs,
            # What a caller naturally has: int64 tokens, a Python list, a float64 mask,
            # a non-contiguous (Fortran-ordered) cache.
            "tokens": inputs["tokens"].astype(np.int64),
            "positions": inputs["positions"].tolist(),
            "mask": inputs["mask"].astype(np.float64),
            "k_cache": np.asfortranarray(inputs["k_cache"]),
        }
    )
    for name, desc in decoder.input_descriptions.items():
        assert feed[name].dtype == desc.dtype, name
        assert feed[name].flags.c_contiguous, name
    assert feed["tokens"].dtype == np.int32
    want = plain.predict(inputs)
    got = decoder.predict(feed)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape
        _close(got[name], want[name])
    # Both beams got the same prompt, so the same logits.
    _close(got["logits"][0], got["logits"][1])


def test_beam_batches_outside_the_declared_range_are_refused(decoder_pair, tiny_weights):
    _, decoder = decoder_pair
    desc = decoder.input_descriptions["tokens"]
    assert desc.ranges is not None and desc.ranges[0] == (1, MAX_BATCH)
    fake_cross = {
        "cross_k": np.zeros(decoder.input_descriptions["cross_k"].shape, np.float32),
        "cross_v": np.zeros(decoder.input_descriptions["cross_v"].shape, np.float32),
    }
    inputs = _decoder_inputs(tiny_weights.dims, fake_cross, MAX_BATCH + 1, [50257])
    with pytest.raises(
        ExecutorError,
        match=rf"input 'tokens' has size {MAX_BATCH + 1} in dim.*beam batch must be 1 to {MAX_BATCH}\)",
    ):
        decoder.predict(inputs)
    with pytest.raises(ExecutorError, match=r"got the wrong inputs \(missing mask; unknown msk\)"):
        decoder.predict({**{k: v for k, v in inputs.items() if k != "mask"}, "msk": 0})
    with pytest.raises(ExecutorError, match="must hold integers, not floats"):
        decoder.predict({**inputs, "tokens": inputs["tokens"].astype(np.float32)})
    with pytest.raises(ExecutorError, match="is stateless"):
        decoder.make_state()


def test_stateful_decoder_through_the_executor(tiny_dir, encoded, backend, host):
    if not (tiny_dir / STATEFUL_DECODER_FILE).is_dir():
        pytest.skip("this model directory has no stateful decoder")
    if host.os_version and host.os_version < (15,):
        pytest.skip("the stateful decoder needs macOS 15")
    cross = encoded[1]
    plain = load_executor(tiny_dir / STATEFUL_DECODER_FILE, kind="interpreter")
    wrapped = CoreMLExecutor(tiny_dir / STATEFUL_DECODER_FILE, factory=backend, host=host)
    assert wrapped.is_stateful
    N = plain.description.states[0].shape[-1]
    mask = np.full((2, N), MASK_NEG, np.float32)
    mask[0, :1] = 0
    mask[1, :2] = 0
    inputs = {
        "tokens": np.array([[50257, 50362]], np.int32),
        "positions": np.arange(2, dtype=np.int32),
        "beam_order": np.zeros(1, np.int32),
        "mask": mask,
        **cross,
    }
    state = wrapped.make_state()
    want = plain.predict(inputs, plain.make_state())
    got = wrapped.predict(inputs, state)
    for name in want:
        _close(got[name], want[name])
    with pytest.raises(ExecutorError, match="is stateful; pass the state"):
        wrapped.predict(inputs)
    # The batch-5 function of the same package: its own fixed batch, its own state.
    batch5 = CoreMLExecutor(tiny_dir / STATEFUL_DECODER_FILE, "batch5", factory=backend, host=host)
    assert wrapped.info.is_multifunction and batch5.function_name == "batch5"
    inputs5 = {
        **inputs,
        "tokens": np.repeat(inputs["tokens"], 5, axis=0),
        "beam_order": np.arange(5, dtype=np.int32),
    }
    with pytest.raises(ExecutorError, match="state made by another executor"):
        batch5.predict(inputs5, state)
    with pytest.raises(ExecutorError, match=r"'tokens' has .*fixed beam batch of 5\)"):
        batch5.predict(inputs, batch5.make_state())
    out5 = batch5.predict(inputs5, batch5.make_state())
    assert out5["logits"].shape[0] == 5
    # Same prompt in every row; a different batch size may sum in another order (BLAS).
    if REAL_COREML:
        _close(out5["logits"][3], got["logits"][0])
    else:
        np.testing.assert_allclose(out5["logits"][3], got["logits"][0], rtol=1e-3, atol=1e-3)


def test_default_compute_units_per_stage(encoder_pair, decoder_pair):
    assert encoder_pair[1].compute_units is ComputeUnits.CPU_AND_NE
    assert decoder_pair[1].compute_units is ComputeUnits.CPU_AND_GPU
    assert encoder_pair[1].load_info.compute_units is ComputeUnits.CPU_AND_NE


def test_load_executor_routes_coreml_with_options(tiny_dir):
    executor = load_executor(
        tiny_dir / DECODER_FILE,
        kind="coreml",
        compute_units="cpu_only",
        factory=interpreter_backend,
        host=APPLE_SILICON_14,
    )
    assert isinstance(executor, CoreMLExecutor)
    assert executor.compute_units is ComputeUnits.CPU_ONLY
    assert executor.load_info.backend == "interpreter"
    assert executor.load_info.load_seconds > 0
    report = executor.load_info.as_dict()
    assert report["compute_units"] == "CPU_ONLY" and report["load"] == "warm"


def test_backend_env_routes_the_default_factory(tiny_dir, monkeypatch):
    from wruntime.executors.coreml import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "interpreter")
    executor = load_executor(tiny_dir / ENCODER_FILE, kind="coreml", compute_units="cpu_only")
    assert isinstance(executor, CoreMLExecutor)
    assert executor.load_info.backend == "interpreter"
    monkeypatch.setenv(BACKEND_ENV, "metal")
    with pytest.raises(ExecutorError, match=r"WRUNTIME_COREML_BACKEND='metal' is not a backend"):
        load_executor(tiny_dir / ENCODER_FILE, kind="coreml")


# --------------------------------------------------------------------------- compiled cache


@pytest.fixture
def package_copy(tiny_dir, tmp_path) -> Path:
    """A real package in a scratch model directory (the encoder: the small one)."""
    model = tmp_path / "model"
    model.mkdir()
    return Path(shutil.copytree(tiny_dir / ENCODER_FILE, model / ENCODER_FILE))


def _fake_entry(path: Path) -> Path:
    """A directory standing where a compiled model would be (keying never opens it)."""
    path.mkdir(parents=True)
    (path / "coremldata.bin").write_bytes(b"\0" * 16)
    return path


def test_cache_key_and_entry_names(package_copy):
    cache = CompiledModelCache.for_model_dir(package_copy.parent, (15, 1), "9.0")
    assert cache.key == cache_key((15, 1), "9.0") == "macos-15.1-coremltools-9.0"
    assert cache_key((15,), "9.0b1") == "macos-15.0-coremltools-9.0b1"
    fingerprint = package_fingerprint(package_copy)
    entry = cache.entry_path(package_copy)
    assert entry == package_copy.parent / "compiled" / cache.key / f"encoder-{fingerprint}.mlmodelc"
    other_os = CompiledModelCache.for_model_dir(package_copy.parent, (15, 2), "9.0")
    assert other_os.entry_path(package_copy).parent != entry.parent


def test_fingerprint_follows_content_not_location(package_copy, tmp_path):
    before = package_fingerprint(package_copy)
    moved = Path(shutil.copytree(package_copy, tmp_path / "elsewhere" / package_copy.name))
    assert package_fingerprint(moved) == before
    spec = next(moved.rglob("model.mlmodel"))
    spec.write_bytes(spec.read_bytes() + b"\0")
    assert package_fingerprint(moved) != before


def test_staging_renames_into_place_and_leaves_nothing_on_failure(package_copy):
    cache = CompiledModelCache.for_model_dir(package_copy.parent, (15, 1), "9.0")
    with pytest.raises(RuntimeError, match="compiler crashed"), cache.staging(package_copy) as t:
        _fake_entry(t)
        raise RuntimeError("compiler crashed")
    assert cache.lookup(package_copy) is None
    assert list(cache.root.iterdir()) == []  # no .tmp-*, no half entry

    with (
        pytest.raises(ExecutorError, match=r"produced no \.mlmodelc directory"),
        cache.staging(package_copy),
    ):
        pass
    assert list(cache.root.iterdir()) == []

    with cache.staging(package_copy) as target:
        assert not target.exists() and target.parent.name.startswith(".tmp-")
        _fake_entry(target)
    assert cache.lookup(package_copy) == cache.entry_path(package_copy)
    assert [p.name for p in cache.root.iterdir()] == [cache.key]

    # A concurrent process installed it meanwhile: its copy stays, ours is dropped.
    marker = cache.entry_path(package_copy) / "winner"
    marker.write_text("first")
    with cache.staging(package_copy) as target:
        _fake_entry(target)
    assert marker.read_text() == "first"
    assert [p.name for p in cache.root.iterdir()] == [cache.key]


def test_a_cached_entry_is_used_without_compiling(package_copy):
    cache = CompiledModelCache.for_model_dir(package_copy.parent, (15, 1), "9.0")
    with cache.staging(package_copy) as target:
        _fake_entry(target)
    # The default compiler is Core ML's, which raises off macOS: a hit must not call it.
    outcome = cache.ensure(package_copy)
    assert outcome.compiled is False
    assert outcome.path == cache.entry_path(package_copy)


def test_other_os_and_coremltools_versions_are_ignored_and_pruned(package_copy):
    model = package_copy.parent
    old = CompiledModelCache.for_model_dir(model, (14, 6), "8.3")
    with old.staging(package_copy) as target:
        _fake_entry(target)
    cache = CompiledModelCache.for_model_dir(model, (15, 1), "9.0")
    assert cache.lookup(package_copy) is None
    assert cache.stale_entries(package_copy) == [old.entry_path(package_copy)]

    # An older build of the package under the current key, a crashed and a live compile.
    outdated = _fake_entry(cache.key_dir / "encoder-000000000000.mlmodelc")
    (cache.key_dir / "encoder-000000000000.json").write_text("{}")
    other_package = _fake_entry(cache.key_dir / "decoder-111111111111.mlmodelc")
    crashed = _fake_entry(cache.root / ".tmp-crashed")
    live = _fake_entry(cache.root / ".tmp-live")
    an_hour_ago = time.time() - 2 * 3600
    os.utime(crashed, (an_hour_ago, an_hour_ago))

    removed = cache.prune(package_copy)
    assert set(removed) == {old.key_dir, outdated, crashed}
    assert not old.key_dir.exists() and not outdated.exists() and not crashed.exists()
    assert not (cache.key_dir / "encoder-000000000000.json").exists()
    assert other_package.is_dir() and live.is_dir()


@pytest.mark.skipif(ON_MACOS, reason="off macOS the real compiler must fail cleanly")
def test_failed_compile_warns_about_the_rebuild_and_leaves_nothing(package_copy):
    model = package_copy.parent
    old = CompiledModelCache.for_model_dir(model, (14, 6), "8.3")
    with old.staging(package_copy) as target:
        _fake_entry(target)
    cache = CompiledModelCache.for_model_dir(model, (15, 1), "9.0")
    with (
        pytest.warns(CompiledModelRebuilt, match="from another macOS, coremltools or build"),
        pytest.raises(ExecutorError, match=r"^Core ML could not compile encoder\.mlpackage \("),
    ):
        cache.ensure(package_copy)
    assert not cache.key_dir.exists()
    assert not any(p.name.startswith(".tmp-") for p in cache.root.iterdir())
    assert old.lookup(package_copy) is not None  # nothing pruned before a successful compile


def test_load_records_round_trip(package_copy):
    cache = CompiledModelCache.for_model_dir(package_copy.parent, (15, 1), "9.0")
    with cache.staging(package_copy) as target:
        _fake_entry(target)
    entry = cache.entry_path(package_copy)
    assert cache.read_record(entry) == {}
    cache.write_record(entry, {"compile_seconds": 1.5})
    cache.write_record(entry, {"first_load_seconds": 4.0})
    assert cache.read_record(entry) == {"compile_seconds": 1.5, "first_load_seconds": 4.0}


def test_package_info_reads_the_spec(tiny_dir):
    info = read_package_info(tiny_dir / DECODER_FILE)
    assert info.specification_version >= 8
    assert not info.is_multifunction and info.default_function == "main"
    names = [d.name for d in info.functions["main"].inputs]
    assert names[:2] == ["tokens", "positions"]
    with pytest.raises(ExecutorError, match=r"is not a saved .mlpackage"):
        read_package_info(tiny_dir)


# --------------------------------------------------------------------------- macOS only


@macos
@needs_macos
def test_real_compile_is_cached_and_loads_warm(package_copy, mel):
    from wruntime.executors.compute_units import current_host

    here = current_host()
    first = CoreMLExecutor(package_copy, "main", "cpu_only", host=here)
    assert first.load_info.compiled and first.load_info.compile_seconds > 0
    compiled = first.load_info.compiled_path
    assert compiled.is_dir()
    assert (
        compiled.parent
        == CompiledModelCache.for_model_dir(package_copy.parent, here.os_version).key_dir
    )
    warm = CoreMLExecutor(package_copy, "main", "cpu_only", host=here)
    assert not warm.load_info.compiled and warm.load_info.compiled_path == compiled
    assert warm.load_info.first_load_seconds == pytest.approx(first.load_info.first_load_seconds)
    out = warm.predict({"mel": mel})
    assert out["cross_k"].dtype == np.float32 and np.isfinite(out["cross_k"]).all()


# --------------------------------------------------------------------------- transcription


@pytest.fixture(scope="module")
def transcribers(tiny_dir):
    """The same directory opened through `--executor coreml` and `--executor interpreter`."""
    from wruntime.executors.coreml import BACKEND_ENV
    from wruntime.transcribe import Transcriber

    # Set for as long as the transcribers live: the stateful decoder's functions load lazily.
    saved = os.environ.get(BACKEND_ENV)
    if not REAL_COREML:  # the Core ML executor's path, with the interpreter answering predict
        os.environ[BACKEND_ENV] = "interpreter"
    try:
        yield (
            Transcriber(tiny_dir, executor="coreml"),
            Transcriber(tiny_dir, executor="interpreter"),
        )
    finally:
        if saved is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = saved


@pytest.mark.slow
@pytest.mark.parametrize("clip", ["jfk", "belly", "experience"])
def test_transcripts_through_the_coreml_path_match_the_interpreter(transcribers, clip):
    from tests.conftest import CLIPS

    through_coreml, plain = transcribers
    model = through_coreml.runtime.model
    assert isinstance(model.encoder, CoreMLExecutor)
    assert isinstance(model.decoder, CoreMLExecutor)
    assert model.encoder.compute_units is ComputeUnits.CPU_AND_NE
    assert model.decoder.compute_units is ComputeUnits.CPU_AND_GPU
    got = through_coreml.transcribe(CLIPS[clip][0])
    want = plain.transcribe(CLIPS[clip][0])
    assert got.text.strip()
    assert got.text == want.text
    assert [(s.start, s.end) for s in got.segments] == [(s.start, s.end) for s in want.segments]
    stateful = model.stateful_decoder(1)  # loaded by the decoding if the directory has one
    assert stateful is None or (isinstance(stateful, CoreMLExecutor) and stateful.is_stateful)
