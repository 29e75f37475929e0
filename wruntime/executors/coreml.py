"""The Core ML executor: one package function, loaded by Core ML with its own compute units.

Everything around the call into Core ML lives here and runs on Linux too: reading the
function's declared inputs, outputs and states from the package spec, casting inputs to the
declared dtypes (int32 tokens, fp32 arrays, C-contiguous), validating shapes against the
declared ranges (beam batch sizes), naming and casting outputs, wrapping states, the
compute-unit and OS checks, and the compiled-model cache. Only the object that answers
`predict`/`make_state` differs by platform, and it comes from a *backend factory*:

- `CoreMLBackend()` (the default, macOS): compiles the package once into the model
  directory's cache and loads it with `ct.models.CompiledMLModel(path, compute_units,
  function_name)`; falls back to `ct.models.MLModel(package, ...)` (which compiles to a
  temporary directory on every load) when the cache cannot be written.
- `interpreter_backend` (any OS): the MIL interpreter on the very same package, so the Linux
  suite drives this class end to end (pass `factory=interpreter_backend`, or set
  WRUNTIME_COREML_BACKEND=interpreter to route `--executor coreml` through it).

A factory is any callable `(LoadRequest) -> backend` where the backend has `predict(inputs,
state=None) -> dict` and `make_state()`, i.e. the shape of `coremltools.models.MLModel`.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wruntime.build.interface import DECODER_FILE, STATEFUL_DECODER_FILE
from wruntime.errors import ExecutorError
from wruntime.executors.compiled_cache import CompiledModelCache, package_stem
from wruntime.executors.compute_units import (
    DEFAULT_COMPUTE_UNITS,
    EXPLICIT,
    STATEFUL,
    ComputeUnits,
    Host,
    check_compute_units,
    check_deployment_target,
    choose_decoder_variant,
    current_host,
    default_compute_units,
    parse_compute_units,
    parse_optimization_hints,
    require_coreml,
)
from wruntime.executors.interpreter.loader import FeatureDesc, FunctionDesc, function_desc

# --------------------------------------------------------------------------- package signature


@dataclass(frozen=True)
class PackageInfo:
    """What the spec of a saved package declares: its target and each function's interface."""

    path: Path
    specification_version: int
    functions: dict[str, FunctionDesc]
    #: The function Core ML loads when given none ("main" for a single-function package).
    default_function: str
    #: A multifunction package (iOS 18, `ct.utils.save_multifunction`) must be loaded with
    #: `function_name`; a single-function one must not (MLModel accepts only "main" there).
    is_multifunction: bool


def read_package_info(package: str | Path) -> PackageInfo:
    """Read a package's spec (protobuf only: no weights, no Core ML runtime, any OS)."""
    path = Path(package)
    if not (path / "Manifest.json").is_file():
        raise ExecutorError(f"'{path}' is not a saved .mlpackage; rebuild the model.")
    try:
        # coremltools prints "Failed to load _MLModelProxy" off macOS on first import.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from coremltools.models.utils import load_spec

            spec = load_spec(str(path))
    except Exception as exc:
        raise ExecutorError(f"Cannot read the model spec of '{path}'; rebuild the model.") from exc
    desc = spec.description
    if len(desc.functions):  # multifunction package (iOS 18): one description per function
        functions = {f.name: function_desc(f.name, f) for f in desc.functions}
        default = desc.defaultFunctionName or next(iter(functions))
    else:
        functions = {"main": function_desc("main", desc)}
        default = "main"
    return PackageInfo(
        path, int(spec.specificationVersion), functions, default, bool(len(desc.functions))
    )


