"""Read Hugging Face ``transformers`` Whisper checkpoints (safetensors) with numpy only.

A transformers Whisper directory holds ``config.json`` (the dims),
``model.safetensors`` or shards listed in ``model.safetensors.index.json``,
the tokenizer files, and usually ``generation_config.json`` (which carries the
alignment heads). Parameter names follow transformers' ``WhisperForConditionalGeneration``
(``model.encoder.layers.N.self_attn.q_proj``...); a bare ``WhisperModel`` has no
``model.`` prefix. Both are accepted.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from wruntime.errors import WeightsError
from wruntime.weights._common import (
    alignment_heads_array,
    finalize_params,
    find_tokenizer_files,
    read_json,
)
from wruntime.weights._common import (
    default_alignment_heads as fallback_alignment_heads,
)
from wruntime.weights.canonical import ModelDims, WhisperWeights, sinusoids

# transformers name (after the encoder/decoder layer prefix) -> openai-whisper name.
_LAYER_NAMES = {
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query",
    "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value",
    "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "final_layer_norm": "mlp_ln",
}
_TOP_NAMES = {
    "encoder.conv1": "encoder.conv1",
    "encoder.conv2": "encoder.conv2",
    "encoder.layer_norm": "encoder.ln_post",
    "decoder.layer_norm": "decoder.ln",
    "decoder.embed_tokens": "decoder.token_embedding",
}
_LAYER_RE = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^(.+)\.(weight|bias)$")


def openai_name(hf_name: str) -> str | None:
    """The openai-whisper name for a transformers name; None for names openai has no use for."""
    name = hf_name.removeprefix("model.")
    if name in ("encoder.embed_positions.weight", "decoder.embed_positions.weight"):
        return name.split(".")[0] + ".positional_embedding"
    if name == "proj_out.weight":
        return None  # tied to the token embedding in Whisper
    m = _LAYER_RE.match(name)
    if m:
        side, index, module, kind = m.groups()
        if module not in _LAYER_NAMES:
            return None
        return f"{side}.blocks.{index}.{_LAYER_NAMES[module]}.{kind}"
    m = _TOP_RE.match(name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _shard_files(source: Path) -> tuple[Path, list[Path]]:
    """(directory, safetensors files) for a directory, a .safetensors file or an index."""
    if source.is_dir():
        index = source / "model.safetensors.index.json"
        if index.is_file():
            return _shard_files(index)
        single = source / "model.safetensors"
        if single.is_file():
            return source, [single]
        files = sorted(source.glob("*.safetensors"))
        if len(files) != 1:
            raise WeightsError(
                f"{source} holds {len(files)} .safetensors files and no "
                "model.safetensors.index.json to say which belong together."
            )
        return source, files
    if source.name.endswith(".index.json"):
        weight_map = read_json(source).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{source} has no weight_map.")
        names = sorted(set(weight_map.values()))
        files = [source.parent / n for n in names]
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{source} lists the shard {f.name}, which is missing.")
        return source.parent, files
    return source.parent, [source]


def _read_bf16(path: Path, name: str) -> np.ndarray:
    """numpy has no bfloat16: read the raw bytes (the safetensors layout is documented) and widen."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(n))[name]
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        raw = np.frombuffer(f.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise WeightsError(
            "Reading .safetensors weights needs the safetensors package "
            "(pip install 'wruntime[safetensors]')."
        ) from None
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="np") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if f.get_slice(key).get_dtype() == "BF16":
                        tensors[key] = _read_bf16(path, key)
                    else:
                        tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise WeightsError(f"{path} is not a readable safetensors file: {e}.") from None
    return tensors


def _dims(config: dict, tensors: dict[str, np.ndarray], where: str) -> ModelDims:
    keys = {
        "n_mels": "num_mel_bins",
        "n_audio_ctx": "max_source_positions",
        "n_audio_state": "d_model",
        "n_audio_head": "encoder_attention_heads",
        "n_audio_layer": "encoder_layers",
        "n_vocab": "vocab_size",
        "n_text_ctx": "max_target_positions",
        "n_text_state": "d_model",
        "n_text_head": "decoder_attention_heads",
        "n_text_layer": "decoder_layers",
    }
    missing = [hf for hf in keys.values() if not isinstance(config.get(hf), int)]
    if missing:
        raise WeightsError(f"{where} has no config.json entries {', '.join(sorted(set(missing)))}.")
    dims = ModelDims(**{ours: int(config[hf]) for ours, hf in keys.items()})
    emb = tensors.get("decoder.token_embedding.weight")
    if emb is not None and emb.shape != (dims.n_vocab, dims.n_text_state):
        raise WeightsError(
            f"{where}: config.json says vocab {dims.n_vocab} x {dims.n_text_state} but the "
            f"token embedding is {emb.shape[0]} x {emb.shape[1]}."
        )
    return dims


def load_safetensors(
    source: Path, *, default_alignment_heads: np.ndarray | None = None
) -> WhisperWeights:
    directory, files = _shard_files(Path(source))
    where = str(source)
    raw = read_safetensors(files)
    params: dict[str, np.ndarray] = {}
    for hf_name, array in raw.items():
        name = openai_name(hf_name)
        if name is not None:
            params[name] = array
    # transformers has no key bias either; drop one if a converter added it (softmax ignores it).
    for k in [k for k in params if k.endswith(".key.bias")]:
        del params[k]

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{directory} has no config.json to give the model's dimensions.")
    dims = _dims(read_json(config_path), params, where)
    params.setdefault(
        "encoder.positional_embedding", sinusoids(dims.n_audio_ctx, dims.n_audio_state)
    )
    expected = {"encoder.conv1.weight", "decoder.token_embedding.weight", "decoder.ln.weight"}
    expected |= {f"encoder.blocks.{dims.n_audio_layer - 1}.mlp.2.weight"}
    expected |= {f"decoder.blocks.{dims.n_text_layer - 1}.cross_attn.value.weight"}
    absent = sorted(expected - set(params))
    if absent:
        raise WeightsError(f"{where} is not a complete Whisper model: {absent[0]} is missing.")

    generation = directory / "generation_config.json"
    heads_value = read_json(generation).get("alignment_heads") if generation.is_file() else None
    if heads_value:
        heads = alignment_heads_array(heads_value, str(generation))
    elif default_alignment_heads is not None:
        heads = np.asarray(default_alignment_heads, dtype=np.int64).reshape(-1, 2)
    else:
        heads = fallback_alignment_heads(dims.n_text_layer, dims.n_text_head)
    return WhisperWeights(
        dims=dims,
        params=finalize_params(params),
        alignment_heads=heads,
        tokenizer_files=find_tokenizer_files(directory),
        source=where,
    )
