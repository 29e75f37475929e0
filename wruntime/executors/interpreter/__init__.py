"""The MIL interpreter: runs a saved `.mlpackage` with numpy, anywhere.

    model = InterpreterModel("encoder.mlpackage")            # function "main"
    out = model.predict({"mel": mel})                         # like MLModel.predict
    dec = InterpreterModel(pkg_path, function_name="batch5")  # one function of several
    state = dec.make_state(); dec.predict(inputs, state)      # stateful (MLState-like)

Loading reads the package's spec and MIL program (loader.py), materialises every
weight once and compiles the function into prepared kernel calls (plan.py,
kernels.py); `predict` only runs that plan.
"""

from wruntime.executors.interpreter.loader import FeatureDesc, FunctionDesc, Package, load_package
from wruntime.executors.interpreter.model import InterpreterModel, InterpreterState


def supported_ops() -> frozenset[str]:
    """Every MIL op type the interpreter runs (besides const and constexpr_* weights)."""
    from wruntime.executors.interpreter.kernels import KERNELS

    return frozenset(KERNELS)


__all__ = [
    "FeatureDesc",
    "FunctionDesc",
    "InterpreterModel",
    "InterpreterState",
    "Package",
    "load_package",
    "supported_ops",
]
