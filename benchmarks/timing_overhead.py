"""What the always-on stage timer costs a transcription.

Two measurements, because the second alone cannot resolve a fraction of a
percent on a shared machine:

1. Exact accounting: the cost of one timer entry (`with stage(...)` under an
   active timer: two clock reads at entry, two at exit, a dict update) minus
   the same block with no timer, times the number of entries a real
   transcription makes, over that transcription's wall time.
2. A/B: the same transcription with the real timer and with a no-op timer
   (same interface, no clock reads), interleaved, medians of --runs each.

    python benchmarks/timing_overhead.py --model tiny.en-fp16 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def entry_cost(n: int = 200_000) -> tuple[float, float]:
    """Seconds per `with stage(...)` with an active timer, and with none."""
    from wruntime.timing import StageTimer, stage

    def body() -> None:
        with stage("decoder"):
            pass

    bare = min(timeit.repeat(body, number=n, repeat=5)) / n
    timer = StageTimer()
    with timer.activate():
        timed = min(timeit.repeat(body, number=n, repeat=5)) / n
    return timed, bare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny.en-fp16")
    p.add_argument("--audio", type=Path, default=ROOT / "tests" / "data" / "jfk.flac")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--executor", default="auto")
    args = p.parse_args()

    import wruntime.transcribe.transcriber as tr
    from wruntime.timing import StageTimer
    from wruntime.transcribe import Transcriber

    class NoOpTimer(StageTimer):
        """The timer's interface with no clock reads and nothing recorded."""

        @contextmanager
        def stage(self, name: str) -> Iterator[None]:
            yield

    timed, bare = entry_cost()
    print(f"one timer entry: {1e6 * timed:.2f} us with a timer, {1e6 * bare:.2f} us without")

    t = Transcriber(args.model, executor=args.executor)
    t.transcribe(args.audio)  # warm-up
    result = t.transcribe(args.audio)
    entries = sum(int(s["count"]) for name, s in result.timings.items() if name != "search")
    accounted = entries * (timed - bare)
    print(
        f"one run: {entries} timer entries, {result.wall_time:.3f} s wall -> "
        f"{1e3 * accounted:.3f} ms = {100 * accounted / result.wall_time:.4f}% of the run"
    )

    real: list[float] = []
    noop: list[float] = []
    original = tr.StageTimer
    try:
        for _ in range(args.runs):
            for timer_class, sink in ((original, real), (NoOpTimer, noop)):
                tr.StageTimer = timer_class  # type: ignore[misc]
                started = time.perf_counter()
                t.transcribe(args.audio)
                sink.append(time.perf_counter() - started)
    finally:
        tr.StageTimer = original  # type: ignore[misc]
    a, b = statistics.median(real), statistics.median(noop)
    print(
        f"A/B, median of {args.runs}: timer {a:.3f} s (min {min(real):.3f}), "
        f"no-op {b:.3f} s (min {min(noop):.3f}); difference {100 * (a - b) / b:+.2f}% "
        "(run-to-run noise on a shared machine is larger than the timer's cost)"
    )


if __name__ == "__main__":
    main()
