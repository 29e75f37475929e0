"""Built model directories: where they live, their manifest, and checking them on load.

A directory holds ``manifest.json``, the packages (interface.ENCODER_FILE, ...)
and ``tokenizer/``. The manifest records what the runtime needs to know without
opening a package (dims, alignment heads, every function's I/O), how it was
built, and the size and sha256 of every file, so damage is caught on load with
a `ModelDirectoryError` instead of surfacing as a wrong transcript.

Verification cost (``verify``):
- always: the manifest's own checksum (an edited manifest is refused), the
  package names against the interface, and every listed file's presence and
  size (one stat per file: truncation, half copies, deleted files);
- sha256 of every file (~0.2 s for tiny.en's 135 MB here) when ``verify=True``,
  and in the default ``verify=None`` mode whenever a large file's size or mtime
  differs from the stamp written at the last full check (small files, such as
  the packages' Manifest.json that coremltools rewrites on every open, are
  always hashed). A directory is thus fully hashed once after it is built,
  copied or modified, and costs stats plus a few KB of hashing afterwards.
Unlisted entries at the top level (the executors' compiled-model cache) are
left alone; unlisted files inside a package are damage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wruntime.atomic import write_text
from wruntime.build import interface as io
from wruntime.errors import ModelDirectoryError
from wruntime.weights.canonical import ModelDims

#: Bumped when the layout or manifest changes incompatibly; older directories are refused.
FORMAT_VERSION = 1
#: Bumped when the builder's programs change: part of the manifest, shown by `inspect`.
BUILDER_VERSION = "1.6"
TOKENIZER_DIR = "tokenizer"
MODELS_DIR = "models"
#: Written after a full hash check: each file's (size, mtime_ns) at that moment.
STAMP_FILE = ".verified.json"
#: Files below this size are hashed on every default (verify=None) load.
SMALL_FILE = 1 << 16
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"

#: Package role -> file name, in build order.
PACKAGE_FILES = {
    "encoder": io.ENCODER_FILE,
    "decoder": io.DECODER_FILE,
    "decoder_stateful": io.STATEFUL_DECODER_FILE,
}
#: What each role's functions must expose (names only; shapes are the builder's business).
_EXPECTED_IO = {
    "encoder": ((io.ENCODER_INPUT,), io.ENCODER_OUTPUTS, ()),
    "decoder": (io.DECODER_INPUTS, io.DECODER_OUTPUTS, ()),
    "decoder_stateful": (io.STATEFUL_INPUTS, io.STATEFUL_OUTPUTS, io.STATEFUL_STATES),
}


# ------------------------------------------------------------------ where


def wruntime_home() -> Path:
    """$WRUNTIME_HOME, else the platform's user cache directory for wruntime."""
    env = os.environ.get("WRUNTIME_HOME")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("wruntime", appauthor=False))
    except ImportError:
        pass
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "wruntime"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wruntime"


def models_root() -> Path:
    return wruntime_home() / MODELS_DIR


def model_path(name: str) -> Path:
    """Where the directory of a catalog name lives in the cache (built or not)."""
    return models_root() / name


# ------------------------------------------------------------------ output shapes


def contract_output_shapes(
    role: str, function: str, dims: ModelDims, n_alignment_heads: int
) -> dict[str, list[Any]]:
    """Output shapes from the interface, ranges as [lo, hi].

    Core ML specs leave flexible outputs without a shape; the manifest fills
    them in from the contract so readers see (B, T, V) rather than nothing.
    """
    L, C, S, N = dims.n_text_layer, dims.n_text_state, dims.n_audio_ctx, dims.n_text_ctx
    t = [1, N]
    if role == "decoder_stateful":
        b: Any = next(x for x in io.STATEFUL_BATCHES if io.stateful_function_name(x) == function)
    else:
        b = [1, io.MAX_BATCH]
    shapes = {
        "cross_k": [L, 1, C, S],
        "cross_v": [L, 1, C, S],
        "logits": [b, t, dims.n_vocab],
        "k_new": [L, b, C, t],
        "v_new": [L, b, C, t],
        "alignment": [b, n_alignment_heads, t, S],
    }
    return shapes


def fill_output_shapes(
    functions: dict[str, Any], role: str, dims: ModelDims, n_alignment_heads: int
) -> dict[str, Any]:
    """`functions` (from convert.describe_package) with contract shapes where the spec has none."""
    for name, fn in functions.items():
        shapes = contract_output_shapes(role, name, dims, n_alignment_heads)
        for out in fn["outputs"]:
            if not out["shape"] and out["name"] in shapes:
                out["shape"] = shapes[out["name"]]
    return functions


# ------------------------------------------------------------------ hashing


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            yield Path(dirpath) / name