def decoder_variant_for_directory(
    model_dir: str | Path,
    os_version: tuple[int, ...] | None,
    manifest: Mapping[str, Any] | None = None,
    prefer: str | None = None,
) -> str:
    """Which decoder a Mac on `os_version` should load from a built model directory.

    Deployment targets come from the manifest when it records them, else from each package's
    spec (the specification version Core ML itself checks). See `choose_decoder_variant`.
    """
    model_dir = Path(model_dir)
    targets: dict[str, str | int] = {}
    for variant, file in ((EXPLICIT, DECODER_FILE), (STATEFUL, STATEFUL_DECODER_FILE)):
        declared = _manifest_target(manifest, file)
        if declared is not None:
            targets[variant] = declared
        elif (model_dir / file).is_dir():
            targets[variant] = read_package_info(model_dir / file).specification_version
    return choose_decoder_variant(targets, os_version, prefer)


def _manifest_target(manifest: Mapping[str, Any] | None, file: str) -> str | int | None:
    """A package's deployment target as the manifest records it, if it does."""
    if not manifest:
        return None
    packages = manifest.get("packages")
    entry: Any = None
    if isinstance(packages, Mapping):  # wruntime.build: {role: {"file": ..., ...}}
        entry = packages.get(package_stem(Path(file)))
        packages = list(packages.values())
    if not isinstance(entry, Mapping) and isinstance(packages, list):
        entry = next(
            (p for p in packages if isinstance(p, Mapping) and p.get("file") == file), None
        )
    if isinstance(entry, Mapping):
        return entry.get("deployment_target")
    return None


def stage_of(package: Path) -> str:
    """'encoder' or 'decoder' from the package's file name (decoder_stateful is a decoder)."""
    stem = package_stem(package)
    for stage in DEFAULT_COMPUTE_UNITS:
        if stem.startswith(stage):
            return stage
    return stem


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadRequest:
    """What a backend factory is asked to load."""

    package: Path
    #: The function as Core ML names it: None for a single-function package (Core ML insists
    #: on the default there; `MLModel` rejects any name but "main"), else the function name.
    function_name: str | None
    compute_units: ComputeUnits
    info: PackageInfo
    host: Host


@dataclass
class LoadInfo:
    """What loading cost, kept apart because a Core ML first load is a different animal.

    A first load compiles the package and lets the OS specialize it for the device (for the
    Neural Engine, seconds to minutes); a warm load reuses both. `first_load_seconds` is
    the compile + load time recorded when this compiled model was first loaded (also on warm
    loads, read back from the cache record), so a profile can show both numbers.
    """

    backend: str
    compute_units: ComputeUnits
    compiled: bool = False  # this load compiled the package
    compile_seconds: float | None = None
    load_seconds: float = 0.0
    first_load_seconds: float | None = None
    compiled_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def warm(self) -> bool:
        return not self.compiled

    @property
    def total_seconds(self) -> float:
        return (self.compile_seconds or 0.0) + self.load_seconds

    def as_dict(self) -> dict[str, Any]:
        """Plain values for a profile report."""
        return {
            "backend": self.backend,
            "compute_units": self.compute_units.name,
            "load": "first" if self.compiled else "warm",
            "compile_seconds": self.compile_seconds,
            "load_seconds": self.load_seconds,
            "first_load_seconds": self.first_load_seconds,
            "compiled_path": str(self.compiled_path) if self.compiled_path else None,
            "notes": list(self.notes),
        }


BackendFactory = Callable[[LoadRequest], Any]


