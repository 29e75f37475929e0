"""Read a saved `.mlpackage`: its feature descriptions and its MIL program.

The interpreter must accept exactly what Core ML accepts, so the input/output/state
descriptions come from the model spec (the same protobuf Core ML reads), not from
the MIL program: the spec carries the ranged and enumerated shapes that the
program only knows as symbols.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wruntime.errors import ExecutorError

# Core ML's ArrayFeatureType.ArrayDataType values (FeatureTypes.proto).
_ARRAY_DTYPES = {
    65568: np.dtype(np.float32),
    65600: np.dtype(np.float64),
    65552: np.dtype(np.float16),
    131104: np.dtype(np.int32),
    131080: np.dtype(np.int8),
}


@dataclass(frozen=True)
class FeatureDesc:
    """One declared input, output or state and the shapes Core ML would accept for it."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    #: Per-dimension (lower, upper) bounds; upper -1 means unbounded. None if not ranged.
    ranges: tuple[tuple[int, int], ...] | None = None
    #: The accepted shapes of an input with enumerated shapes. None if not enumerated.
    enumerated: tuple[tuple[int, ...], ...] | None = None

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        """Why `shape` is not accepted for this feature, or None if it is."""
        if self.enumerated:
            if tuple(shape) in self.enumerated:
                return None
            allowed = ", ".join(str(s) for s in self.enumerated)
            return f"has shape {tuple(shape)}, but the model accepts only {allowed}"
        if self.ranges:
            if len(shape) != len(self.ranges):
                return f"has rank {len(shape)}, but the model expects rank {len(self.ranges)}"
            for dim, (size, (lo, hi)) in enumerate(zip(shape, self.ranges, strict=True)):
                if size < lo or (hi >= 0 and size > hi):
                    top = "inf" if hi < 0 else hi
                    return f"has size {size} in dimension {dim}, outside the allowed [{lo}, {top}]"
            return None
        if tuple(shape) != self.shape:
            return f"has shape {tuple(shape)}, but the model expects {self.shape}"
        return None


@dataclass(frozen=True)
class FunctionDesc:
    """The declared interface of one function of the package."""

    name: str
    inputs: tuple[FeatureDesc, ...]
    outputs: tuple[FeatureDesc, ...]
    states: tuple[FeatureDesc, ...]


@dataclass
class Package:
    """A loaded package: where it is, its interface per function, and its MIL program."""

    path: Path
    spec: Any
    functions: dict[str, FunctionDesc]
    default_function: str
    program: Any


def _array_desc(name: str, array_type: Any, what: str) -> FeatureDesc:
    dtype = _ARRAY_DTYPES.get(array_type.dataType)
    if dtype is None:
        raise ExecutorError(
            f"The {what} '{name}' has an array data type wruntime packages do not use."
        )
    shape = tuple(int(s) for s in array_type.shape)
    ranges = None
    enumerated = None
    kind = array_type.WhichOneof("ShapeFlexibility")
    if kind == "shapeRange":
        ranges = tuple(
            (int(r.lowerBound), int(r.upperBound)) for r in array_type.shapeRange.sizeRanges
        )
    elif kind == "enumeratedShapes":
        enumerated = tuple(
            tuple(int(s) for s in e.shape) for e in array_type.enumeratedShapes.shapes
        )
    return FeatureDesc(name, dtype, shape, ranges, enumerated)


def _feature(feature: Any, what: str) -> FeatureDesc:
    kind = feature.type.WhichOneof("Type")
    if kind == "multiArrayType":
        return _array_desc(feature.name, feature.type.multiArrayType, what)
    if kind == "stateType":
        return _array_desc(feature.name, feature.type.stateType.arrayType, what)
    raise ExecutorError(
        f"The {what} '{feature.name}' is of type {kind}; wruntime packages use multi-arrays."
    )


def function_desc(name: str, desc: Any) -> FunctionDesc:
    """A function's inputs, outputs and states as its spec declares them (Core ML reads the same)."""
    return FunctionDesc(
        name=name,
        inputs=tuple(_feature(f, "input") for f in desc.input),
        outputs=tuple(_feature(f, "output") for f in desc.output),
        states=tuple(_feature(f, "state") for f in desc.state),
    )


def _quietly(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call into coremltools without its chatter about the missing macOS runtime."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


def _weights_dir(path: Path) -> Path:
    """The package's weights directory, found through Manifest.json as Core ML does."""
    manifest = json.loads((path / "Manifest.json").read_text())
    for item in manifest.get("itemInfoEntries", {}).values():
        if item.get("name") == "weights":
            return path / "Data" / item["path"]
    return path / "Data" / "com.apple.CoreML" / "weights"


def load_package(path: str | Path) -> Package:
    """Read the spec, the function descriptions and the MIL program of a saved `.mlpackage`."""
    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise ExecutorError(f"'{path}' is not a saved .mlpackage (no Manifest.json in it).")
    try:
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    except ImportError as exc:  # pragma: no cover - coremltools is a dependency
        raise ExecutorError(f"The interpreter needs coremltools to read packages ({exc}).") from exc
    try:
        spec = _quietly(ct.utils.load_spec, str(path))
    except Exception as exc:
        raise ExecutorError(f"Cannot read the model spec of '{path}': {exc}") from exc
    if spec.WhichOneof("Type") != "mlProgram":
        raise ExecutorError(
            f"'{path}' is not an ML program; the interpreter runs only ML programs."
        )

    desc = spec.description
    functions: dict[str, FunctionDesc] = {}
    if len(desc.functions):
        for fdesc in desc.functions:
            functions[fdesc.name] = function_desc(fdesc.name, fdesc)
        default = desc.defaultFunctionName or "main"
    else:
        functions["main"] = function_desc("main", desc)
        default = "main"

    try:
        program = _quietly(
            milproto_load,
            spec,
            specification_version=spec.specificationVersion,
            file_weights_dir=str(_weights_dir(path)),
        )
    except Exception as exc:
        raise ExecutorError(f"Cannot load the MIL program of '{path}': {exc}") from exc
    return Package(
        path=path, spec=spec, functions=functions, default_function=default, program=program
    )
