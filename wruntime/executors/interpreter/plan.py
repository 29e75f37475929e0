"""Compile one MIL function, once, into a flat list of prepared kernel calls over slots.

At load time every op is resolved to its kernel (attributes bound), every weight
is materialised once as fp32 (including the `constexpr_*` decompression ops), ops
whose inputs are all constant are folded, and every variable gets an integer
slot in a list, freed after its last use. A run is then one loop of
`env[out] = fn(*[env[i] for i in ins])` with no look-ups by name; an op the
interpreter cannot run is refused here, by name, never in the middle of a run.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wruntime.errors import ExecutorError
from wruntime.executors.interpreter import threads
from wruntime.executors.interpreter.fp16 import is_float, round_fp16
from wruntime.executors.interpreter.kernels import KERNELS, STATEFUL_OPS, Args, linear_kernel

# Ops that only move or select values: rounding their output to fp16 again is a
# no-op, so fp16 emulation skips it.
_DATA_MOVEMENT = frozenset(
    {
        "reshape",
        "transpose",
        "expand_dims",
        "squeeze",
        "identity",
        "slice_by_index",
        "slice_by_size",
        "gather",
        "gather_along_axis",
        "gather_nd",
        "concat",
        "split",
        "stack",
        "tile",
        "read_state",
        "coreml_update_state",
        "shape",
        "select",
        "band_part",
        "pad",
    }
)


@dataclass(frozen=True)
class Step:
    """One prepared kernel call: where its inputs are, where its outputs go, what dies."""

    fn: Callable[..., Any]
    ins: tuple[int, ...]
    outs: tuple[int, ...]
    free: tuple[int, ...]
    round_fp16: bool
    op_type: str
    op_name: str


@dataclass
class Plan:
    """A compiled function: the initial slot list (constants filled in) and the steps."""

    function: str
    template: list[Any]
    steps: list[Step]
    input_slots: dict[str, int]
    state_slots: dict[str, int]
    output_slots: list[tuple[str, int]]
    fp16_emulation: bool = False
    op_counts: dict[str, int] = field(default_factory=dict)

    def run(self, feeds: dict[int, Any]) -> list[Any]:
        """Execute the steps; `feeds` maps input and state slots to their values."""
        threads.begin_run()
        env = self.template.copy()
        for slot, value in feeds.items():
            env[slot] = value
        step = None
        try:
            for step in self.steps:
                result = step.fn(*[env[i] for i in step.ins])
                outs = step.outs
                if len(outs) == 1:
                    if step.round_fp16 and is_float(result):
                        result = round_fp16(result)
                    env[outs[0]] = result
                elif outs:
                    for slot, value in zip(outs, result, strict=True):
                        env[slot] = (
                            round_fp16(value) if step.round_fp16 and is_float(value) else value
                        )
                for slot in step.free:
                    env[slot] = None
        except ExecutorError:
            raise
        except (ValueError, IndexError, TypeError, FloatingPointError) as exc:
            where = f"op '{step.op_type}' (named '{step.op_name}')" if step else "the program"
            raise ExecutorError(
                f"The interpreter failed in {where} of function {self.function}: {exc}"
            ) from exc
        finally:
            threads.restore()
        return [env[slot] for _, slot in self.output_slots]


def _as_runtime(value: Any) -> Any:
    """A constant as the runtime handles it: floats in fp32, ints in int32, strings as str."""
    if isinstance(value, (str, bytes)):
        return value
    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    if arr.dtype.kind in "iu" and arr.dtype.itemsize > 4:
        return arr.astype(np.int32)
    if arr.dtype.kind in "US":
        return str(arr.reshape(()))
    return arr


def _materialize(op: Any, function: str, chained: dict[int, Any] | None = None) -> list[Any]:
    """The values of a const or constexpr_* op, decompressed once, in their stored dtypes.

    `chained` holds the already-materialised outputs of earlier constexpr ops. An
    input that is one of them (joint compression: a palette whose entries are the
    int8 output of a `constexpr_blockwise_shift_scale`) has no value of its own in
    the program, and coremltools' `materialized_val_inference` of most ops reads
    only values; it is given the earlier result for the duration of the call.
    """
    substituted = []
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if op.op_type == "const":
                values = [op.outputs[0].val]
            else:
                for var in op.inputs.values():
                    value = (chained or {}).get(id(var))
                    if value is not None and getattr(var, "val", None) is None:
                        held = var.sym_type()
                        held.val = value
                        substituted.append((var, var._sym_val))
                        var._sym_val = held
                values = op.materialized_val_inference()
                values = list(values) if isinstance(values, tuple) else [values]
    except Exception as exc:
        raise ExecutorError(
            f"op '{op.op_type}' (named '{op.name}', in function {function}) could not be "
            f"materialised by the interpreter: {exc}"
        ) from exc
    finally:
        for var, sym_val in substituted:
            var._sym_val = sym_val
    if len(values) != len(op.outputs) or any(v is None for v in values):
        raise ExecutorError(
            f"op '{op.op_type}' (named '{op.name}', in function {function}) has no constant value."
        )
    return values


def _feeds_constexpr(var: Any) -> bool:
    """Whether a later constexpr op decompresses from this var (a chained constexpr)."""
    return any(child.op_type.startswith("constexpr_") for child in var.child_ops)


def check_supported(function: Any, name: str) -> None:
    """Refuse, by name, the first op the interpreter has no kernel for."""
    for op in function.operations:
        kind = op.op_type
        if op.blocks:
            raise ExecutorError(
                f"op '{kind}' (in function {name}) is not supported by the interpreter "
                "(control flow with nested blocks)."
            )
        if kind == "const" or kind.startswith("constexpr_") or kind in KERNELS:
            continue
        raise ExecutorError(
            f"op '{kind}' (in function {name}) is not supported by the interpreter."
        )


def _is_state(var: Any) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)


# Ops whose output holds only values taken from their data inputs.
_PASS_THROUGH = {
    "reshape": ("x",),
    "transpose": ("x",),
    "expand_dims": ("x",),
    "squeeze": ("x",),
    "identity": ("x",),
    "slice_by_index": ("x",),
    "slice_by_size": ("x",),
    "gather": ("x",),
    "concat": ("values",),
    "split": ("x",),
    "stack": ("values",),
    "tile": ("x",),
    "slice_update": ("x", "update"),
}


def _produces_fp16_exact(op: Any, exact: set[int], fp16_emulation: bool) -> bool:
    """Whether `op`'s outputs hold only fp16-representable values, known at plan time.

    True for casts to fp16, state reads and updates (the state is fp16), ops that
    only move such values, and, under fp16 emulation, every fp16-typed result.
    """
    from coremltools.converters.mil.mil import types

    kind = op.op_type
    if kind in ("read_state", "coreml_update_state"):
        return True
    if kind == "cast":
        dtype = op.inputs.get("dtype")
        return dtype is not None and dtype.val == "fp16"
    if fp16_emulation and all(o.dtype == types.fp16 for o in op.outputs):
        return True
    names = _PASS_THROUGH.get(kind)
    if names is None:
        return False
    for input_name in names:
        v = op.inputs.get(input_name)
        for var in v if isinstance(v, (list, tuple)) else [v]:
            if var is None or id(var) not in exact:
                return False
    return True


def _casts_to_fp16(op: Any) -> bool:
    dtype = op.inputs.get("dtype") if op.op_type == "cast" else None
    return dtype is not None and dtype.val == "fp16"


def _pass_on(x: Any) -> Any:
    x = np.asarray(x)
    return x if x.dtype == np.float32 else x.astype(np.float32)


RawStep = tuple[Callable[..., Any], list[Any], list[Any], Any]


@dataclass(frozen=True)
class _FusedOp:
    """What a fused step reports as its op (for errors and fp16 rounding)."""

    op_type: str
    name: str


def _fuse_linear_concat(
    raw_steps: list[RawStep], known: dict[int, Any], outputs: list[Any]
) -> None:
    """Linears of one input concatenated along their output axis become one linear.

    A converter splits a large projection into pieces (Whisper's 51,864-way
    vocabulary into four, for the Neural Engine); run as one product the weight
    is streamed once, in one BLAS call, and the concat's copy disappears. Each
    output value is the same dot product plus the same bias (BLAS may order a
    sum differently: ~1e-7 relative on tiny.en's logits). Rewrites `raw_steps`
    in place.
    """
    producer = {id(v): i for i, (_, _, outs, _) in enumerate(raw_steps) for v in outs}
    uses = _uses(raw_steps, outputs)
    dead: set[int] = set()
    for index, (_, ins, outs, op) in enumerate(raw_steps):
        if op.op_type != "concat" or len(ins) < 2:
            continue
        interleave = known.get(id(op.inputs.get("interleave")))
        axis = known.get(id(op.inputs.get("axis")))
        if axis is None or bool(interleave) or int(axis) not in (-1, outs[0].rank - 1):
            continue
        sources = [producer.get(id(v)) for v in ins]
        if any(i is None or uses.get(id(v)) != 1 for i, v in zip(sources, ins, strict=True)):
            continue
        linears = [raw_steps[i][3] for i in sources]
        if any(o.op_type != "linear" for o in linears):
            continue
        xs = {id(o.inputs["x"]) for o in linears}
        weights = [known.get(id(o.inputs["weight"])) for o in linears]
        biases = [
            known.get(id(o.inputs["bias"])) if o.inputs.get("bias") is not None else None
            for o in linears
        ]
        if len(xs) != 1 or any(w is None for w in weights):
            continue
        if any(
            b is None and o.inputs.get("bias") is not None
            for b, o in zip(biases, linears, strict=True)
        ):
            continue  # a bias computed at run time
        bias = np.concatenate(
            [
                np.zeros(w.shape[0], np.float32) if b is None else b
                for w, b in zip(weights, biases, strict=True)
            ]
        )
        fn = linear_kernel([np.asarray(w, np.float32) for w in weights], bias)
        label = "+".join(o.name for o in linears) + "+" + op.name
        raw_steps[index] = (fn, [linears[0].inputs["x"]], outs, _FusedOp("linear", label))
        dead.update(sources)
    raw_steps[:] = [step for i, step in enumerate(raw_steps) if i not in dead]


def _uses(raw_steps: list[RawStep], outputs: list[Any]) -> dict[int, int]:
    uses: dict[int, int] = {}
    for _, ins, _, _ in raw_steps:
        for v in ins:
            uses[id(v)] = uses.get(id(v), 0) + 1
    for v in outputs:
        uses[id(v)] = uses.get(id(v), 0) + 1
    return uses


def _flag(known: dict[int, Any], op: Any, name: str) -> bool | None:
    """A boolean attribute's plan-time value (False when absent, None if computed)."""
    var = op.inputs.get(name)
    if var is None:
        return False
    value = known.get(id(var))
    return None if value is None else bool(value)


def _concat_matmul_kernel(
    concat_fn: Callable[..., Any],
    reshape_fn: Callable[..., Any] | None,
    matmul_fn: Callable[..., Any],
    side: int,
    transposed: bool,
) -> Callable[..., Any]:
    """A matmul of a (reshaped) last-axis concat, as products of the parts.

    `side` is 0 when the concat is the matmul's x, 1 when it is y; `transposed`
    is that operand's transpose flag. Concatenating along the last axis then
    multiplying is: along an output axis, the concat of the parts' products; along
    the contracted axis, the sum of the parts' products over the matching slices
    of the other operand. The reshape may regroup the leading axes only (checked
    at run time; otherwise the concat is built and the ops run as written).
    """
    # Which axis of the other operand (after its own transpose) the parts cut, or
    # which result axis they concatenate along.
    contracted = (side == 0) != transposed

    def concat_matmul(other: Any, tx: bool, ty: bool, shape: Any, *parts: Any) -> Any:
        lead = parts[0].shape[:-1]
        sizes = [p.shape[-1] for p in parts]
        if shape is not None:
            target = [int(d) for d in np.asarray(shape).reshape(-1)]
            if 0 in target and len(target) == len(lead) + 1:
                target = [
                    (lead[i] if i < len(lead) else sum(sizes)) if d == 0 else d
                    for i, d in enumerate(target)
                ]
            if not target or target[-1] != sum(sizes):
                whole = reshape_fn(concat_fn(*parts), shape)
                return matmul_fn(whole, other) if side == 0 else matmul_fn(other, whole)
            parts = [np.reshape(p, (*target[:-1], n)) for p, n in zip(parts, sizes, strict=True)]
        o = np.swapaxes(other, -1, -2) if (ty if side == 0 else tx) and other.ndim >= 2 else other
        if transposed:
            parts = [np.swapaxes(p, -1, -2) for p in parts]
        threads.for_product(
            sum(p.size for p in parts) * (o.shape[-1] if side == 0 else o.shape[-2])
        )
        if not contracted:
            results = [np.matmul(p, o) if side == 0 else np.matmul(o, p) for p in parts]
            return np.concatenate(results, axis=-2 if side == 0 else -1)
        total, start = None, 0
        for p, n in zip(parts, sizes, strict=True):
            if side == 0:
                term = np.matmul(p, o[..., start : start + n, :])
            else:
                term = np.matmul(o[..., start : start + n], p)
            total = term if total is None else np.add(total, term, out=total)
            start += n
        return total

    return concat_matmul


def _split_concat_matmul(
    raw_steps: list[RawStep], known: dict[int, Any], outputs: list[Any]
) -> None:
    """A matmul of a last-axis concat (maybe reshaped) runs on the parts, unconcatenated.

    An attention over an explicit KV cache concatenates the cache with this
    call's keys and values, copying the whole cache every call (tiny.en: 8 copies
    of 688 KB a token), only to multiply it once. Multiplying the parts reads the
    cache in place. Rewrites `raw_steps` in place.
    """
    producer = {id(v): i for i, (_, _, outs, _) in enumerate(raw_steps) for v in outs}
    uses = _uses(raw_steps, outputs)
    dead: set[int] = set()
    for index, (fn, ins, outs, op) in enumerate(raw_steps):
        if op.op_type != "matmul" or len(ins) != 2:
            continue
        tx, ty = _flag(known, op, "transpose_x"), _flag(known, op, "transpose_y")
        if tx is None or ty is None:
            continue
        for side in (0, 1):
            var = ins[side]
            chain = []  # the reshape (optional) then the concat, walking back
            src = producer.get(id(var))
            if src is None or uses.get(id(var)) != 1:
                continue
            if raw_steps[src][3].op_type == "reshape":
                chain.append(src)
                rvar = raw_steps[src][1][0]
                src = producer.get(id(rvar))
                if src is None or uses.get(id(rvar)) != 1:
                    continue
            cop = raw_steps[src][3]
            if cop.op_type != "concat" or src in dead:
                continue
            axis = known.get(id(cop.inputs.get("axis")))
            interleave = known.get(id(cop.inputs.get("interleave")))
            cout = raw_steps[src][2][0]
            if axis is None or bool(interleave) or int(axis) not in (-1, cout.rank - 1):
                continue
            parts = raw_steps[src][1]
            if len(parts) < 2 or cout.rank < 2:
                continue
            reshape_fn = raw_steps[chain[0]][0] if chain else None
            shape_var = raw_steps[chain[0]][1][1] if chain else None
            kernel = _concat_matmul_kernel(
                raw_steps[src][0], reshape_fn, fn, side, tx if side == 0 else ty
            )
            other = ins[1 - side]

            def bound(*values: Any, _k=kernel, _tx=tx, _ty=ty, _shaped=bool(chain)) -> Any:
                if _shaped:
                    return _k(values[0], _tx, _ty, values[1], *values[2:])
                return _k(values[0], _tx, _ty, None, *values[1:])

            new_ins = [other, *([shape_var] if chain else []), *parts]
            raw_steps[index] = (bound, new_ins, outs, op)
            dead.update([src, *chain])
            break
    raw_steps[:] = [step for i, step in enumerate(raw_steps) if i not in dead]


def compile_function(program: Any, name: str, fp16_emulation: bool = False) -> Plan:
    """Plan function `name` of a loaded MIL program."""
    if name not in program.functions:
        have = ", ".join(sorted(program.functions))
        raise ExecutorError(f"The package has no function '{name}' (it has: {have}).")
    function = program.functions[name]
    check_supported(function, name)

    known: dict[int, Any] = {}  # id(var) -> plan-time value
    chained: dict[int, Any] = {}  # id(var) -> stored-dtype value of a constexpr feeding another
    slots: dict[int, int] = {}
    n_slots = 0

    def slot_of(var: Any) -> int:
        nonlocal n_slots
        key = id(var)
        if key not in slots:
            slots[key] = n_slots
            n_slots += 1
        return slots[key]

    input_slots: dict[str, int] = {}
    state_slots: dict[str, int] = {}
    for input_name, var in function.inputs.items():
        if _is_state(var):
            state_slots[input_name] = slot_of(var)
        else:
            input_slots[input_name] = slot_of(var)

    # Vars that hold only fp16 values whatever the inputs (see _produces_fp16_exact).
    exact: set[int] = {id(v) for v in function.inputs.values() if _is_state(v)}
    already_exact: set[int] = set()  # ids of ops whose results need no fp16 rounding

    def known_value(var: Any) -> Any:
        return known.get(id(var))

    raw_steps: list[RawStep] = []
    op_counts: dict[str, int] = {}
    for op in function.operations:
        kind = op.op_type
        op_counts[kind] = op_counts.get(kind, 0) + 1
        if kind == "const" or kind.startswith("constexpr_"):
            for var, value in zip(op.outputs, _materialize(op, name, chained), strict=True):
                if kind != "const" and _feeds_constexpr(var):
                    chained[id(var)] = value
                value = _as_runtime(value)
                if fp16_emulation and is_float(value):
                    value = round_fp16(value)
                known[id(var)] = value
            continue
        fn, in_vars = KERNELS[kind](Args(op, known_value, name, lambda v: id(v) in exact))
        if not fp16_emulation and _casts_to_fp16(op):
            # Without emulation the interpreter computes in fp32 throughout: a cast
            # to fp16 passes its input on. Rounding there bought nothing but time
            # (an fp16 decoder casts its whole cache and cross K/V on every call:
            # ~30 ms a step for tiny.en). State writes still round (the state is fp16).
            fn = _pass_on
        elif _produces_fp16_exact(op, exact, False):
            already_exact.add(id(op))
            exact.update(id(v) for v in op.outputs)
        elif _produces_fp16_exact(op, exact, fp16_emulation):
            exact.update(id(v) for v in op.outputs)
        if kind not in STATEFUL_OPS and in_vars and all(id(v) in known for v in in_vars):
            # Constant folding: nothing here depends on the inputs of a run.
            try:
                result = fn(*[known[id(v)] for v in in_vars])
            except Exception as exc:
                raise ExecutorError(
                    f"op '{kind}' (named '{op.name}', in function {name}) failed on its "
                    f"constant inputs: {exc}"
                ) from exc
            results = [result] if len(op.outputs) == 1 else list(result)
            for var, value in zip(op.outputs, results, strict=True):
                if fp16_emulation and is_float(value):
                    value = round_fp16(value)
                known[id(var)] = value
            continue
        raw_steps.append((fn, in_vars, list(op.outputs), op))

    output_vars = list(function.outputs)
    _fuse_linear_concat(raw_steps, known, output_vars)
    _split_concat_matmul(raw_steps, known, output_vars)
    # Slots: constants used at run time go into the template; the rest are filled by runs.
    for _, in_vars, out_vars, _ in raw_steps:
        for v in (*in_vars, *out_vars):
            slot_of(v)
    for v in output_vars:
        slot_of(v)
    template: list[Any] = [None] * n_slots
    const_slots = set()
    for key, value in known.items():
        if key in slots:
            template[slots[key]] = value
            const_slots.add(slots[key])

    # Liveness: free each run-time slot after the last step that reads it.
    keep = {slots[id(v)] for v in output_vars} | const_slots | set(state_slots.values())
    last_use: dict[int, int] = {}
    for index, (_, in_vars, out_vars, _) in enumerate(raw_steps):
        for v in (*in_vars, *out_vars):
            last_use[slots[id(v)]] = index
    frees: dict[int, list[int]] = {}
    for slot, index in last_use.items():
        if slot not in keep:
            frees.setdefault(index, []).append(slot)

    steps = []
    for index, (fn, in_vars, out_vars, op) in enumerate(raw_steps):
        rounds = fp16_emulation and op.op_type not in _DATA_MOVEMENT and id(op) not in already_exact
        steps.append(
            Step(
                fn=fn,
                ins=tuple(slots[id(v)] for v in in_vars),
                outs=tuple(slots[id(v)] for v in out_vars),
                free=tuple(frees.get(index, ())),
                round_fp16=rounds,
                op_type=op.op_type,
                op_name=op.name,
            )
        )
    output_slots = [(v.name, slots[id(v)]) for v in output_vars]
    return Plan(
        function=name,
        template=template,
        steps=steps,
        input_slots=input_slots,
        state_slots=state_slots,
        output_slots=output_slots,
        fp16_emulation=fp16_emulation,
        op_counts=op_counts,
    )
