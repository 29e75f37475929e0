"""Read CTranslate2 (faster-whisper) Whisper models without ctranslate2.

A CTranslate2 ``model.bin`` is a flat little-endian stream (written by
CTranslate2's ``ModelSpec._serialize``)::

    u32 binary_version, str spec_name, u32 spec_revision,
    u32 n_variables, n × (str name, u8 rank, rank × u32 dim, u8 dtype, u32 n_bytes, bytes),
    u32 n_aliases, n × (str alias, str target)

where ``str`` is a u16 length (counting a trailing NUL) followed by the UTF-8
bytes and the NUL. Some weight packages split the file into ``model.bin.part1``,
``.part2`` ... (plain concatenation, possibly in different directories), so
the reader consumes the parts as one sequential stream: every byte is read
once, straight into the array that holds it, and no joined copy is written.

CTranslate2 fuses the self-attention Q/K/V projections into one matrix and the
cross-attention K/V into another, and gives the key projection a zero bias;
openai-whisper keeps them apart and has no key bias. A key bias is a constant
added to every logit of a query's row, which softmax ignores, so dropping it
is exact even if it were not zero.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from wruntime.errors import WeightsError
from wruntime.weights._common import (
    alignment_heads_array,
    default_alignment_heads,
    finalize_params,
    find_tokenizer_files,
    read_json,
)
from wruntime.weights.canonical import ModelDims, WhisperWeights

# Binary versions that carry a dtype id per variable (4+) and aliases (3+);
# every Whisper model ever converted is version 5 or 6.
SUPPORTED_BINARY_VERSIONS = (4, 5, 6)

# Order of CTranslate2's DataType enum (include/ctranslate2/types.h).
_DTYPES: dict[int, np.dtype | None] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: None,  # bfloat16: no numpy dtype; read as uint16 and widened by hand
}

_PART_RE = re.compile(r"^model\.bin\.part(\d+)$")


class _PartStream:
    """The parts of a split model.bin, read as one file."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._index = 0
        self._file: BinaryIO | None = None
        self.offset = 0  # bytes consumed from the whole stream

    def __enter__(self) -> _PartStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def current_path(self) -> Path:
        return self.paths[min(self._index, len(self.paths) - 1)]

    def _open_next(self) -> bool:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._index += 1
        if self._index >= len(self.paths):
            return False
        try:
            self._file = open(self.paths[self._index], "rb")  # noqa: SIM115
        except OSError as e:
            raise WeightsError(f"Cannot open {self.paths[self._index]}: {e.strerror}.") from None
        return True

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` from the stream; returns how many bytes were available."""
        filled = 0
        while filled < len(view):
            if self._file is None and not self._open_next():
                break
            assert self._file is not None
            n = self._file.readinto(view[filled:])
            if not n:
                if not self._open_next():
                    break
                continue
            filled += n
        self.offset += filled
        return filled

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.readinto(memoryview(buf))
        return bytes(buf[:got])

    def at_end(self) -> bool:
        return not self.read(1)


def _describe(paths: Sequence[Path]) -> str:
    return str(paths[0]) if len(paths) == 1 else " + ".join(str(p) for p in paths)


class _Reader:
    def __init__(self, stream: _PartStream) -> None:
        self.s = stream
        self.name = _describe(stream.paths)

    def exact(self, n: int, what: str) -> bytes:
        data = self.s.read(n)
        if len(data) != n:
            raise self.truncated(what)
        return data

    def truncated(self, what: str) -> WeightsError:
        hint = (
            " (is a part missing?)"
            if len(self.s.paths) > 1 or _PART_RE.match(self.s.paths[0].name)
            else ""
        )
        return WeightsError(f"{self.name} is truncated: it ends inside {what}{hint}.")

    def u8(self, what: str) -> int:
        return self.exact(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.exact(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.exact(4, what))[0]

    def string(self, what: str) -> str:
        n = self.u16(what)
        raw = self.exact(n, what)
        if n == 0 or raw[-1] != 0:
            raise WeightsError(f"{self.name} is malformed: {what} is not a NUL-terminated string.")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise WeightsError(f"{self.name} is malformed: {what} is not UTF-8.") from None


def read_model_bin(paths: Sequence[Path]) -> tuple[str, int, dict[str, np.ndarray]]:
    """Parse a (possibly split) model.bin: (spec name, revision, variables incl. aliases)."""
    with _PartStream(paths) as stream:
        r = _Reader(stream)
        version = r.u32("the header")
        if version not in SUPPORTED_BINARY_VERSIONS:
            raise WeightsError(
                f"{r.name} is not a CTranslate2 model this reader understands: binary version "
                f"{version} (supported: {', '.join(map(str, SUPPORTED_BINARY_VERSIONS))})."
            )
        spec = r.string("the spec name")
        revision = r.u32("the spec revision")
        count = r.u32("the variable count")
        variables: dict[str, np.ndarray] = {}
        for i in range(count):
            name = r.string(f"the name of variable {i}")
            rank = r.u8(f"the header of {name}")
            if rank > 8:  # Whisper's tensors have rank <= 3; garbage must not allocate
                raise WeightsError(f"{r.name} is malformed: {name} has rank {rank}.")
            shape = tuple(r.u32(f"the header of {name}") for _ in range(rank))
            type_id = r.u8(f"the header of {name}")
            n_bytes = r.u32(f"the header of {name}")
            if type_id not in _DTYPES:
                raise WeightsError(f"{r.name} is malformed: {name} has unknown dtype id {type_id}.")
            dtype = _DTYPES[type_id] or np.dtype("<u2")
            count_items = int(np.prod(shape, dtype=np.int64))
            if count_items * dtype.itemsize != n_bytes:
                raise WeightsError(
                    f"{r.name} is malformed: {name} has shape {shape} but {n_bytes} bytes."
                )
            array = np.empty(count_items, dtype=dtype)
            if stream.readinto(memoryview(array).cast("B")) != n_bytes:
                raise r.truncated(f"tensor {name}")
            if _DTYPES[type_id] is None:  # bfloat16: the high half of a float32
                array = (array.astype(np.uint32) << 16).view(np.float32)
            variables[name] = array.reshape(shape)
        n_aliases = r.u32("the alias count")
        for i in range(n_aliases):
            alias = r.string(f"alias {i}")
            target = r.string(f"alias {i}")
            if target not in variables:
                raise WeightsError(f"{r.name} is malformed: alias {alias} names unknown {target}.")
            variables[alias] = variables[target]
        if not stream.at_end():
            raise WeightsError(
                f"{r.name} has unexpected bytes after its end (are the parts in the right order?)."
            )
    return spec, revision, variables


def _dequantize(variables: dict[str, np.ndarray]) -> None:
    """int8 models store ``weight`` as round(w * scale) with a per-row ``weight_scale``."""
    for name in [n for n in variables if n.endswith("/weight_scale")]:
        base = name[: -len("_scale")]
        w = variables.get(base)
        scale = variables.pop(name).astype(np.float32)
        if w is None:
            continue
        w = w.astype(np.float32)
        if scale.ndim == 1 and w.ndim >= 2 and scale.shape[0] == w.shape[0]:
            scale = scale.reshape((-1,) + (1,) * (w.ndim - 1))
        variables[base] = w / scale


def find_parts(directory: Path) -> list[Path]:
    """model.bin, or model.bin.part1..N in one directory (in numeric order)."""
    single = directory / "model.bin"
    if single.is_file():
        return [single]
    parts = sorted(
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := _PART_RE.match(p.name)) and p.is_file()
    )
    if not parts:
        raise WeightsError(f"{directory} holds no model.bin.")
    numbers = [n for n, _ in parts]
    if numbers != list(range(1, len(numbers) + 1)):
        missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
        raise WeightsError(
            f"{directory} is missing model.bin.part{missing[0] if missing else 1} of a split model."
        )
    return [p for _, p in parts]


def _get(variables: dict[str, np.ndarray], name: str, where: str) -> np.ndarray:
    try:
        return variables[name]
    except KeyError:
        raise WeightsError(f"{where} is not a complete Whisper model: {name} is missing.") from None


def _scalar(variables: dict[str, np.ndarray], name: str, default: int) -> int:
    value = variables.get(name)
    return default if value is None or value.size != 1 else int(value.reshape(()))


def _count_layers(variables: dict[str, np.ndarray], prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


def _linear(params: dict, variables: dict, src: str, dst: str, where: str) -> None:
    params[f"{dst}.weight"] = _get(variables, f"{src}/weight", where)
    if f"{src}/bias" in variables:
        params[f"{dst}.bias"] = variables[f"{src}/bias"]


def _norm(params: dict, variables: dict, src: str, dst: str, where: str) -> None:
    params[f"{dst}.weight"] = _get(variables, f"{src}/gamma", where)
    params[f"{dst}.bias"] = _get(variables, f"{src}/beta", where)


def _split_rows(
    params: dict, variables: dict, src: str, dsts: Sequence[str], n_state: int, where: str
) -> None:
    """A fused projection: rows [0:n), [n:2n) ... are the separate projections in order."""
    weight = _get(variables, f"{src}/weight", where)
    bias = variables.get(f"{src}/bias")
    if weight.shape != (n_state * len(dsts), n_state):
        raise WeightsError(f"{where} is malformed: {src}/weight has shape {weight.shape}.")
    for i, dst in enumerate(dsts):
        params[f"{dst}.weight"] = weight[i * n_state : (i + 1) * n_state]
        if bias is not None and not dst.endswith(".key"):
            params[f"{dst}.bias"] = bias[i * n_state : (i + 1) * n_state]


def to_canonical(variables: dict[str, np.ndarray], where: str) -> tuple[ModelDims, dict]:
    """Map a WhisperSpec's variables to openai-whisper names; dims come from the tensors."""
    # An alias is the same array object: tied without comparing 20M values.
    projection = variables.get("decoder/projection/weight")
    tied = projection is None or projection is variables.get("decoder/embeddings/weight")
    _dequantize(variables)
    conv1 = _get(variables, "encoder/conv1/weight", where)
    n_audio_state, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
    embedding = _get(variables, "decoder/embeddings/weight", where)
    n_vocab, n_text_state = int(embedding.shape[0]), int(embedding.shape[1])
    enc_pos = _get(variables, "encoder/position_encodings/encodings", where)
    dec_pos = _get(variables, "decoder/position_encodings/encodings", where)
    dims = ModelDims(
        n_mels=n_mels,
        n_audio_ctx=int(enc_pos.shape[0]),
        n_audio_state=n_audio_state,
        # Whisper's head size is 64 everywhere; older converters did not store num_heads.
        n_audio_head=_scalar(variables, "encoder/num_heads", n_audio_state // 64),
        n_audio_layer=_count_layers(variables, "encoder"),
        n_vocab=n_vocab,
        n_text_ctx=int(dec_pos.shape[0]),
        n_text_state=n_text_state,
        n_text_head=_scalar(variables, "decoder/num_heads", n_text_state // 64),
        n_text_layer=_count_layers(variables, "decoder"),
    )
    if dims.n_audio_layer == 0 or dims.n_text_layer == 0:
        raise WeightsError(f"{where} is not a complete Whisper model: it has no layers.")

    p: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        _linear(p, variables, f"encoder/{conv}", f"encoder.{conv}", where)
    p["encoder.positional_embedding"] = enc_pos
    for i in range(dims.n_audio_layer):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        _self_attention(p, variables, src, dst, dims.n_audio_state, where)
        _ffn(p, variables, src, dst, where)
    _norm(p, variables, "encoder/layer_norm", "encoder.ln_post", where)

    p["decoder.token_embedding.weight"] = embedding
    p["decoder.positional_embedding"] = dec_pos
    for i in range(dims.n_text_layer):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        _self_attention(p, variables, src, dst, dims.n_text_state, where)
        s = dims.n_text_state
        _norm(p, variables, f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln", where)
        _linear(p, variables, f"{src}/attention/linear_0", f"{dst}.cross_attn.query", where)
        _split_rows(
            p,
            variables,
            f"{src}/attention/linear_1",
            [f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"],
            s,
            where,
        )
        _linear(p, variables, f"{src}/attention/linear_2", f"{dst}.cross_attn.out", where)
        _ffn(p, variables, src, dst, where)
    _norm(p, variables, "decoder/layer_norm", "decoder.ln", where)

    if not tied and not np.array_equal(variables["decoder/projection/weight"], embedding):
        # openai-whisper ties the output projection to the token embedding.
        raise WeightsError(f"{where} has an output projection not tied to the token embedding.")
    return dims, p


def _self_attention(p: dict, variables: dict, src: str, dst: str, n_state: int, where: str) -> None:
    _norm(p, variables, f"{src}/self_attention/layer_norm", f"{dst}.attn_ln", where)
    _split_rows(
        p,
        variables,
        f"{src}/self_attention/linear_0",
        [f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"],
        n_state,
        where,
    )
    _linear(p, variables, f"{src}/self_attention/linear_1", f"{dst}.attn.out", where)


def _ffn(p: dict, variables: dict, src: str, dst: str, where: str) -> None:
    _norm(p, variables, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", where)
    _linear(p, variables, f"{src}/ffn/linear_0", f"{dst}.mlp.0", where)
    _linear(p, variables, f"{src}/ffn/linear_1", f"{dst}.mlp.2", where)


def load_ctranslate2(source: Path | Sequence[Path]) -> WhisperWeights:
    """Load a CTranslate2 Whisper model: a directory, a model.bin, or a list of part files.

    config.json, tokenizer.json and vocabulary.txt are taken from the directory of
    the first file (where the split packages keep them).
    """
    if isinstance(source, (str, Path)):
        source = Path(source)
        paths = find_parts(source) if source.is_dir() else [source]
    else:
        paths = [Path(p) for p in source]
        if not paths:
            raise WeightsError("No CTranslate2 model files were given.")
    for path in paths:
        if not path.is_file():
            raise WeightsError(f"{path} does not exist.")
    where = _describe(paths)
    spec, _revision, variables = read_model_bin(paths)
    if spec != "WhisperSpec":
        raise WeightsError(f"{where} is a CTranslate2 {spec or 'model'}, not a Whisper model.")
    dims, params = to_canonical(variables, where)

    directory = paths[0].parent
    config_path = directory / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    if config.get("alignment_heads"):
        heads = alignment_heads_array(config["alignment_heads"], str(config_path))
    else:
        heads = default_alignment_heads(dims.n_text_layer, dims.n_text_head)
    return WhisperWeights(
        dims=dims,
        params=finalize_params(params),
        alignment_heads=heads,
        tokenizer_files=find_tokenizer_files(directory),
        source=where,
    )
