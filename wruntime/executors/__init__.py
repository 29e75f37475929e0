"""Executors: who answers `predict` for a saved package (see base.py for the interface).

`load_executor(path, kind="interpreter")` is the one place that picks an
implementation; the Core ML executor (macOS) joins here as another `kind`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wruntime.errors import ExecutorError
from wruntime.executors.base import Executor

EXECUTOR_KINDS = ("interpreter", "coreml")


def load_executor(
    path: str | Path | Any,
    kind: str = "interpreter",
    function_name: str | None = None,
    **options: Any,
) -> Executor:
    """Load one function of a saved package with the executor `kind`.

    Options go to the executor: for the interpreter, `fp16_emulation=True`.
    `path` may be a `Package` already read, to share one read among functions.
    """
    if kind == "interpreter":
        from wruntime.executors.interpreter import InterpreterModel

        return InterpreterModel(path, function_name=function_name, **options)
    if kind == "coreml":  # options: compute_units, stage, factory, host (see executors/coreml.py)
        from wruntime.executors.coreml import CoreMLExecutor

        return CoreMLExecutor(path, function_name=function_name, **options)
    raise ExecutorError(f"Unknown executor '{kind}'; known executors: {', '.join(EXECUTOR_KINDS)}.")


__all__ = ["EXECUTOR_KINDS", "Executor", "load_executor"]