def file_table(root: Path, *, hashes: bool = True) -> dict[str, dict[str, Any]]:
    """{relative posix path: {size, sha256}} for every file under root, sorted."""
    table = {}
    for path in sorted(_walk_files(root)):
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if hashes:
            entry["sha256"] = sha256_file(path)
        table[path.relative_to(root).as_posix()] = entry
    return table


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write manifest.json (with its checksum) atomically; returns what was written."""
    manifest = dict(manifest)
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    write_text(directory / io.MANIFEST_FILE, text, durable=True)
    return manifest


# ------------------------------------------------------------------ the opened directory


@dataclass(frozen=True)
class ModelDirectory:
    """A checked model directory: its manifest and where everything is.

    Path-like (``Path(model_dir)`` works), so callers that only need the
    location can treat it as one.
    """

    path: Path
    manifest: dict[str, Any] = field(repr=False)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def dims(self) -> ModelDims:
        return ModelDims(**self.manifest["dims"])

    @property
    def alignment_heads(self) -> np.ndarray:
        return np.asarray(self.manifest["alignment_heads"], dtype=np.int64).reshape(-1, 2)

    @property
    def tokenizer_files(self) -> Path:
        """The directory holding the model's own tokenizer files."""
        return self.path / TOKENIZER_DIR

    @property
    def stateful_batches(self) -> tuple[int, ...]:
        return tuple(int(b) for b in self.manifest.get("stateful_batches", ()))

    def package(self, role: str) -> Path:
        """The path of a package by role: "encoder", "decoder" or "decoder_stateful"."""
        return self.path / self.manifest["packages"][role]["file"]

    def has_package(self, role: str) -> bool:
        return role in self.manifest["packages"]

    def size_bytes(self) -> int:
        total = sum(
            e["size"] for p in self.manifest["packages"].values() for e in p["files"].values()
        )
        return total + sum(e["size"] for e in self.manifest["tokenizer"]["files"].values())


