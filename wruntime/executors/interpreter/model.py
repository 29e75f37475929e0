"""`InterpreterModel`: a saved `.mlpackage` behind the `coremltools.models.MLModel` interface.

It checks inputs the way Core ML does (names, dtypes, the declared fixed,
ranged or enumerated shapes) so code that runs here also runs on a Mac, and
it keeps a stateful model's state in an object shaped like Core ML's `MLState`
(`read_state` / `write_state`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wruntime.errors import ExecutorError
from wruntime.executors.interpreter.fp16 import round_fp16
from wruntime.executors.interpreter.loader import FeatureDesc, FunctionDesc, Package, load_package
from wruntime.executors.interpreter.plan import Plan, compile_function


class InterpreterState:
    """The state of one stateful function (the decoder's KV cache), like Core ML's MLState.

    Arrays are kept in fp32 holding fp16-exact values when the state is declared
    fp16 (the only state dtype Core ML allows), so the kernels can use BLAS.
    """

    def __init__(self, descs: tuple[FeatureDesc, ...], owner: str) -> None:
        self._descs = {d.name: d for d in descs}
        self._owner = owner
        self.arrays: dict[str, np.ndarray] = {
            d.name: np.zeros(d.shape, dtype=np.float32 if d.dtype.kind == "f" else d.dtype)
            for d in descs
        }

    @property
    def owner(self) -> str:
        return self._owner

    def _desc(self, name: str) -> FeatureDesc:
        if name not in self._descs:
            raise ExecutorError(
                f"The state has no array '{name}' (it has: {', '.join(self._descs)})."
            )
        return self._descs[name]

    def read_state(self, name: str) -> np.ndarray:
        """A copy of state array `name` in its declared dtype."""
        return self.arrays[self._desc(name).name].astype(self._descs[name].dtype)

    def write_state(self, name: str, value: np.ndarray) -> None:
        """Replace state array `name` (shape must match; values rounded to the declared dtype)."""
        desc = self._desc(name)
        value = np.asarray(value)
        if value.shape != desc.shape:
            raise ExecutorError(
                f"State '{name}' has shape {desc.shape}; the value given has {value.shape}."
            )
        self.set(name, value)

    def set(self, name: str, value: Any, exact: bool = False) -> np.ndarray:
        """Store `value`; `exact` says it already holds values of the declared dtype."""
        desc = self._descs[name]
        value = np.reshape(value, desc.shape)
        if exact and value.dtype == np.float32:
            stored = value
        elif desc.dtype == np.float16:
            stored = round_fp16(value)
        elif desc.dtype.kind == "f":
            stored = np.array(value, dtype=np.float32)
        else:
            stored = np.array(value, dtype=desc.dtype)
        self.arrays[name] = stored
        return stored


class _StateSlot:
    """What a state variable holds during a run: a handle on one array of the state."""

    __slots__ = ("name", "state")

    def __init__(self, state: InterpreterState, name: str) -> None:
        self.state = state
        self.name = name

    @property
    def value(self) -> np.ndarray:
        return self.state.arrays[self.name]

    def write(self, value: Any, exact: bool = False) -> np.ndarray:
        return self.state.set(self.name, value, exact)


def _describe(value: Any) -> str:
    return type(value).__name__ if not isinstance(value, np.ndarray) else f"array of {value.dtype}"


class InterpreterModel:
    """One function of a saved `.mlpackage`, executed with numpy.

    `path` may also be a `Package` already read by `load_package`, so several
    functions of one multifunction package share one read of its weights file.
    `fp16_emulation` rounds every op's float result to fp16, to study fp16 numerics
    (inputs enter as the package declares them; an fp16 package casts them itself).
    """

    def __init__(
        self,
        path: str | Path | Package,
        function_name: str | None = None,
        fp16_emulation: bool = False,
    ) -> None:
        self.package = path if isinstance(path, Package) else load_package(path)
        name = function_name or self.package.default_function
        if name not in self.package.functions:
            have = ", ".join(sorted(self.package.functions))
            raise ExecutorError(
                f"The package '{self.package.path.name}' has no function '{name}' (it has: {have})."
            )
        self.function_name = name
        self.fp16_emulation = fp16_emulation
        self.description: FunctionDesc = self.package.functions[name]
        self.plan: Plan = compile_function(self.package.program, name, fp16_emulation)
        self._inputs = {d.name: d for d in self.description.inputs}
        missing = [n for n in self._inputs if n not in self.plan.input_slots]
        if missing:
            raise ExecutorError(
                f"The package's function {name} declares inputs its program lacks: {', '.join(missing)}."
            )
        self._output_dtypes = {d.name: d.dtype for d in self.description.outputs}

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return [name for name, _ in self.plan.output_slots]

    def get_spec(self) -> Any:
        return self.package.spec

    def make_state(self) -> InterpreterState:
        """A fresh, zeroed state for this function; raises for stateless functions."""
        if not self.description.states:
            raise ExecutorError(f"The function {self.function_name} of this package has no state.")
        return InterpreterState(self.description.states, self._owner_key())

    def _owner_key(self) -> str:
        return f"{self.package.path}:{self.function_name}"

    def _prepare(self, name: str, value: Any) -> np.ndarray:
        desc = self._inputs[name]
        arr = np.asarray(value)
        kind = arr.dtype.kind
        if desc.dtype.kind == "f":
            if kind not in "fiu":
                raise ExecutorError(
                    f"Input '{name}' is {_describe(value)}; the model expects {desc.dtype} numbers."
                )
        elif kind not in "iub":
            raise ExecutorError(
                f"Input '{name}' is {_describe(value)}; the model expects {desc.dtype} integers."
            )
        why = desc.shape_error(arr.shape)
        if why:
            raise ExecutorError(f"Input '{name}' {why}.")
        if desc.dtype == np.float16:
            return round_fp16(arr)
        if desc.dtype.kind == "f":
            return arr.astype(np.float32, copy=False)
        return arr.astype(desc.dtype, copy=False)

    def predict(
        self, inputs: dict[str, np.ndarray], state: Any | None = None
    ) -> dict[str, np.ndarray]:
        """Run the function once, like `MLModel.predict`."""
        if not isinstance(inputs, dict):
            raise ExecutorError(
                f"predict takes a dict of named arrays, not {type(inputs).__name__}."
            )
        unknown = [k for k in inputs if k not in self._inputs]
        if unknown:
            raise ExecutorError(
                f"Unknown input '{unknown[0]}'; the model's inputs are: {', '.join(self._inputs)}."
            )
        feeds: dict[int, Any] = {}
        for name in self._inputs:
            if name not in inputs:
                raise ExecutorError(
                    f"Input '{name}' is missing; the model's inputs are: {', '.join(self._inputs)}."
                )
            feeds[self.plan.input_slots[name]] = self._prepare(name, inputs[name])
        if self.plan.state_slots:
            if state is None:
                raise ExecutorError(
                    f"The function {self.function_name} is stateful: pass state=model.make_state()."
                )
            if not isinstance(state, InterpreterState) or state.owner != self._owner_key():
                raise ExecutorError(
                    "The state was not made by this model's make_state() (another package or function)."
                )
            for name, slot in self.plan.state_slots.items():
                feeds[slot] = _StateSlot(state, name)
        elif state is not None:
            raise ExecutorError(f"The function {self.function_name} has no state; pass state=None.")

        values = self.plan.run(feeds)
        result: dict[str, np.ndarray] = {}
        for (name, slot), value in zip(self.plan.output_slots, values, strict=True):
            dtype = self._output_dtypes.get(name, np.asarray(value).dtype)
            arr = np.asarray(value)
            # Never hand out a view of a weight, of the state or of another output.
            shared = arr.base is not None or self.plan.template[slot] is not None
            copy = shared or not arr.flags.owndata or arr.dtype != dtype
            result[name] = np.array(arr, dtype=dtype) if copy else arr
        return result
