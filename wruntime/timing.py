"""An always-on, cheap stage timer.

Every transcription records where its time went (audio decode, features,
encoder, decoder, search, text) so a user sees the realtime factor and the
split between the Neural Engine and GPU stages without a profiler. Two clock
reads per stage entry keep it cheap enough to never switch off; the profiling
stage extends it with compute units and energy proxies.

Stages nest: the time of an inner stage is also inside its outer stage, so a
report lists them as they are, and callers that want exclusive times subtract.

The timer that code records into is found through a context variable, so a
deep stage (the decoding loop, an executor wrapper) can say
``with stage("decoder"):`` without the timer being threaded through every call.
With no timer active, `stage` costs one context-variable read.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

#: The stage names the transcriber reports, in pipeline order.
STAGES = ("audio", "features", "encoder", "decoder", "search", "text")

_current: contextvars.ContextVar[StageTimer | None] = contextvars.ContextVar(
    "wruntime_stage_timer", default=None
)


@dataclass
class StageStats:
    """Accumulated time of one stage: wall seconds, process CPU seconds, entries."""

    wall: float = 0.0
    cpu: float = 0.0
    count: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return {"wall": self.wall, "cpu": self.cpu, "count": self.count}


class StageTimer:
    """Accumulates wall and process-CPU time per named stage.

    Process CPU time (all threads) over wall time shows how many cores a stage
    kept busy: a BLAS-bound encoder on two cores reads near 2, a Python-bound
    search near 1, an executor waiting on the Neural Engine near 0.
    """

    def __init__(self) -> None:
        self.stats: dict[str, StageStats] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        wall0 = time.perf_counter()
        cpu0 = time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - wall0, time.process_time() - cpu0)

    def add(self, name: str, wall: float, cpu: float = 0.0, count: int = 1) -> None:
        stats = self.stats.get(name)
        if stats is None:
            stats = self.stats[name] = StageStats()
        stats.wall += wall
        stats.cpu += cpu
        stats.count += count

    def merge(self, other: StageTimer) -> None:
        """Add another timer's totals into this one (e.g. a run into a CLI total)."""
        for name, s in other.stats.items():
            self.add(name, s.wall, s.cpu, s.count)

    def wall(self, name: str) -> float:
        stats = self.stats.get(name)
        return stats.wall if stats else 0.0

    def to_dict(self) -> dict[str, dict[str, float | int]]:
        return {name: s.to_dict() for name, s in self.stats.items()}

    @contextmanager
    def activate(self) -> Iterator[StageTimer]:
        """Make this the timer that `stage()` records into, for the block."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)


def current_timer() -> StageTimer | None:
    """The active timer, if any (see `StageTimer.activate`)."""
    return _current.get()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Record the block under `name` in the active timer; a no-op without one."""
    timer = _current.get()
    if timer is None:
        yield
        return
    with timer.stage(name):
        yield


class TimedExecutor:
    """Wraps an executor so each `predict` is recorded as one stage entry.

    Lets the transcriber time the encoder and decoder without the decoding
    loop knowing about timers; everything else is passed through unchanged.
    """

    def __init__(self, inner: Any, name: str) -> None:
        self._inner = inner
        self._name = name

    def predict(self, inputs: dict[str, Any], state: Any | None = None) -> dict[str, Any]:
        with stage(self._name):
            if state is None:
                return self._inner.predict(inputs)
            return self._inner.predict(inputs, state)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)
