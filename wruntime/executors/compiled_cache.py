"""The compiled-model cache: each `.mlpackage` compiled to `.mlmodelc` once, kept beside it.

Why: `ct.models.MLModel(path.mlpackage)` compiles the package to a temporary `.mlmodelc` on
every load (seconds for the encoder, before the OS even starts specializing it for the Neural
Engine). Compiling once with `coremltools.models.utils.compile_model(pkg, destination_path=...)`
and loading the result with `ct.models.CompiledMLModel` skips that step on every later load.

Layout, inside the model directory::

    compiled/
      macos-15.1-coremltools-9.0/          one key per (macOS version, coremltools version)
        decoder-1a2b3c4d5e6f.mlmodelc      <package stem>-<fingerprint of the package>
        decoder-1a2b3c4d5e6f.json          compile and first-load seconds, for profiling
      .tmp-<random>/                       a compile in progress (renamed into place when done)

Invalidation: a compiled model is only looked up under the current key and the current
package fingerprint, so one built by another macOS or coremltools version, or from a package
that has since been rebuilt, is never loaded; it is pruned and the package recompiled (with a
`CompiledModelRebuilt` warning, since that first load is slow again). The fingerprint is
content-based (small files hashed whole, the weight file by size and three 1 MiB samples), so
copying a model directory does not force a recompile but rebuilding it does.

Atomicity: the compiler writes into `.tmp-<random>/` on the same file system and the finished
directory is renamed into place in one step; a failed or interrupted compile leaves nothing
under the key, and a concurrent process that wins the race is simply used.

Nothing here imports coremltools except the default compile function, which runs on macOS
only; the keying, lookup, pruning and renaming are plain directories, tested on Linux.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wruntime.errors import ExecutorError
from wruntime.executors.compute_units import format_version

COMPILED_DIR = "compiled"
_TMP_PREFIX = ".tmp-"
#: A staging directory older than this is a crashed compile, not a concurrent one.
STALE_TMP_SECONDS = 3600.0
_SAMPLE = 1 << 20
_SMALL_FILE = 4 << 20

CompileFn = Callable[[Path, Path], None]


class CompiledModelRebuilt(UserWarning):
    """A compiled model from another macOS/coremltools version (or an older build) was replaced."""


def coremltools_version() -> str:
    """Read from package metadata so that computing the key does not import coremltools."""
    try:
        return importlib.metadata.version("coremltools")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(os_version: tuple[int, ...], ct_version: str) -> str:
    """'macos-15.1-coremltools-9.0': the compiled format may change with either."""
    safe = "".join(c if c.isalnum() or c in ".+_" else "_" for c in ct_version)
    return f"macos-{format_version(os_version)}-coremltools-{safe}"


def package_fingerprint(package: Path) -> str:
    """A short content hash of an .mlpackage that changes whenever the package is rebuilt."""
    package = Path(package)
    if not package.is_dir():
        raise ExecutorError(f"{package} is not an .mlpackage directory; rebuild the model.")
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(package).as_posix()}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= _SMALL_FILE:
                digest.update(f.read())
            else:
                for offset in (0, size // 2, size - _SAMPLE):
                    f.seek(offset)
                    digest.update(f.read(_SAMPLE))
    return digest.hexdigest()[:12]


def coreml_compile(package: Path, destination: Path) -> None:
    """Compile with Core ML (macOS only): `compile_model` requires the `.mlmodelc` suffix."""
    from coremltools.models.utils import compile_model

    compile_model(str(package), destination_path=str(destination))


@dataclass
class CompileOutcome:
    """Where the compiled model is, and what getting it cost."""

    path: Path
    compiled: bool  # False: found in the cache
    compile_seconds: float | None = None
    pruned: list[Path] = field(default_factory=list)


class CompiledModelCache:
    """Compiled models of one model directory, for one macOS and coremltools version."""

    def __init__(
        self, root: Path, os_version: tuple[int, ...], ct_version: str | None = None
    ) -> None:
        self.root = Path(root)
        self.os_version = tuple(os_version)
        self.ct_version = ct_version if ct_version is not None else coremltools_version()
        self.key = cache_key(self.os_version, self.ct_version)

    @classmethod
    def for_model_dir(
        cls, model_dir: Path, os_version: tuple[int, ...], ct_version: str | None = None
    ) -> CompiledModelCache:
        return cls(Path(model_dir) / COMPILED_DIR, os_version, ct_version)

    @property
    def key_dir(self) -> Path:
        return self.root / self.key

    def entry_path(self, package: Path, fingerprint: str | None = None) -> Path:
        package = Path(package)
        fingerprint = fingerprint or package_fingerprint(package)
        return self.key_dir / f"{package_stem(package)}-{fingerprint}.mlmodelc"

    def lookup(self, package: Path, fingerprint: str | None = None) -> Path | None:
        entry = self.entry_path(package, fingerprint)
        return entry if entry.is_dir() else None

    def stale_entries(self, package: Path, fingerprint: str | None = None) -> list[Path]:
        """Compiled copies of this package that must not be loaded: other keys or builds."""
        current = self.entry_path(package, fingerprint)
        stem = package_stem(package)
        if not self.root.is_dir():
            return []
        stale = []
        for key_dir in sorted(self.root.iterdir()):
            if not key_dir.is_dir() or key_dir.name.startswith(_TMP_PREFIX):
                continue
            for entry in sorted(key_dir.glob(f"{stem}-*.mlmodelc")):
                if entry != current and _entry_stem(entry) == stem:
                    stale.append(entry)
        return stale

    def prune(self, package: Path | None = None, fingerprint: str | None = None) -> list[Path]:
        """Remove what can never be loaded again; return what was removed.

        Other keys go wholesale (they belong to another macOS or coremltools install; a model
        directory lives in one user's cache), crashed staging directories go after an hour,
        and with `package`, older builds of that package under the current key.
        """
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        now = time.time()
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(_TMP_PREFIX):
                if now - child.stat().st_mtime > STALE_TMP_SECONDS:
                    _remove(child)
                    removed.append(child)
            elif child.is_dir() and child.name != self.key:
                _remove(child)
                removed.append(child)
        if package is not None:
            for entry in self.stale_entries(package, fingerprint):
                if entry.exists():
                    _remove(entry)
                    _remove(entry.with_suffix(".json"))
                    removed.append(entry)
        return removed

    @contextlib.contextmanager
    def staging(self, package: Path, fingerprint: str | None = None) -> Iterator[Path]:
        """Yield a path to write the compiled model to; rename it into the cache on success.

        The yielded path does not exist yet (Core ML's compiler creates it). On an exception
        nothing is left behind. If another process installed the same entry meanwhile, its
        copy is kept and ours discarded: both came from the same package.
        """
        entry = self.entry_path(package, fingerprint)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
        try:
            target = tmp / entry.name
            yield target
            if not target.is_dir():
                raise ExecutorError(
                    f"Compiling {Path(package).name} produced no {entry.suffix} directory; "
                    "check the package with coremltools."
                )
            self.key_dir.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(target, entry)
            except OSError:
                if not entry.is_dir():
                    raise
        finally:
            _remove(tmp)

    def ensure(
        self, package: Path, compile_fn: CompileFn = coreml_compile, *, prune: bool = True
    ) -> CompileOutcome:
        """The compiled model for `package`: from the cache, or compiled now and cached."""
        package = Path(package)
        fingerprint = package_fingerprint(package)
        found = self.lookup(package, fingerprint)
        if found is not None:
            return CompileOutcome(path=found, compiled=False)
        stale = self.stale_entries(package, fingerprint)
        if stale:
            warnings.warn(
                f"The compiled {package.name} in {stale[0].parent} is from another macOS, "
                f"coremltools or build of the model; recompiling it for {self.key} "
                "(this first load is slow, later ones are not).",
                CompiledModelRebuilt,
                stacklevel=2,
            )
        started = time.perf_counter()
        try:
            with self.staging(package, fingerprint) as target:
                compile_fn(package, target)
        except ExecutorError:
            raise
        except Exception as exc:  # Core ML reports compile failures as plain Exceptions
            raise ExecutorError(
                f"Core ML could not compile {package.name} ({_one_line(exc)}); rebuild the model "
                "or run it with --executor interpreter."
            ) from exc
        seconds = time.perf_counter() - started
        pruned = self.prune(package, fingerprint) if prune else []
        entry = self.entry_path(package, fingerprint)
        self.write_record(entry, {"compile_seconds": seconds})
        return CompileOutcome(path=entry, compiled=True, compile_seconds=seconds, pruned=pruned)

    # ----------------------------------------------------------------- load records

    def read_record(self, entry: Path) -> dict:
        """What the first load of this compiled model cost (compile + load seconds)."""
        try:
            return json.loads(Path(entry).with_suffix(".json").read_text())
        except (OSError, ValueError):
            return {}

    def write_record(self, entry: Path, updates: dict) -> None:
        """Merge `updates` into the entry's record; best effort, atomically replaced."""
        path = Path(entry).with_suffix(".json")
        record = self.read_record(entry) | updates
        try:
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".json", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)


def package_stem(package: Path) -> str:
    """'decoder_stateful' for '.../decoder_stateful.mlpackage'."""
    return Path(package).name.removesuffix("/").rsplit(".", 1)[0]


def _entry_stem(entry: Path) -> str:
    return entry.name.rsplit(".", 1)[0].rsplit("-", 1)[0]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.rstrip(".")
