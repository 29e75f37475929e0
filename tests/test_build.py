"""The builder: saved packages match the interface, the model directory protects itself,
failed builds leave nothing, and the packages compute what the numpy oracle computes.

The tiny.en directories are built once into the test home (conftest) and reused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from wruntime.build import (
    ModelDirectory,
    build_model,
    ensure_model,
    inspect_model,
    list_models,
    load_model_dir,
    remove_model,
)
from wruntime.build import interface as io
from wruntime.build.decoder import vocab_chunks
from wruntime.build.model_dir import STAMP_FILE, wruntime_home
from wruntime.errors import ModelDirectoryError, WruntimeError
from wruntime.weights.canonical import WhisperWeights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def fp16_dir(test_home, tiny_weights) -> ModelDirectory:
    return ensure_model("tiny.en-fp16", weights=tiny_weights, progress=False)


@pytest.fixture(scope="session")
def fp32_dir(test_home, tiny_weights) -> ModelDirectory:
    return ensure_model("tiny.en-fp32", weights=tiny_weights, progress=False)


def _expected_io(dims) -> dict[str, dict[str, dict[str, tuple]]]:
    """package role -> function -> {name: (shape with [lo, hi] ranges, dtype)}, from the contract."""
    L, C, S, N = dims.n_text_layer, dims.n_text_state, dims.n_audio_ctx, dims.n_text_ctx
    b, t = [1, io.MAX_BATCH], [1, N]
    cross = ((L, 1, C, S), "fp32")
    expected = {
        "encoder": {
            "main": {
                "mel": ((1, dims.n_mels, io.N_FRAMES), "fp32"),
                "cross_k": cross,
                "cross_v": cross,
            }
        },
        "decoder": {
            "main": {
                "tokens": ((b, t), "int32"),
                "positions": ((t,), "int32"),
                "k_cache": ((L, b, C, N), "fp32"),
                "v_cache": ((L, b, C, N), "fp32"),
                "mask": ((t, [N + 1, 2 * N]), "fp32"),
                "cross_k": cross,
                "cross_v": cross,
            }
        },
        "decoder_stateful": {},
    }
    for batch in io.STATEFUL_BATCHES:
        expected["decoder_stateful"][io.stateful_function_name(batch)] = {
            "tokens": ((batch, t), "int32"),
            "positions": ((t,), "int32"),
            "beam_order": ((batch,), "int32"),
            "mask": ((t, N), "fp32"),
            "cross_k": cross,
            "cross_v": cross,
            "k_cache": ((L, batch, C, N), "fp16"),
            "v_cache": ((L, batch, C, N), "fp16"),
        }
    return expected


def _norm(shape) -> list:
    return [list(d) if isinstance(d, (list, tuple)) else int(d) for d in shape]


def test_saved_packages_match_the_interface(fp16_dir: ModelDirectory) -> None:
    """Names, order, shapes (with ranges) and dtypes read back from the saved specs."""
    from wruntime.build.convert import describe_package

    expected = _expected_io(fp16_dir.dims)
    names = {
        "encoder": ((io.ENCODER_INPUT,), io.ENCODER_OUTPUTS, ()),
        "decoder": (io.DECODER_INPUTS, io.DECODER_OUTPUTS, ()),
        "decoder_stateful": (io.STATEFUL_INPUTS, io.STATEFUL_OUTPUTS, io.STATEFUL_STATES),
    }
    for role, functions in expected.items():
        saved = describe_package(fp16_dir.package(role))
        assert set(saved) == set(functions), role
        for fn, want in functions.items():
            got = saved[fn]
            assert tuple(f["name"] for f in got["inputs"]) == names[role][0]
            assert tuple(f["name"] for f in got["outputs"]) == names[role][1]
            assert tuple(f["name"] for f in got["states"]) == names[role][2]
            for f in got["inputs"] + got["states"]:
                shape, dtype = want[f["name"]]
                assert _norm(f["shape"]) == _norm(shape), (role, fn, f)
                assert f["dtype"] == dtype, (role, fn, f)
            for f in got["outputs"]:
                assert f["dtype"] == "fp32", (role, fn, f)


def test_manifest_describes_the_directory(fp16_dir: ModelDirectory) -> None:
    from wruntime.build.convert import describe_package

    m = fp16_dir.manifest
    assert m["name"] == "tiny.en-fp16" and m["precision"] == "fp16"
    assert m["compute_precision"] == "float16"
    assert m["dims"] == fp16_dir.dims.to_dict()
    assert m["stateful_batches"] == list(io.STATEFUL_BATCHES)
    assert set(m["packages"]) == {"encoder", "decoder", "decoder_stateful"}
    assert m["packages"]["decoder_stateful"]["deployment_target"] == "iOS18"
    d = fp16_dir.dims
    L, C, S, N, V = d.n_text_layer, d.n_text_state, d.n_audio_ctx, d.n_text_ctx, d.n_vocab
    A, b, t = len(m["alignment_heads"]), [1, io.MAX_BATCH], [1, N]
    assert A == len(fp16_dir.alignment_heads) > 0
    want_outputs = {
        ("encoder", "main"): {"cross_k": [L, 1, C, S], "cross_v": [L, 1, C, S]},
        ("decoder", "main"): {
            "logits": [b, t, V],
            "k_new": [L, b, C, t],
            "v_new": [L, b, C, t],
            "alignment": [b, A, t, S],
        },
        ("decoder_stateful", "main"): {"logits": [1, t, V], "alignment": [1, A, t, S]},
        ("decoder_stateful", "batch5"): {"logits": [5, t, V], "alignment": [5, A, t, S]},
    }
    for role, entry in m["packages"].items():
        pkg = fp16_dir.package(role)
        saved = describe_package(pkg)
        for fn, desc in entry["functions"].items():
            # Inputs and states as the spec says; outputs' shapes from the contract
            # (Core ML specs leave flexible outputs unshaped).
            assert desc["inputs"] == saved[fn]["inputs"] and desc["states"] == saved[fn]["states"]
            assert [o["name"] for o in desc["outputs"]] == [o["name"] for o in saved[fn]["outputs"]]
            assert {o["name"]: o["shape"] for o in desc["outputs"]} == want_outputs[(role, fn)]
        on_disk = sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file())
        assert sorted(entry["files"]) == on_disk
        assert all(len(f["sha256"]) == 64 for f in entry["files"].values())
    tok = fp16_dir.tokenizer_files
    assert sorted(p.name for p in tok.iterdir()) == sorted(m["tokenizer"]["files"])
    assert (tok / "tokenizer.json").stat().st_size > 0
    assert os.fspath(fp16_dir) == str(fp16_dir.path)


def test_vocabulary_projection_chunks_stay_under_the_ane_limit(fp16_dir: ModelDirectory) -> None:
    from wruntime.build.convert import load_program

    sizes = (51864, 51865, 51866, io.ANE_MAX_DIM, io.ANE_MAX_DIM + 1, 2 * io.ANE_MAX_DIM, 1000)
    for v in (*sizes, 60000):
        chunks = vocab_chunks(v)
        assert sum(n for _, n in chunks) == v
        assert all(0 < n <= io.ANE_MAX_DIM for _, n in chunks)
        assert [o for o, _ in chunks] == [sum(n for _, n in chunks[:i]) for i in range(len(chunks))]
        # Every text chunk but a non-Whisper vocabulary's last takes grouped tables of 16 and 6.
        assert all(n % 48 == 0 for _, n in chunks[:-1])
    # Whisper's control tokens (from <|endoftext|> on) have a chunk of their own; the text
    # rows are cut at a multiple of 48, so a multilingual vocabulary's last text token
    # (50,256) joins them.
    assert vocab_chunks(51864)[-1] == (50256, 1608)  # English-only: GPT-2's 50,256 text tokens
    assert vocab_chunks(51865)[-1] == (50256, 1609)
    assert vocab_chunks(51866)[-1] == (50256, 1610)  # large-v3: one more language
    # The commonest tokens (the first BPE ids) come first, in small chunks of their own.
    assert [n for _, n in vocab_chunks(51865)] == [768, 2304, 15744, 15744, 15696, 1609]
    assert len(vocab_chunks(1000)) == 1  # not a Whisper vocabulary: nothing to set apart
    small = vocab_chunks(51865, limit=2000)  # under the frequent chunks' 2,304 rows
    assert max(n for _, n in small) <= 2000 and sum(n for _, n in small) == 51865
    assert small[-1] == (50256, 1609)
    program = load_program(fp16_dir.package("decoder"))
    linears = [op for op in program.functions["main"].operations if op.op_type == "linear"]
    rows = [op.inputs["weight"].shape[0] for op in linears]
    assert len(rows) == len(vocab_chunks(fp16_dir.dims.n_vocab)) == 6
    assert sum(rows) == fp16_dir.dims.n_vocab and max(rows) <= io.ANE_MAX_DIM
    assert rows[-1] == 1608  # the control tokens
    assert linears[-1].inputs["weight"].op.name == "token_embedding_special_rows"


# ------------------------------------------------------------------ damage


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy whose files are hard links (cheap); `_rewrite` breaks a link before changing it."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _rewrite(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _weight_file(directory: Path) -> Path:
    return directory / io.DECODER_FILE / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"


def test_untouched_copy_loads_without_rehashing(fp16_dir: ModelDirectory, tmp_path: Path) -> None:
    copy = _linked_copy(fp16_dir.path, tmp_path / "m")
    assert (copy / STAMP_FILE).exists()
    opened = load_model_dir(copy)
    assert opened.name == "tiny.en-fp16" and opened.dims == fp16_dir.dims
    assert load_model_dir(copy, verify=True).manifest == fp16_dir.manifest


def test_opening_a_package_does_not_force_a_rehash(
    fp16_dir: ModelDirectory, tmp_path: Path
) -> None:
    """coremltools rewrites Manifest.json on open (same bytes, new mtime): still no full hash."""
    from wruntime.build.convert import describe_package

    copy = _linked_copy(fp16_dir.path, tmp_path / "m")
    load_model_dir(copy, verify=True)
    stamp = (copy / STAMP_FILE).stat().st_mtime_ns
    describe_package(copy / io.DECODER_FILE)
    load_model_dir(copy)
    assert (copy / STAMP_FILE).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("verify", [None, True])
def test_a_flipped_byte_is_refused(fp16_dir: ModelDirectory, tmp_path: Path, verify) -> None:
    copy = _linked_copy(fp16_dir.path, tmp_path / "m")
    weights = _weight_file(copy)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    _rewrite(weights, bytes(data))
    with pytest.raises(
        ModelDirectoryError, match=r"weight\.bin does not match its recorded sha256"
    ):
        load_model_dir(copy, verify=verify)
    # Sizes alone cannot see a flipped byte: that is what the hash check is for.
    load_model_dir(copy, verify=False)


def test_a_missing_file_is_refused(fp16_dir: ModelDirectory, tmp_path: Path) -> None:
    copy = _linked_copy(fp16_dir.path, tmp_path / "m")
    (copy / io.ENCODER_FILE / "Manifest.json").unlink()
    with pytest.raises(ModelDirectoryError, match=r"encoder.mlpackage/Manifest.json is missing"):
        load_model_dir(copy, verify=False)


def test_a_truncated_file_is_refused_without_hashing(
    fp16_dir: ModelDirectory, tmp_path: Path
) -> None:
    copy = _linked_copy(fp16_dir.path, tmp_path / "m")
    weights = _weight_file(copy)
    _rewrite(weights, weights.read_bytes()[:-10])
    with pytest.raises(ModelDirectoryError, match=r"weight\.bin has the wrong size"):
        load_model_dir(copy, verify=False)


def test_an_extra_file_in_a_package_is_refused(fp16_dir: ModelDirectory, tmp_path: Path) -> None:
    copy = _linked_copy(fp16_dir.path, tmp_path / "m")
    (copy / io.STATEFUL_DECODER_FILE / "stray.bin").write_bytes(b"x")
    with pytest.raises(ModelDirectoryError, match="unexpected file"):
        load_model_dir(copy, verify=False)
    # ...whereas the executors' compiled cache beside the packages is allowed.
    (copy / io.STATEFUL_DECODER_FILE / "stray.bin").unlink()
    (copy / "compiled").mkdir()
    (copy / "compiled" / "x").write_bytes(b"x")
    load_model_dir(copy, verify=False)


def test_an_edited_manifest_is_refused(fp16_dir: ModelDirectory, tmp_path: Path) -> None:
    copy = _linked_copy(fp16_dir.path, tmp_path / "m")
    manifest = json.loads((copy / io.MANIFEST_FILE).read_text())
    manifest["dims"]["n_text_layer"] = 5
    _rewrite(copy / io.MANIFEST_FILE, json.dumps(manifest).encode())
    with pytest.raises(ModelDirectoryError, match="modified after the build"):
        load_model_dir(copy, verify=False)
    _rewrite(copy / io.MANIFEST_FILE, b"{not json")
    with pytest.raises(ModelDirectoryError, match="not readable JSON"):
        load_model_dir(copy)
    (copy / io.MANIFEST_FILE).unlink()
    with pytest.raises(ModelDirectoryError, match=r"no manifest\.json"):
        load_model_dir(copy)


def test_a_directory_from_another_format_is_refused(
    fp16_dir: ModelDirectory, tmp_path: Path
) -> None:
    from wruntime.build.model_dir import write_manifest

    copy = _linked_copy(fp16_dir.path, tmp_path / "m")
    manifest = dict(fp16_dir.manifest, format_version=0)
    (copy / io.MANIFEST_FILE).unlink()
    write_manifest(copy, manifest)
    with pytest.raises(ModelDirectoryError, match="format version 0"):
        load_model_dir(copy)


def test_a_failed_build_leaves_nothing_behind(tiny_weights: WhisperWeights, tmp_path: Path):
    """A decoder weight of the wrong shape fails the build after the encoder was saved."""
    params = dict(tiny_weights.params)
    params["decoder.blocks.1.mlp.0.weight"] = np.zeros((7, 3), np.float32)
    bad = WhisperWeights(
        dims=tiny_weights.dims,
        params=params,
        alignment_heads=tiny_weights.alignment_heads,
        tokenizer_files=tiny_weights.tokenizer_files,
        source="bad weights",
    )
    stages: list[str] = []
    dest = tmp_path / "models" / "tiny.en-fp16"
    with pytest.raises(Exception):  # noqa: B017 - whatever MIL raises for the bad shape
        build_model(
            "tiny.en-fp16",
            weights=bad,
            dest=dest,
            stateful=False,
            progress=lambda d, i, n: stages.append(d),
        )
    assert "Building the decoder" in stages  # it failed midway, after the encoder
    assert not dest.exists()
    assert list((tmp_path / "models").iterdir()) == []


# ------------------------------------------------------------------ cache management


def test_list_inspect_remove(fp16_dir: ModelDirectory, tmp_path: Path) -> None:
    rows = {r.name: r for r in list_models()}
    assert rows["tiny.en-fp16"].built and rows["tiny.en-fp16"].size_mb > 10
    assert "base-fp16" in rows
    info = inspect_model("tiny.en-fp16")
    assert info["verified"] and info["packages"]["decoder"]["op_types"]
    assert (
        "tokens (1..8, 1..448) int32" in info["packages"]["decoder"]["functions"]["main"]["inputs"]
    )
    with pytest.raises(WruntimeError, match="Unknown model"):
        inspect_model("tiny.en-fp17")
    copy = _linked_copy(fp16_dir.path, tmp_path / "m")
    assert remove_model(str(copy)) == copy and not copy.exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ModelDirectoryError, match="nothing to remove"):
        remove_model("small-pal6")  # a name no test builds


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WRUNTIME_HOME", str(tmp_path / "home"))
    assert wruntime_home() == tmp_path / "home"
    monkeypatch.delenv("WRUNTIME_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    home = wruntime_home()
    assert home.name == "wruntime" and home.parts[-2] in ("xdg", "Caches")


# ------------------------------------------------------------------ numerics


@pytest.fixture(scope="module")
def jfk_mel() -> np.ndarray:
    from conftest import CLIPS

    from wruntime.audio import load_audio
    from wruntime.features import log_mel_spectrogram, pad_or_trim

    audio = load_audio(CLIPS["jfk"][0])
    mel = log_mel_spectrogram(audio, padding=480000)
    return pad_or_trim(mel, io.N_FRAMES)[None].astype(np.float32)


def _interpreter(path: Path, function: str = "main"):
    try:
        from wruntime.executors.interpreter import InterpreterModel
    except ImportError as e:  # pragma: no cover - the interpreter is another stage's work
        pytest.skip(f"the MIL interpreter is not available: {e}")
    return InterpreterModel(path, function_name=function)


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(got, np.float32) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_packages_compute_what_the_oracle_computes(
    precision: str, request: pytest.FixtureRequest, tiny_weights: WhisperWeights, jfk_mel
) -> None:
    """Encoder, explicit decoder (prefill, then a step) and stateful decoder vs wruntime.oracle."""
    from wruntime import oracle

    model_dir: ModelDirectory = request.getfixturevalue(f"{precision}_dir")
    tol = 2e-3 if precision == "fp32" else 3e-2
    w = tiny_weights
    d = w.dims
    L, C, N = d.n_text_layer, d.n_text_state, d.n_text_ctx

    enc = _interpreter(model_dir.package("encoder")).predict({"mel": jfk_mel})
    ck, cv = oracle.cross_kv(w, oracle.encode(w, jfk_mel))
    assert _rel_err(enc["cross_k"], ck) < tol and _rel_err(enc["cross_v"], cv) < tol

    # Explicit cache, two beams: the prompt in one call, then one step.
    dec = _interpreter(model_dir.package("decoder"))
    prompt = np.array([[50257, 50362, 843], [50257, 50362, 1002]], np.int32)
    pos = np.arange(3, dtype=np.int32)
    kc = np.zeros((L, 2, C, N), np.float32)
    vc = np.zeros_like(kc)
    inputs = dict(tokens=prompt, positions=pos, k_cache=kc, v_cache=vc, cross_k=ck, cross_v=cv)
    inputs["mask"] = oracle.causal_mask(pos, N)
    got = dec.predict(inputs)
    ref = oracle.decode(w, prompt, pos, kc, vc, ck, cv)
    for name in io.DECODER_OUTPUTS:
        assert got[name].shape == getattr(ref, name).shape, name
        assert _rel_err(got[name], getattr(ref, name)) < tol, name
    assert (got["logits"].argmax(-1) == ref.logits.argmax(-1)).all()
    kc[..., :3], vc[..., :3] = ref.k_new, ref.v_new
    step = np.array([[11], [13]], np.int32)
    pos1 = np.array([3], np.int32)
    got = dec.predict(dict(inputs, tokens=step, positions=pos1, mask=oracle.causal_mask(pos1, N)))
    ref1 = oracle.decode(w, step, pos1, kc, vc, ck, cv)
    assert _rel_err(got["logits"], ref1.logits) < tol
    assert (got["logits"].argmax(-1) == ref1.logits.argmax(-1)).all()

    # Stateful batch 5: prefill of one prompt in every row, then a step whose beam_order
    # swaps rows; the cache rows must follow the beams.
    st = _interpreter(model_dir.package("decoder_stateful"), io.stateful_function_name(5))
    state = st.make_state()

    def smask(p: np.ndarray) -> np.ndarray:
        return np.where(np.arange(N)[None, :] <= p[:, None], 0.0, io.MASK_NEG).astype(np.float32)

    rows = np.array([0, 1, 0, 1, 0])
    common = dict(cross_k=ck, cross_v=cv)
    out = st.predict(
        dict(
            common,
            tokens=prompt[rows],
            positions=pos,
            beam_order=np.arange(5, dtype=np.int32),
            mask=smask(pos),
        ),
        state,
    )
    assert _rel_err(out["logits"], ref.logits[rows]) < tol
    assert _rel_err(out["alignment"], ref.alignment[rows]) < tol
    order = np.array([1, 0, 1, 0, 1], np.int32)  # row i continues the beam in row order[i]
    out = st.predict(
        dict(common, tokens=step[rows[order]], positions=pos1, beam_order=order, mask=smask(pos1)),
        state,
    )
    assert _rel_err(out["logits"], ref1.logits[rows[order]]) < tol
    assert (out["logits"].argmax(-1) == ref1.logits[rows[order]].argmax(-1)).all()


def test_split_logits_keeps_the_chunks_as_outputs(tiny_weights: WhisperWeights) -> None:
    """The ANE-style decoder option: one output per vocabulary chunk, none above 16384."""
    from coremltools.converters.mil.mil import types

    from wruntime.build.convert import TARGETS
    from wruntime.build.decoder import build_decoder_program

    program = build_decoder_program(
        tiny_weights, fp16=True, target=TARGETS["iOS17"], split_logits=True
    )
    outputs = program.functions["main"].outputs
    chunks = vocab_chunks(tiny_weights.dims.n_vocab)
    names = [v.name for v in outputs]
    assert names == [f"logits_{i}" for i in range(len(chunks))] + ["k_new", "v_new", "alignment"]
    assert [int(v.shape[-1]) for v in outputs[: len(chunks)]] == [n for _, n in chunks]
    assert all(v.dtype == types.fp32 for v in outputs)


def test_a_directory_from_an_older_builder_is_seen_as_stale(
    fp16_dir: ModelDirectory, tmp_path: Path
) -> None:
    """ensure_model and build_model rebuild such a directory (and a damaged one, for build)."""
    from wruntime.build.model_dir import write_manifest
    from wruntime.build.pipeline import _built_by_another_builder, _usable

    assert not _built_by_another_builder(fp16_dir.path) and _usable(fp16_dir.path)
    copy = _linked_copy(fp16_dir.path, tmp_path / "m")
    (copy / io.MANIFEST_FILE).unlink()
    write_manifest(copy, dict(fp16_dir.manifest, builder_version="0.9"))
    assert _built_by_another_builder(copy) and not _usable(copy)
    load_model_dir(copy)  # still a valid directory: rebuilt on use, not refused
    damaged = _linked_copy(fp16_dir.path, tmp_path / "d")
    (damaged / io.ENCODER_FILE / "Manifest.json").unlink()
    assert not _built_by_another_builder(damaged) and not _usable(damaged)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_op_types_are_the_documented_ones(precision: str, request: pytest.FixtureRequest) -> None:
    """The saved packages use only PACKAGE_OP_TYPES, which the interpreter must run."""
    from wruntime.build.convert import PACKAGE_OP_TYPES, spec_op_types

    model_dir: ModelDirectory = request.getfixturevalue(f"{precision}_dir")
    for role, allowed in PACKAGE_OP_TYPES.items():
        saved = spec_op_types(model_dir.package(role))
        assert saved == model_dir.manifest["packages"][role]["op_types"]
        for fn, ops in saved.items():
            assert set(ops) <= allowed, (role, fn, set(ops) - allowed)
        assert {"conv", "softmax", "rsqrt"} <= set(saved["main"])
    try:
        from wruntime.executors.interpreter import supported_ops
    except ImportError:  # pragma: no cover
        pytest.skip("the MIL interpreter is not available")
    # The interpreter reads programs through pymil, which names write_state coreml_update_state.
    pymil = {"write_state": "coreml_update_state"}
    documented = {pymil.get(op, op) for op in set().union(*PACKAGE_OP_TYPES.values())} - {"const"}
    assert documented <= supported_ops(), documented - supported_ops()


def test_fp16_package_holds_up_in_fp16_arithmetic(
    fp16_dir: ModelDirectory, tiny_weights: WhisperWeights, jfk_mel
) -> None:
    """Every intermediate rounded to fp16 (the interpreter's emulation): the channel layer
    norm must neither overflow on the encoder's ~600-magnitude residual channels nor lose
    the decoder's ~3e-4 variances, so the outputs stay within fp16 noise of the oracle."""
    from wruntime import oracle

    try:
        from wruntime.executors.interpreter import InterpreterModel
    except ImportError:  # pragma: no cover
        pytest.skip("the MIL interpreter is not available")
    w = tiny_weights
    enc = InterpreterModel(fp16_dir.package("encoder"), fp16_emulation=True)
    got = enc.predict({"mel": jfk_mel})
    ck, cv = oracle.cross_kv(w, oracle.encode(w, jfk_mel))
    assert _rel_err(got["cross_k"], ck) < 2e-2 and _rel_err(got["cross_v"], cv) < 2e-2
    n = w.dims.n_text_ctx
    dec = InterpreterModel(fp16_dir.package("decoder"), fp16_emulation=True)
    tokens, pos = np.array([[50257, 50362]], np.int32), np.arange(2, dtype=np.int32)
    kc = np.zeros((w.dims.n_text_layer, 1, w.dims.n_text_state, n), np.float32)
    out = dec.predict(
        dict(
            tokens=tokens,
            positions=pos,
            k_cache=kc,
            v_cache=kc,
            mask=oracle.causal_mask(pos, n),
            cross_k=got["cross_k"],
            cross_v=got["cross_v"],
        )
    )
    ref = oracle.decode(w, tokens, pos, kc, kc, ck, cv)
    assert _rel_err(out["logits"], ref.logits) < 2e-2
    assert (out["logits"].argmax(-1) == ref.logits.argmax(-1)).all()


def test_own_weights_replace_a_cached_build_of_other_weights(
    fp32_dir: ModelDirectory, tiny_weights: WhisperWeights, tmp_path: Path, monkeypatch
) -> None:
    """`--weights` must not silently reuse a cached build of other weights under the same name."""
    monkeypatch.setenv("WRUNTIME_HOME", str(tmp_path))
    cached = _linked_copy(fp32_dir.path, tmp_path / "models" / "tiny.en-fp32")

    class Started(Exception):
        pass

    def abort(*_args) -> None:
        raise Started

    # The same weights: the cached directory is used, no build starts.
    assert ensure_model("tiny.en-fp32", weights=tiny_weights, progress=abort).path == cached
    # Other weights (same architecture): a rebuild starts; aborted, the old directory survives whole.
    other = WhisperWeights(
        dims=tiny_weights.dims,
        params=tiny_weights.params,
        alignment_heads=tiny_weights.alignment_heads,
        tokenizer_files=tiny_weights.tokenizer_files,
        source="/elsewhere/fine-tuned",
    )
    with pytest.raises(Started):
        ensure_model("tiny.en-fp32", weights=other, progress=abort)
    assert load_model_dir(cached, verify=True).manifest == fp32_dir.manifest
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny.en-fp32"]
