"""Read OpenAI Whisper ``.pt`` checkpoints without torch, and without running their code.

A checkpoint saved by ``torch.save`` is a zip: ``<root>/data.pkl`` pickles the
object tree, and each tensor's bytes sit in ``<root>/data/<key>``. Unpickling
normally imports whatever globals the pickle names, so a hostile file could
run anything. Here a restricted unpickler resolves only the handful of globals
that rebuilding a state dict needs — each mapped to a small function of ours
that builds numpy arrays — and refuses every other global by name before
anything is called. Storages are read only from the zip's own members.

OpenAI's files hold ``{"dims": {...}, "model_state_dict": {...}}`` in float16.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from wruntime.errors import WeightsError
from wruntime.weights._common import (
    alignment_heads_array,
    finalize_params,
    find_tokenizer_files,
)
from wruntime.weights._common import (
    default_alignment_heads as fallback_alignment_heads,
)
from wruntime.weights.canonical import ModelDims, WhisperWeights, sinusoids

_STORAGE_DTYPES = {
    "HalfStorage": np.dtype("<f2"),
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 by hand
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    """Stands in for torch.<X>Storage: only its dtype matters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(
    storage: np.ndarray,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *_ignored: Any,
) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a strided view into a storage (in elements)."""
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError("a tensor refers to something that is not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s < 0 for s in size + stride) or storage_offset < 0:
        raise pickle.UnpicklingError("a tensor has a negative size or stride")
    if size and min(size) == 0:
        return np.zeros(size, dtype=storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise pickle.UnpicklingError("a tensor reaches past the end of its storage")
    item = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(s * item for s in stride),
        writeable=False,
    ).copy()


def _rebuild_parameter(data: np.ndarray, *_ignored: Any) -> np.ndarray:
    return data


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    return collections.OrderedDict(*args)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, archive: zipfile.ZipFile, root: str, path: Path) -> None:
        super().__init__(file)
        self.archive = archive
        self.root = root
        self.path = path
        self.storages: dict[str, np.ndarray] = {}
        self.big_endian = False

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise WeightsError(
                f"{self.path} was refused: its pickle names the global {module}.{name}, "
                "which a weight checkpoint has no need for."
            ) from None

    def persistent_load(self, pid: Any) -> np.ndarray:
        # ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError("a storage of unknown type")
        key = str(key)
        if key not in self.storages:
            member = f"{self.root}/data/{key}"
            try:
                raw = self.archive.read(member)
            except KeyError:
                raise WeightsError(
                    f"{self.path} is damaged: storage {member} is missing."
                ) from None
            dtype = storage_type.dtype.newbyteorder(">") if self.big_endian else storage_type.dtype
            if len(raw) < int(numel) * dtype.itemsize:
                raise WeightsError(f"{self.path} is damaged: storage {member} is truncated.")
            array = np.frombuffer(raw, dtype=dtype, count=int(numel))
            if storage_type.name == "BFloat16Storage":
                array = (array.astype(np.uint32) << 16).view(np.float32)
            self.storages[key] = array
        return self.storages[key]


def read_checkpoint(path: Path) -> Any:
    """Unpickle a torch zip checkpoint into plain dicts of numpy arrays."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise WeightsError(
            f"{path} is not a zip-format torch checkpoint (legacy pre-1.6 files are not read)."
        ) from None
    except OSError as e:
        raise WeightsError(f"Cannot read {path}: {e.strerror}.") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise WeightsError(f"{path} is not a torch checkpoint: it has no single data.pkl.")
        root = pickles[0][: -len("/data.pkl")]
        try:
            with archive.open(pickles[0]) as f:
                unpickler = _RestrictedUnpickler(f, archive, root, path)
                if f"{root}/byteorder" in archive.namelist():
                    unpickler.big_endian = archive.read(f"{root}/byteorder").strip() == b"big"
                return unpickler.load()
        except WeightsError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, zipfile.BadZipFile) as e:
            raise WeightsError(f"{path} is damaged: {e}.") from None


def _heads_from_value(value: Any, dims: ModelDims, where: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == np.bool_ or array.shape == (dims.n_text_layer, dims.n_text_head):
        return np.argwhere(array.astype(bool)).astype(np.int64).reshape(-1, 2)
    return alignment_heads_array(array, where)


def load_openai_pt(
    path: Path, *, default_alignment_heads: np.ndarray | None = None
) -> WhisperWeights:
    path = Path(path)
    checkpoint = read_checkpoint(path)
    if not (
        isinstance(checkpoint, dict)
        and isinstance(checkpoint.get("dims"), dict)
        and isinstance(checkpoint.get("model_state_dict"), dict)
    ):
        raise WeightsError(
            f"{path} is not an OpenAI Whisper checkpoint (no 'dims' and 'model_state_dict')."
        )
    try:
        dims = ModelDims(**{k: int(v) for k, v in checkpoint["dims"].items()})
    except TypeError as e:
        raise WeightsError(f"{path} has unexpected dims: {e}.") from None
    state = dict(checkpoint["model_state_dict"])
    heads_value = state.pop("alignment_heads", checkpoint.get("alignment_heads"))
    params = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    params.setdefault(
        "encoder.positional_embedding", sinusoids(dims.n_audio_ctx, dims.n_audio_state)
    )
    for required in ("encoder.conv1.weight", "decoder.token_embedding.weight", "decoder.ln.weight"):
        if required not in params:
            raise WeightsError(f"{path} is not a complete Whisper model: {required} is missing.")
    if heads_value is not None:
        heads = _heads_from_value(heads_value, dims, str(path))
    elif default_alignment_heads is not None:
        heads = np.asarray(default_alignment_heads, dtype=np.int64).reshape(-1, 2)
    else:
        heads = fallback_alignment_heads(dims.n_text_layer, dims.n_text_head)
    return WhisperWeights(
        dims=dims,
        params=finalize_params(params),
        alignment_heads=heads,
        tokenizer_files=find_tokenizer_files(path.parent),
        source=str(path),
    )
