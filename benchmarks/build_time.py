"""Time to build a model directory (goal for tiny.en-fp16: under 30 s), median of N runs.

    python benchmarks/build_time.py [--model tiny.en-fp16] [--runs 3] [--json out.json]

Each run builds into a fresh temporary directory (the cache is not touched);
the weights are loaded once beforehand, so the numbers are the builder's own:
MIL programs, ct.convert, saving, hashing, manifest. Per-stage times come from
the builder's progress callback.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path


def one_build(name: str, weights) -> tuple[float, dict[str, float]]:
    from wruntime.build import build_model

    marks: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="wruntime-build-bench-") as tmp:
        start = time.perf_counter()
        build_model(
            name,
            weights=weights,
            dest=Path(tmp) / name,
            progress=lambda d, i, n: marks.append((d, time.perf_counter())),
        )
        total = time.perf_counter() - start
    stages = {}
    for (desc, t0), (_, t1) in itertools.pairwise(marks):
        stages[desc] = stages.get(desc, 0.0) + (t1 - t0)
    return total, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny.en-fp16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import os

    from wruntime.catalog import load_architecture_weights, resolve_model_name

    spec = resolve_model_name(args.model)
    weights = load_architecture_weights(spec.architecture.name)
    totals, all_stages = [], []
    for run in range(args.runs):
        total, stages = one_build(spec.name, weights)
        totals.append(total)
        all_stages.append(stages)
        detail = ", ".join(f"{k.lower()} {v:.1f}s" for k, v in stages.items())
        print(f"run {run + 1}: {total:.1f} s ({detail})")
    median = statistics.median(totals)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{spec.name}: median {median:.1f} s over {args.runs} runs (load average {load:.1f})")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": spec.name,
                    "runs": totals,
                    "median_seconds": median,
                    "stages": all_stages,
                    "load_average": load,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
