"""The executor interface: the shape of `coremltools.models.MLModel`.

Everything downstream of a built model directory (decoding, transcription,
profiling, every test) talks to a package through this protocol only, so the
artifact that ships to an iPhone is the one measured on Linux, and the Core ML
path differs only in who executes `predict`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Executor(Protocol):
    """One loaded package function that answers `predict`."""

    def predict(
        self, inputs: dict[str, np.ndarray], state: Any | None = None
    ) -> dict[str, np.ndarray]:
        """Run the function once; `state` comes from `make_state()` for stateful packages."""
        ...

    def make_state(self) -> Any:
        """A fresh state (the stateful decoder's KV cache); raises for stateless packages."""
        ...
