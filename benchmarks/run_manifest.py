"""Run one or more models over a manifest and write speed and WER to a results file.

One command reproduces (or refutes) a speed claim on your own machine, e.g.
"int8 is 2x faster than fp16" on a Mac:

    python benchmarks/run_manifest.py --model tiny.en-fp16 --model tiny.en-int8

For each model: load it (timed), warm it up on the first file, then transcribe
every file --runs times; per file the median, min and max wall time; overall
the realtime factor (sum of per-file medians / audio seconds), per-stage
medians, CPU seconds per audio second, the energy figure (measured where the
OS has a counter, else a labelled estimate), and WER against the manifest's
references. Later models get a speed-up column against the first one.
The machine description is written with the numbers, and each invocation
appends a dated section to the results markdown file (default
benchmarks/RESULTS.md) so earlier results stay.

The manifest is a TSV with `path` (relative to the manifest) and
`reference_transcript` columns; ../shared/data/speech/manifest.tsv is the
default when it exists. WER uses openai-whisper's EnglishTextNormalizer when
the `bench` extra is installed, else a plain normalizer (lower case, no
punctuation), and says which.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = ROOT.parent / "shared" / "data" / "speech" / "manifest.tsv"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "RESULTS.md"
STAGES = ("audio", "features", "encoder", "decoder", "search", "text")


@dataclass
class Item:
    key: str
    path: Path
    reference: str


def read_manifest(manifest: Path, subset: str | None, limit: int | None) -> list[Item]:
    """Rows of the manifest (`subset`: keep rows whose path or corpus mentions it)."""
    items: list[Item] = []
    with open(manifest, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if "path" not in row or "reference_transcript" not in row:
                raise SystemExit(f"{manifest}: needs 'path' and 'reference_transcript' columns")
            key = row["path"]
            if subset and subset not in key and subset not in (row.get("corpus_subset") or ""):
                continue
            items.append(Item(key, manifest.parent / key, row["reference_transcript"]))
    return items[:limit] if limit else items


# --------------------------------------------------------------------------- WER


def normalizer() -> tuple[Any, str]:
    """openai-whisper's English normalizer where installed, else a plain one (and which)."""
    try:
        from whisper.normalizers import EnglishTextNormalizer

        return EnglishTextNormalizer(), "openai-whisper EnglishTextNormalizer"
    except Exception:
        pass

    def plain(text: str) -> str:
        text = re.sub(r"[\[<][^\]>]*[\]>]", " ", text.lower())  # [noise], <tags>
        text = re.sub(r"[^\w\s']", " ", text).replace("'", "")
        return " ".join(text.split())

    return plain, "plain (lower case, punctuation removed; install the bench extra for Whisper's)"


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance over words (substitutions + deletions + insertions)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i] + [0] * len(hypothesis)
        for j, hyp in enumerate(hypothesis, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp))
        previous = current
    return previous[-1]


def corpus_wer(references: list[str], hypotheses: list[str], norm: Any) -> float:
    errors = words = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        r, h = norm(ref).split(), norm(hyp).split()
        if not r:
            continue
        errors += word_errors(r, h)
        words += len(r)
    return errors / words if words else float("nan")


# --------------------------------------------------------------------------- running


@dataclass
class ModelResult:
    model: str
    load_seconds: float
    audio_seconds: float = 0.0
    per_file: dict[str, dict[str, float]] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    cpu: float = 0.0
    energy_mj: float = 0.0
    energy_kind: str = "estimate"
    wer: float = float("nan")
    texts: dict[str, str] = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return sum(f["median"] for f in self.per_file.values())

    @property
    def rtf(self) -> float:
        return self.wall / self.audio_seconds if self.audio_seconds else float("nan")


def run_model(
    model: str, items: list[Item], runs: int, args: argparse.Namespace, norm: Any
) -> ModelResult:
    from wruntime.profile import open_model, profile_once
    from wruntime.profile.energy import WattsTable, default_energy_reader

    units = {
        k: v for k, v in (("encoder", args.encoder_units), ("decoder", args.decoder_units)) if v
    }
    opened, load = open_model(model, executor=args.executor, compute_units=units or None)
    reader = default_energy_reader()
    watts = WattsTable.parse(args.watts, base=WattsTable.from_env())
    options = {"beam_size": args.beam_size} if args.beam_size else {}
    res = ModelResult(model=model, load_seconds=load)
    res.energy_kind = "measured" if reader is not None else "estimate"
    print(f"{model}: loaded in {load:.2f} s; warming up", file=sys.stderr)
    profile_once(opened, items[0].path, options=options, watts=watts, energy_reader=reader)
    for n, item in enumerate(items, 1):
        profiles = []
        for _ in range(runs):
            prof, result = profile_once(
                opened, item.path, options=options, watts=watts, energy_reader=reader
            )
            profiles.append(prof)
        walls = [p.wall for p in profiles]
        res.per_file[item.key] = {
            "audio": profiles[0].audio_seconds,
            "median": statistics.median(walls),
            "min": min(walls),
            "max": max(walls),
        }
        res.audio_seconds += profiles[0].audio_seconds
        res.cpu += statistics.median(p.cpu for p in profiles)
        for name in STAGES:
            res.stages[name] = res.stages.get(name, 0.0) + statistics.median(
                float(p.timings.get(name, {}).get("wall", 0.0)) for p in profiles
            )
        energies = [p.energy.best[0] * p.audio_seconds for p in profiles if p.energy]
        kinds = {p.energy.best[1] for p in profiles if p.energy}
        if "estimate" in kinds:
            res.energy_kind = "estimate"
        res.energy_mj += statistics.median(energies) if energies else 0.0
        res.texts[item.key] = result.text
        print(
            f"  [{n}/{len(items)}] {item.key}: {res.per_file[item.key]['median']:.2f} s "
            f"for {profiles[0].audio_seconds:.1f} s",
            file=sys.stderr,
        )
    res.wer = corpus_wer([i.reference for i in items], [res.texts[i.key] for i in items], norm)
    return res


