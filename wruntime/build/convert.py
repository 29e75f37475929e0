"""ct.convert wrappers, and reading a saved package back (I/O description, op types).

Kept in one place because coremltools has traps (see the project notes): a
Program is mutated by ct.convert, so every conversion gets a fresh one; flexible
dimensions must be given again through ``inputs=`` or they silently become
(1, 2); the progress bars ct.convert prints are swallowed so the caller's own
progress display stays readable.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import coremltools as ct
from coremltools.converters.mil.mil import Program

#: Deployment targets by the names the catalog and the manifest use.
TARGETS = {"iOS16": ct.target.iOS16, "iOS17": ct.target.iOS17, "iOS18": ct.target.iOS18}

_COMMON_OPS = frozenset(
    {
        # channels-first projections, fp16-safe layer norm, exact GELU, attention
        "abs", "add", "cast", "concat", "const", "conv", "expand_dims", "gelu", "identity",
        "maximum", "mul", "real_div", "reduce_max", "reduce_mean", "reshape", "rsqrt",
        "softmax", "split", "sub", "transpose",
    }
)  # fmt: skip
_DECODER_OPS = _COMMON_OPS | {
    # tied-embedding lookup from the vocabulary chunks, runtime shapes, all-heads attention
    "gather", "greater_equal", "linear", "matmul", "minimum", "select", "shape",
    "slice_by_index", "slice_by_size",
}  # fmt: skip
#: Every op type a saved fp32/fp16 package contains after ct.convert's passes, by package
#: role, as the spec's protobuf names them (the MIL interpreter must run exactly these).
#: "identity" only in fp32 packages (their fp32 outputs); "cast" only in fp16 ones (and in
#: the stateful decoder, whose fp16 states feed an fp32 program); "greater_equal"/"select"
#: pick a token's vocabulary chunk (and come from coremltools' negative-gather-index
#: guard); "write_state" is what pymil calls coreml_update_state. Compressed packages add
#: constexpr_* weight ops.
PACKAGE_OP_TYPES = {
    "encoder": _COMMON_OPS | {"einsum"},
    "decoder": _DECODER_OPS | {"stack"},
    "decoder_stateful": _DECODER_OPS | {"read_state", "slice_update", "write_state"},
}

_DTYPES = {65568: "fp32", 65552: "fp16", 131104: "int32", 131080: "int8"}


def target_of(name: str | Any) -> Any:
    """A ``ct.target`` from "iOS17"-style names (or a ct.target, returned as is)."""
    if isinstance(name, str):
        try:
            return TARGETS[name]
        except KeyError:
            raise ValueError(f"unknown deployment target {name!r}") from None
    return name


def target_name(target: Any) -> str:
    for name, value in TARGETS.items():
        if value == target:
            return name
    raise ValueError(f"unknown deployment target {target!r}")


@contextlib.contextmanager
def quiet() -> Any:
    """Swallow coremltools' pass-pipeline progress bars (tqdm on stderr)."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def pass_pipeline() -> ct.PassPipeline:
    """coremltools' default passes, minus two.

    - reduce_transposes: the programs are written with few transposes
      (channels-first throughout), and that pass was a fifth of a decoder's
      conversion time for nothing;
    - fuse_elementwise_to_batchnorm: on an fp16 program it builds a batch_norm
      with fp32 mean/variance and fp16 gamma, which its own validation rejects
      (coremltools 9.0); layer norm's scale and shift stay a mul and an add.
    """
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(["common::reduce_transposes", "common::fuse_elementwise_to_batchnorm"])
    return pipeline


def convert(
    program: Program,
    *,
    fp16: bool,
    target: Any,
    inputs: Sequence[ct.TensorType] | None = None,
) -> ct.models.MLModel:
    """Convert a freshly built MIL program to an ML program (not loaded: no runtime here).

    The programs are already in their compute precision (layers.compute_dtype),
    so the conversion itself runs in FLOAT32 mode, which adds no casts: asking
    for FLOAT16 here would only rerun coremltools' slow fp16 pass over a program
    with nothing left to cast. ``fp16`` is checked against the program's inputs.
    """
    del fp16  # the precision is in the program; kept for the callers' clarity
    with quiet():
        return ct.convert(
            program,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT32,
            minimum_deployment_target=target_of(target),
            inputs=list(inputs) if inputs is not None else None,
            pass_pipeline=pass_pipeline(),
            skip_model_load=True,
        )


#: A step applied to a converted model before it is saved into the directory:
#: (model, package role such as "encoder") -> model. Compression plugs in here.
PackageStage = Callable[[ct.models.MLModel, str], ct.models.MLModel]


def apply_stages(
    model: ct.models.MLModel, role: str, stages: Sequence[PackageStage]
) -> ct.models.MLModel:
    for stage in stages:
        model = stage(model, role)
    return model