def _damaged(path: Path, what: str) -> ModelDirectoryError:
    return ModelDirectoryError(
        f"The model directory {path} is damaged ({what}); "
        f"delete it (wruntime remove {path.name}) and build it again."
    )


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise ModelDirectoryError(f"{path} is not a built model directory.")
    file = path / io.MANIFEST_FILE
    if not file.is_file():
        raise _damaged(path, f"no {io.MANIFEST_FILE}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise _damaged(path, f"{io.MANIFEST_FILE} is not readable JSON") from None
    if not isinstance(manifest, dict):
        raise _damaged(path, f"{io.MANIFEST_FILE} is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelDirectoryError(
            f"The model directory {path} has format version {version}, this wruntime reads "
            f"{FORMAT_VERSION}; build it again (wruntime build {path.name} --force)."
        )
    if manifest.get("manifest_sha256") != manifest_checksum(manifest):
        raise _damaged(path, f"{io.MANIFEST_FILE} was modified after the build")
    return manifest


def _check_functions(path: Path, role: str, entry: Mapping[str, Any]) -> None:
    inputs, outputs, states = _EXPECTED_IO[role]
    functions = entry.get("functions") or {}
    if "main" not in functions:
        raise _damaged(path, f"{entry.get('file')} has no main function in the manifest")
    for fn_name, fn in functions.items():
        got = (
            tuple(f["name"] for f in fn["inputs"]),
            tuple(f["name"] for f in fn["outputs"]),
            tuple(f["name"] for f in fn["states"]),
        )
        if role == "decoder" and fn_name == "main":
            # An ANE-style decoder may keep the vocabulary chunks as logits_0, logits_1, ...
            outs = tuple("logits" if n.startswith("logits_") else n for n in got[1])
            got = (got[0], tuple(dict.fromkeys(outs)), got[2])
        if (set(got[0]), set(got[1]), set(got[2])) != (set(inputs), set(outputs), set(states)):
            raise ModelDirectoryError(
                f"{path / entry['file']} ({fn_name}) does not have the inputs/outputs this "
                f"wruntime expects; build it again (wruntime build {path.name} --force)."
            )


def _stat_table(path: Path, files: Mapping[str, Mapping[str, Any]]) -> dict[str, list[int]]:
    """(size, mtime) of the large files; small ones are hashed on every load instead,
    because coremltools rewrites a package's Manifest.json (same bytes, new mtime)
    each time it opens the package."""
    return {
        rel: [(st := (path / rel).stat()).st_size, st.st_mtime_ns]
        for rel in sorted(files)
        if files[rel]["size"] >= SMALL_FILE
    }


def _all_listed(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every file the manifest lists, relative to the directory."""
    listed = {}
    for entry in manifest["packages"].values():
        for rel, info in entry["files"].items():
            listed[f"{entry['file']}/{rel}"] = info
    tok = manifest["tokenizer"]
    for rel, info in tok["files"].items():
        listed[f"{tok['dir']}/{rel}"] = info
    return listed


def write_stamp(path: Path, manifest: Mapping[str, Any]) -> None:
    """Record that every file was hashed just now (see the module docstring)."""
    stamp = {
        "manifest_sha256": manifest.get("manifest_sha256"),
        "files": _stat_table(path, _all_listed(manifest)),
    }
    with contextlib.suppress(OSError):  # a read-only cache just re-hashes next time
        write_text(path / STAMP_FILE, json.dumps(stamp))


def _stamp_matches(path: Path, manifest: Mapping[str, Any], listed: Mapping[str, Any]) -> bool:
    try:
        stamp = json.loads((path / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("manifest_sha256") == manifest.get("manifest_sha256") and stamp.get(
        "files"
    ) == _stat_table(path, listed)


def verify_directory(path: Path, manifest: Mapping[str, Any], *, verify: bool | None) -> None:
    """Raise ModelDirectoryError unless the files are those the manifest lists."""
    try:
        packages = manifest["packages"]
        listed = _all_listed(manifest)
        for role, entry in packages.items():
            if role not in _EXPECTED_IO:
                raise _damaged(path, f"unknown package role {role!r} in the manifest")
            _check_functions(path, role, entry)
    except (KeyError, TypeError, AttributeError):
        raise _damaged(path, f"{io.MANIFEST_FILE} lacks required fields") from None
    for role in ("encoder", "decoder"):
        if role not in packages:
            raise _damaged(path, f"no {PACKAGE_FILES[role]} in the manifest")
    # Presence and sizes, and nothing extra inside a package.
    for rel, info in listed.items():
        file = path / rel
        if not file.is_file():
            raise _damaged(path, f"{rel} is missing")
        if file.stat().st_size != info["size"]:
            raise _damaged(path, f"{rel} has the wrong size")
    for entry in packages.values():
        pkg = path / entry["file"]
        extra = {p.relative_to(pkg).as_posix() for p in _walk_files(pkg)} - set(entry["files"])
        if extra:
            raise _damaged(path, f"unexpected file {entry['file']}/{sorted(extra)[0]}")
    if verify is False:
        return
    stamped = verify is None and _stamp_matches(path, manifest, listed)
    for rel, info in listed.items():
        if stamped and info["size"] >= SMALL_FILE:
            continue
        if sha256_file(path / rel) != info["sha256"]:
            raise _damaged(path, f"{rel} does not match its recorded sha256")
    if not stamped:
        write_stamp(path, manifest)


def load_model_dir(path: str | os.PathLike[str], verify: bool | None = None) -> ModelDirectory:
    """Open a built directory after checking it (see the module docstring for ``verify``)."""
    path = Path(path)
    manifest = _read_manifest(path)
    verify_directory(path, manifest, verify=verify)
    return ModelDirectory(path=path, manifest=manifest)


# ------------------------------------------------------------------ atomic creation


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale(root: Path, name: str, max_age: float = 86400.0) -> None:
    """Remove staging directories of builds that died (their process is gone, or very old)."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if not entry.name.startswith(f".{name}{_TMP_MARK}") and not entry.name.startswith(
            f".{name}{_OLD_MARK}"
        ):
            continue
        try:
            pid = int(entry.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            pid = -1
        too_old = time.time() - entry.stat().st_mtime > max_age
        if too_old or pid <= 0 or not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def staging_directory(dest: Path) -> Iterator[Path]:
    """A temporary directory next to ``dest``, removed unless the caller published it.

    Lives beside the destination (same filesystem) so publishing is a rename,
    and is named after the building process so a crashed build's leftovers are
    recognised and cleaned by the next build (`clean_stale`).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest.parent, dest.name)
    tmp = dest.parent / f".{dest.name}{_TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, dest: Path, *, replace: bool) -> bool:
    """Rename a complete staging directory into place.

    Returns False (and discards ``tmp``) when ``dest`` exists and ``replace`` is
    off: another process finished the same build first, and its result is as good.
    """
    if dest.exists() and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}{_OLD_MARK}{os.getpid()}-{os.urandom(4).hex()}"
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        if old is not None and not dest.exists():
            os.replace(old, dest)  # put the previous build back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


def remove_directory(path: Path) -> None:
    """Delete a model directory: renamed away first, so no half-deleted directory is ever seen."""
    trash = path.parent / f".{path.name}{_OLD_MARK}{os.getpid()}-{os.urandom(4).hex()}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in _walk_files(path))
