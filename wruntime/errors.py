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
