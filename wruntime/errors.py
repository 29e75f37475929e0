"""User-facing errors.

Every failure a user can cause (a bad file, an unknown model name, a damaged
model directory) is raised as a `WruntimeError` whose message is one complete
sentence. The CLI prints that sentence alone and exits non-zero; anything else
that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class WruntimeError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class AudioError(WruntimeError):
    """The audio could not be read or is unusable."""


class WeightsError(WruntimeError):
    """A weight file or directory is missing, truncated or malformed."""


class ModelNameError(WruntimeError):
    """A model name that the catalog does not know."""


class ModelDirectoryError(WruntimeError):
    """A built model directory is damaged, incomplete or from another builder."""


class ExecutorError(WruntimeError):
    """An executor cannot load or run a package (unsupported op, wrong OS, ...)."""


def describe_error(exc: BaseException) -> str:
    """One line for any failure: a WruntimeError's sentence, else the type and first line.

    Command lines print this instead of a traceback; anything that is not a
    WruntimeError is a bug, and says how to see its traceback.
    """
    if isinstance(exc, WruntimeError):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"internal error ({detail}); run with --debug for the traceback."