# --------------------------------------------------------------------------- the results file


def render(
    results: list[ModelResult], items: list[Item], args: argparse.Namespace, norm_name: str
) -> str:
    from wruntime.profile import machine_description

    machine = machine_description()
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {', '.join(r.model for r in results)} on {len(items)} files ({when})",
        "",
        f"Command: `python benchmarks/run_manifest.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {json.dumps(machine, sort_keys=True)}",
        "",
        f"Manifest: {args.manifest} ({results[0].audio_seconds:.1f} s of audio); "
        f"executor {args.executor}; {args.runs} run(s) per file after one warm-up; "
        f"WER normalizer: {norm_name}.",
        "",
        "| model | load s | wall s (sum of per-file medians) | per-file min-max s | RTF "
        "| speed-up vs first | encoder s | decoder s | search s | cpu s / audio s "
        "| mJ / audio s | WER |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = results[0].wall
    for r in results:
        lo = min(f["min"] for f in r.per_file.values())
        hi = max(f["max"] for f in r.per_file.values())
        lines.append(
            f"| {r.model} | {r.load_seconds:.2f} | {r.wall:.2f} | {lo:.2f}-{hi:.2f} "
            f"| {r.rtf:.3f} | {base / r.wall:.2f}x | {r.stages.get('encoder', 0):.2f} "
            f"| {r.stages.get('decoder', 0):.2f} | {r.stages.get('search', 0):.2f} "
            f"| {r.cpu / r.audio_seconds:.3f} | {r.energy_mj / r.audio_seconds:.0f} "
            f"({r.energy_kind}) | {100 * r.wer:.2f}% |"
        )
    lines += [
        "",
        "Energy 'estimate' = stage time x nominal watts (wruntime.profile.energy.WattsTable), "
        "not a measurement; 'measured' = the OS per-process counter (CPU side).",
        "",
    ]
    return "\n".join(lines)


def append_markdown(path: Path, section: str) -> None:
    """Append a section, writing the whole file anew then renaming (never half-written)."""
    existing = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(existing.rstrip("\n") + "\n\n" + section)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", action="append", required=True, help="repeat to compare models")
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    p.add_argument("--subset", help="keep rows whose path or corpus contains this")
    p.add_argument("--limit", type=int, help="first N files only")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--executor", default="auto", choices=("auto", "coreml", "interpreter"))
    p.add_argument("--encoder-units")
    p.add_argument("--decoder-units")
    p.add_argument("--beam-size", type=int, default=0, help="0: greedy (the default)")
    p.add_argument("--watts", help="nominal watts for the estimate, e.g. cpu_core=4,gpu=8,ane=2")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--json", type=Path, help="also write the raw numbers as JSON")
    args = p.parse_args(argv)
    if not args.manifest.exists():
        p.error(f"no manifest at {args.manifest}; pass --manifest PATH")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    items = read_manifest(args.manifest, args.subset, args.limit)
    if not items:
        p.error("no files selected from the manifest")
    norm, norm_name = normalizer()
    started = time.perf_counter()
    results: list[ModelResult] = []
    failures: dict[str, str] = {}
    for name in args.model:
        try:
            results.append(run_model(name, items, args.runs, args, norm))
        except Exception as exc:  # one model failing to build or load must not lose the others
            line = " ".join(str(exc).split())[:300] or type(exc).__name__
            failures[name] = f"{type(exc).__name__}: {line}"
            print(f"{name}: failed: {failures[name]}", file=sys.stderr)
    if not results:
        print("no model ran; nothing written", file=sys.stderr)
        return 1
    section = render(results, items, args, norm_name)
    if failures:
        section += "\n".join(f"- {k} failed: {v}" for k, v in failures.items()) + "\n"
    append_markdown(args.output, section)
    print(section)
    if args.json:
        data = [r.__dict__ | {"wall": r.wall, "rtf": r.rtf} for r in results]
        args.json.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {args.output} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