class CoreMLBackend:
    """The real thing (macOS): compile once into the model directory's cache, then load it."""

    name = "coreml"

    def __init__(
        self,
        cache_root: Path | None = None,
        *,
        use_cache: bool = True,
        optimization_hints: Mapping[str, str | bool] | None = None,
    ) -> None:
        self.cache_root = cache_root
        self.use_cache = use_cache
        self.optimization_hints = dict(optimization_hints or {})
        self.last_load: LoadInfo | None = None

    def _hints(self, request: LoadRequest) -> dict[str, Any] | None:
        """coremltools wants enum members (ct.SpecializationStrategy.FastPrediction, ...)."""
        import coremltools as ct

        parsed = parse_optimization_hints(self.optimization_hints, request.host)
        if not parsed:
            return None  # an empty dict is fine too, but None skips the macOS 15 check
        enums = {
            "specializationStrategy": ct.SpecializationStrategy,
            "reshapeFrequency": ct.ReshapeFrequency,
        }
        return {k: enums[k][v] if k in enums else v for k, v in parsed.items()}

    def __call__(self, request: LoadRequest) -> Any:
        import coremltools as ct

        require_coreml(request.host)
        units = ct.ComputeUnit[request.compute_units.name]
        hints = self._hints(request)
        info = LoadInfo(backend=self.name, compute_units=request.compute_units)
        self.last_load = info
        cache = self._cache(request)
        if cache is None:
            # MLModel compiles the package to a temporary .mlmodelc on every load. It does not
            # raise when Core ML fails to load: it warns and leaves `__proxy__` None, and
            # `predict` then fails with a generic message, so check the proxy here.
            info.notes.append("compiled-model cache not writable; compiling on every load")
            started = time.perf_counter()
            model = ct.models.MLModel(
                str(request.package),
                compute_units=units,
                function_name=request.function_name,
                optimization_hints=hints,
            )
            info.load_seconds = time.perf_counter() - started
            info.compiled = True
            if getattr(model, "__proxy__", None) is None:
                raise ExecutorError(
                    f"Core ML could not load {request.package.name} on macOS "
                    f"{request.host.version_text}; run it with --executor interpreter or rebuild "
                    "the model."
                )
            return model
        outcome = cache.ensure(request.package)
        info.compiled = outcome.compiled
        info.compile_seconds = outcome.compile_seconds
        info.compiled_path = outcome.path
        if outcome.pruned:
            info.notes.append(f"removed {len(outcome.pruned)} stale compiled model(s)")
        started = time.perf_counter()
        try:
            # CompiledMLModel(path: str, compute_units, function_name, optimization_hints)
            # loads the .mlmodelc without recompiling; unlike MLModel it raises on failure.
            # function_name None means the default function ("" to the framework).
            model = ct.models.CompiledMLModel(
                str(outcome.path),
                compute_units=units,
                function_name=request.function_name,
                optimization_hints=hints,
            )
        except Exception as exc:
            raise ExecutorError(
                f"Core ML could not load the compiled {request.package.name} "
                f"({' '.join(str(exc).split())[:200]}); delete {outcome.path} to recompile it, "
                "or run with --executor interpreter."
            ) from exc
        info.load_seconds = time.perf_counter() - started
        if outcome.compiled:
            info.first_load_seconds = info.total_seconds
            cache.write_record(outcome.path, {"first_load_seconds": info.first_load_seconds})
        else:
            info.first_load_seconds = cache.read_record(outcome.path).get("first_load_seconds")
        return model

    def _cache(self, request: LoadRequest) -> CompiledModelCache | None:
        if not self.use_cache:
            return None
        root = self.cache_root or request.package.parent / "compiled"
        cache = CompiledModelCache(root, request.host.os_version)
        try:
            cache.root.mkdir(parents=True, exist_ok=True)
            probe = cache.root / f".tmp-probe-{package_stem(request.package)}"
            probe.touch()
            probe.unlink()
        except OSError:
            return None
        return cache


class InterpreterBackend:
    """The MIL interpreter on the same package (any OS): what the Linux suite runs.

    Only the innermost call changes: the executor's checks, casts and output handling are the
    ones the Core ML path runs. Compute units are recorded, not acted on (numpy has one kind).
    """

    name = "interpreter"

    def __call__(self, request: LoadRequest) -> Any:
        from wruntime.executors.interpreter import InterpreterModel

        return InterpreterModel(request.package, function_name=request.function_name)


interpreter_backend = InterpreterBackend()

#: Set to "interpreter" to run the Core ML executor's code path with the MIL interpreter as its
#: backend, on any OS (how the Linux suite transcribes "through Core ML"); default "coreml".
BACKEND_ENV = "WRUNTIME_COREML_BACKEND"


def default_backend_factory() -> BackendFactory:
    """The backend `CoreMLExecutor` uses when given none: Core ML, unless BACKEND_ENV says."""
    choice = os.environ.get(BACKEND_ENV, "coreml").strip().lower() or "coreml"
    if choice == "coreml":
        return CoreMLBackend()
    if choice == "interpreter":
        return interpreter_backend
    raise ExecutorError(f"{BACKEND_ENV}={choice!r} is not a backend; use coreml or interpreter.")