def save_multifunction(
    models: dict[str, ct.models.MLModel], dest: Path, default_function: str = "main"
) -> None:
    """Save several single-function models as one package whose functions share weights.

    Fast path: merge the converted programs in memory, deduplicate their
    constants and serialise once (about 3 s for tiny.en). coremltools' public
    save_multifunction does the same from saved packages but reloads them and
    re-validates the program after each of ~100 skipped passes (10+ s); it
    remains the fallback if coremltools' internals differ from 9.0's.
    """
    try:
        _merge_in_memory(models, default_function).save(str(dest))
    except Exception:
        shutil.rmtree(dest, ignore_errors=True)
        _save_multifunction_public(models, dest, default_function)


def _merge_in_memory(models: dict[str, ct.models.MLModel], default_function: str) -> Any:
    from coremltools import proto
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    program = Program()
    functions = []
    for fn, model in models.items():
        program.add_function(fn, model._mil_program.functions["main"])
        desc = model.get_spec().description
        functions.append(
            proto.Model_pb2.FunctionDescription(
                name=fn, input=desc.input, output=desc.output, state=desc.state
            )
        )
    PASS_REGISTRY["common::const_deduplication"]._deduplicate_const_across_functions(program)
    program.default_function_name = default_function
    program.skip_all_passes = True
    program.export_as_multifunction = True
    with quiet():
        return mil_convert(
            program,
            convert_to="mlprogram",
            convert_from="milinternal",
            specification_version=max(m.get_spec().specificationVersion for m in models.values()),
            compute_units=ct.ComputeUnit.CPU_ONLY,
            model_description=proto.Model_pb2.ModelDescription(
                functions=functions, defaultFunctionName=default_function
            ),
            skip_model_load=True,
            pass_pipeline=ct.PassPipeline.EMPTY,
        )


def _save_multifunction_public(
    models: dict[str, ct.models.MLModel], dest: Path, default_function: str
) -> None:
    from coremltools.models.utils import MultiFunctionDescriptor
    from coremltools.models.utils import save_multifunction as _save

    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".mf-") as scratch:
        desc = MultiFunctionDescriptor()
        for fn, model in models.items():
            path = Path(scratch) / f"{fn}.mlpackage"
            model.save(str(path))
            desc.add_function(str(path), src_function_name="main", target_function_name=fn)
        desc.default_function_name = default_function
        with quiet():
            _save(desc, str(dest))


# ------------------------------------------------------------ reading back


def _feature(feature: Any) -> dict[str, Any]:
    """A spec FeatureDescription as {name, shape, dtype}; flexible dims as [lo, hi]."""
    kind = feature.type.WhichOneof("Type")
    if kind == "stateType":
        arr = feature.type.stateType.arrayType
    elif kind == "multiArrayType":
        arr = feature.type.multiArrayType
    else:  # pragma: no cover - the builder makes tensors only
        return {"name": feature.name, "kind": kind}
    shape: list[Any] = [int(s) for s in arr.shape]
    ranges = arr.shapeRange.sizeRanges
    if len(ranges) == len(shape):
        shape = [
            int(r.lowerBound)
            if r.lowerBound == r.upperBound
            else [int(r.lowerBound), int(r.upperBound)]
            for r in ranges
        ]
    return {
        "name": feature.name,
        "shape": shape,
        "dtype": _DTYPES.get(arr.dataType, str(arr.dataType)),
    }


def describe_package(path: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Each function's inputs, outputs and states, as saved in the package's spec."""
    spec = ct.utils.load_spec(str(path))
    desc = spec.description
    functions = list(desc.functions) if len(desc.functions) else [desc]
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for fn in functions:
        name = getattr(fn, "name", "") or "main"
        out[name] = {
            "inputs": [_feature(f) for f in fn.input],
            "outputs": [_feature(f) for f in fn.output],
            "states": [_feature(f) for f in fn.state],
        }
    return out


def load_program(path: Path) -> Program:
    """The MIL program of a saved package, with its weights (what an interpreter executes)."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    with quiet():
        return milproto_load(
            spec,
            specification_version=spec.specificationVersion,
            file_weights_dir=model.weights_dir,
        )


def op_types(path: Path) -> dict[str, list[str]]:
    """The sorted op types of every function of a saved package (nested blocks included)."""
    program = load_program(path)
    result = {}
    for name, fn in program.functions.items():
        seen: set[str] = set()
        stack = [fn]
        while stack:
            block = stack.pop()
            for op in block.operations:
                seen.add(op.op_type)
                stack.extend(op.blocks)
        result[name] = sorted(seen)
    return result


def spec_op_types(path: Path) -> dict[str, list[str]]:
    """Like `op_types`, read from the spec's protobuf alone (no weights): cheap enough to
    record in every manifest, so an executor can refuse a package it cannot run up front."""
    spec = ct.utils.load_spec(str(path))
    result = {}
    for name, fn in spec.mlProgram.functions.items():
        seen: set[str] = set()
        stack = [fn.block_specializations[fn.opset]]
        while stack:
            block = stack.pop()
            for op in block.operations:
                seen.add(op.type)
                stack.extend(op.blocks)
        result[name] = sorted(seen)
    return result
