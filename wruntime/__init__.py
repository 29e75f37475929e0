"""wruntime: Whisper on Apple silicon through a split Core ML model.

The package is organised by stage, each importing only the ones before it:
errors → audio → features → tokenizer → weights → catalog → build →
executors → decoding → transcribe → profile → cli.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from wruntime.transcribe import Transcriber

__all__ = ["Transcriber", "__version__"]


def __getattr__(name: str) -> Any:
    # Importing the transcriber pulls in coremltools and librosa; keep
    # `import wruntime` cheap for tools that only want the version or errors.
    if name == "Transcriber":
        from wruntime.transcribe import Transcriber

        return Transcriber
    raise AttributeError(f"module 'wruntime' has no attribute {name!r}")