# --------------------------------------------------------------------------- the executor


class CoreMLState:
    """A state from `make_state()`, tied to the executor (and function) that made it.

    Core ML states have the shape of one function; passing the batch-5 function's cache to the
    batch-1 function fails deep inside Core ML, so the executor checks ownership first.
    `read_state`/`write_state` forward to `MLState.read_state`/`write_state` (coremltools 8+).
    """

    def __init__(self, owner: CoreMLExecutor, inner: Any) -> None:
        self.owner = owner
        self.inner = inner

    def read_state(self, name: str) -> np.ndarray:
        return np.asarray(self.inner.read_state(name))

    def write_state(self, name: str, value: np.ndarray) -> None:
        desc = self.owner._states.get(name)
        if desc is None:
            raise ExecutorError(f"{self.owner.label} has no state named '{name}'.")
        self.inner.write_state(name, np.ascontiguousarray(value, dtype=desc.dtype))


class CoreMLExecutor:
    """One function of one package, run by Core ML (or by `factory`) with its compute units.

    Implements the `Executor` protocol. Construction loads the model: on macOS with the default
    factory that means checks (OS, deployment target, compute units), the compiled-model cache,
    and `CompiledMLModel`; `load_info` says what it cost.
    """

    def __init__(
        self,
        package: str | Path | Any,
        function_name: str | None = None,
        compute_units: str | ComputeUnits | None = None,
        *,
        stage: str | None = None,
        factory: BackendFactory | None = None,
        host: Host | None = None,
        fp16_emulation: bool | None = None,
        info: PackageInfo | None = None,
    ) -> None:
        # `package` may be the interpreter's already-read Package (load_executor allows it).
        self.package = Path(getattr(package, "path", package))
        self.stage = stage or stage_of(self.package)
        if fp16_emulation:
            raise ExecutorError(
                "fp16 emulation is an interpreter option; Core ML computes in the package's own "
                "precision, so drop it or use --executor interpreter."
            )
        self.host = host if host is not None else current_host()
        if compute_units is None:
            compute_units = default_compute_units(self.stage, self.host)
        self.compute_units = parse_compute_units(compute_units)
        if factory is None:
            factory = default_backend_factory()
        if isinstance(factory, CoreMLBackend):
            require_coreml(self.host)  # before reading anything: the clearest error first
        self.info = info if info is not None else read_package_info(self.package)
        function_name = function_name or self.info.default_function
        self.function = self._function(function_name)
        self.function_name = function_name
        self.label = f"{self.package.name} ({function_name})"
        self._inputs = {d.name: d for d in self.function.inputs}
        self._outputs = {d.name: d for d in self.function.outputs}
        self._states = {d.name: d for d in self.function.states}
        if self.host.is_macos:
            check_deployment_target(self.package.name, self.info.specification_version, self.host)
            check_compute_units(self.compute_units, self.host, self.stage)

        backend_factory = factory
        request = LoadRequest(
            package=self.package,
            function_name=function_name if self.info.is_multifunction else None,
            compute_units=self.compute_units,
            info=self.info,
            host=self.host,
        )
        started = time.perf_counter()
        self.backend = backend_factory(request)
        elapsed = time.perf_counter() - started
        reported = getattr(backend_factory, "last_load", None)
        self.load_info: LoadInfo = reported or LoadInfo(
            backend=getattr(
                backend_factory, "name", getattr(backend_factory, "__name__", "custom")
            ),
            compute_units=self.compute_units,
            load_seconds=elapsed,
        )

    def _function(self, name: str) -> FunctionDesc:
        if name in self.info.functions:
            return self.info.functions[name]
        known = ", ".join(sorted(self.info.functions))
        raise ExecutorError(
            f"{self.package.name} has no function '{name}' (it has {known}); rebuild the model."
        )

    # ------------------------------------------------------------------ Executor protocol

    @property
    def is_stateful(self) -> bool:
        return bool(self._states)

    @property
    def input_descriptions(self) -> Mapping[str, FeatureDesc]:
        return self._inputs

    @property
    def output_descriptions(self) -> Mapping[str, FeatureDesc]:
        return self._outputs

    def make_state(self) -> CoreMLState:
        if not self._states:
            raise ExecutorError(f"{self.label} is stateless; it has no state to make.")
        return CoreMLState(self, self.backend.make_state())

    def predict(
        self, inputs: Mapping[str, np.ndarray], state: Any | None = None
    ) -> dict[str, np.ndarray]:
        feed = self.prepare_inputs(inputs)
        inner = self._check_state(state)
        # Core ML (via coremltools) may rewrite the dict it is given (fp16 -> fp32 inputs), so
        # it gets our own dict, never the caller's.
        raw = self.backend.predict(feed) if inner is None else self.backend.predict(feed, inner)
        return self.collect_outputs(raw)

    # ------------------------------------------------------------------ plumbing (public for tests)

    def prepare_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Declared names only, cast to the declared dtypes, C-contiguous, shapes checked."""
        missing = [n for n in self._inputs if n not in inputs]
        unknown = [n for n in inputs if n not in self._inputs]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown {', '.join(unknown)}")
            raise ExecutorError(f"{self.label} got the wrong inputs ({'; '.join(parts)}).")
        feed = {}
        for name, desc in self._inputs.items():
            value = np.asarray(inputs[name])
            if desc.dtype.kind == "i" and value.dtype.kind == "f":
                raise ExecutorError(f"{self.label}: input '{name}' must hold integers, not floats.")
            # A fresh contiguous array in the declared dtype: Core ML copies a non-contiguous
            # array element by element and rejects an int64 where int32 is declared.
            value = np.ascontiguousarray(value, dtype=desc.dtype)
            problem = desc.shape_error(value.shape)
            if problem is not None:
                hint = self._batch_hint(name, desc, value.shape)
                raise ExecutorError(f"{self.label}: input '{name}' {problem}{hint}.")
            feed[name] = value
        return feed

    def collect_outputs(self, raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The declared outputs, as numpy; floats as fp32 (the contract in build.interface)."""
        missing = [n for n in self._outputs if n not in raw]
        if missing:
            raise ExecutorError(
                f"{self.label} returned no {', '.join(missing)}; rebuild the model."
            )
        out = {}
        for name in self._outputs:
            value = np.asarray(raw[name])
            if value.dtype.kind == "f" and value.dtype != np.float32:
                value = value.astype(np.float32)
            out[name] = value
        return out

    def _check_state(self, state: Any | None) -> Any | None:
        if not self._states:
            if state is not None:
                raise ExecutorError(f"{self.label} is stateless; call predict without a state.")
            return None
        if state is None:
            raise ExecutorError(f"{self.label} is stateful; pass the state from make_state().")
        if not isinstance(state, CoreMLState) or state.owner is not self:
            raise ExecutorError(
                f"{self.label} was given a state made by another executor; use its own make_state()."
            )
        return state.inner

    def _batch_hint(self, name: str, desc: FeatureDesc, shape: tuple[int, ...]) -> str:
        """Say so when the wrong size is the beam batch (the likeliest mistake)."""
        axis = 1 if name in ("k_cache", "v_cache") else 0
        if name not in ("tokens", "beam_order", "k_cache", "v_cache") or len(shape) <= axis:
            return ""
        expected = desc.ranges[axis] if desc.ranges else (desc.shape[axis],) * 2
        if expected[0] <= shape[axis] <= expected[1] or expected[1] < 0:
            return ""
        if expected[0] == expected[1]:
            return f" (this function has a fixed beam batch of {expected[0]})"
        return f" (the beam batch must be {expected[0]} to {expected[1]})"

    def __repr__(self) -> str:
        return (
            f"CoreMLExecutor({self.label}, {self.compute_units}, backend={self.load_info.backend})"
        )
