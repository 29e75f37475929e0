"""Size and accuracy of every precision: on-disk size, ratio to fp16, WER, build time.

    python benchmarks/compression_table.py                       # tiny.en, every precision, all clips
    python benchmarks/compression_table.py --arch base --precisions fp16,int8,pal8
    python benchmarks/compression_table.py --per-group 20        # first 20 LibriSpeech + 20 others
    python benchmarks/compression_table.py --precisions fp16 --auto-fractions 0.3 \
        --calibration librispeech-dev-clean,librispeech-train-clean-5  # auto on a calibration set

Each model is built on first use (into $WRUNTIME_HOME, the cache: later runs reuse
it; the manifest's build_seconds is the time it took) and transcribes through the
MIL interpreter, greedy (temperature 0, no fallback; `--fallback`: transcribe's
default decoding, temperature fallback with seed 0), with fp16 emulation for
fp16-compute models, so the packages measured are the ones that ship. Transcripts
are saved per model as they are made (benchmarks/results/compression_<model>.json)
and reused, so an interrupted run resumes. WER is computed in the reference venv
with openai-whisper's EnglishTextNormalizer and jiwer, for the LibriSpeech
utterances and for the rest of the manifest (LJSpeech, JFK, Earnings-22, MFA,
telephone), and written as a markdown table to
benchmarks/results/compression_<arch>.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MANIFEST, RESULTS, read_manifest, run_peer, write_results

GROUPS = ("librispeech", "other")
DEFAULT_PRECISIONS = "fp32,fp16,int8,pal8,pal6,int4,pal4,mixed,auto"


def _looped(text: str) -> bool:
    """openai-whisper's fallback test: a transcript that compresses too well repeats itself."""
    data = text.encode("utf-8")
    return bool(data) and len(data) / len(zlib.compress(data)) > 2.4


def _group(key: str) -> str:
    return "librispeech" if key.startswith("librispeech") else "other"


def _transcripts(
    model: str, items: list, fp16: bool, source: str | None = None, fallback: bool = False
) -> dict[str, str]:
    """Transcripts of every item (resumed from the saved file), through the interpreter.

    Greedy at temperature 0 alone, or with ``fallback`` transcribe's default decoding
    (a window that loops or is improbable is decoded again at 0.2, 0.4, ... 1.0;
    seed 0), saved as ``compression_<model>-fb.json``.
    """
    from wruntime import Transcriber

    path = RESULTS / f"compression_{model}{'-fb' if fallback else ''}.json"
    decoding = {"seed": 0} if fallback else {"temperature": 0.0}
    done: dict[str, str] = {}
    if path.is_file():
        done = json.loads(path.read_text(encoding="utf-8")).get("texts", {})
    todo = [it for it in items if it.key not in done]
    if todo:
        t = Transcriber(source or model, executor="interpreter", fp16_emulation=fp16)
        started = time.perf_counter()
        for i, it in enumerate(todo):
            done[it.key] = t.transcribe(str(it.path), **decoding).text
            print(f"  {model} {i + 1}/{len(todo)} {it.key}: {done[it.key][:50]!r}", flush=True)
            if (i + 1) % 10 == 0 or i + 1 == len(todo):
                write_results(path.name, {"model": model, "texts": done})
        print(f"{model}: {len(todo)} files in {time.perf_counter() - started:.0f} s", flush=True)
    return {it.key: done[it.key] for it in items}


def _columns(calibrated: bool) -> tuple[str, ...]:
    """The WER columns: per group, all, and with a calibration set the files it left out."""
    return (*GROUPS, "all", "held out") if calibrated else (*GROUPS, "all")


#: Name suffix of an auto model probed in a mode other than the catalog's.
PROBE_SUFFIX = {"text": "-nots", "timestamps": "-ts", "both": "-both"}


def _auto_variant(
    arch: str, fraction: float, clips: list[Path] | None = None, probe: str | None = None
) -> Path:
    """The auto model for a size budget: `<arch>-auto@<fraction>`, as `--model` builds it.

    With ``clips`` the sensitivity is measured on them (a calibration set) instead of
    the catalog's probe clips, and the model is named ``<arch>-auto@<fraction>-cal``;
    ``probe`` overrides the catalog's probe mode (the name gains ``-nots``, ``-ts`` or
    ``-both``), so the modes' models and transcripts never mix.
    """
    from wruntime.build.model_dir import models_root
    from wruntime.build.pipeline import build_model, ensure_model
    from wruntime.build.sensitivity import Budget, sensitivity_report

    name = f"{arch}-auto@{fraction:g}"
    if not clips and probe is None:
        return Path(ensure_model(name, progress=True).path)
    mode = "" if probe is None else PROBE_SUFFIX[probe]
    dest = models_root() / f"{name}{'-cal' if clips else ''}{mode}"
    if not dest.is_dir():
        budget = Budget(max_fraction=fraction)
        choice = sensitivity_report(arch, budget=budget, clips=clips, probe=probe)
        build_model(name, dest=dest, choices=choice.rules)
    return dest


def peer_worker(args: argparse.Namespace) -> None:
    """In the reference venv: WER per group, after openai-whisper's English normaliser."""
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    job = json.loads(Path(args.job).read_text(encoding="utf-8"))
    norm = EnglishTextNormalizer()
    out: dict[str, dict[str, float]] = {}
    for model, texts in job["texts"].items():
        out[model] = {}
        held = set(texts) - set(job["calibration"])
        for group in _columns(bool(job["calibration"])):
            keys = [
                k
                for k in texts
                if (group == "all" or _group(k) == group or (group == "held out" and k in held))
                and norm(job["refs"][k]).strip()
            ]
            if keys:
                refs = [norm(job["refs"][k]) for k in keys]
                hyps = [norm(texts[k]) for k in keys]
                out[model][group] = 100.0 * jiwer.wer(refs, hyps)
    Path(args.answer).write_text(json.dumps(out), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="tiny.en")
    ap.add_argument("--precisions", default=DEFAULT_PRECISIONS)
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    ap.add_argument("--per-group", type=int, default=None, help="first N files of each group")
    ap.add_argument(
        "--auto-fractions", default="", help="more auto models, e.g. 0.35,0.4 (of fp16 size)"
    )
    ap.add_argument(
        "--calibration",
        default="",
        help="manifest folders whose files the auto models' sensitivity is measured on, e.g.\n"
        "librispeech-dev-clean,librispeech-train-clean-5 (WER is then also given on the rest)",
    )
    ap.add_argument(
        "--probe",
        choices=sorted(PROBE_SUFFIX),
        default=None,
        help="auto models: decode the probe clips in this mode instead of the catalog's",
    )
    # Session 5's spelling, kept so the commands in RESULTS.md still run.
    for flag, mode in (("--probe-timestamps", "timestamps"), ("--no-probe-timestamps", "text")):
        ap.add_argument(
            flag, dest="probe", action="store_const", const=mode, help=argparse.SUPPRESS
        )
    ap.add_argument(
        "--fallback",
        action="store_true",
        help="transcribe's default decoding (temperature fallback, seed 0) instead of greedy\n"
        "alone; transcripts saved apart (compression_<model>-fb.json)",
    )
    ap.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--answer", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_worker:
        peer_worker(args)
        return

    from wruntime.build.model_dir import directory_size
    from wruntime.build.pipeline import ensure_model
    from wruntime.catalog import resolve_model_name

    items = read_manifest(args.manifest)
    folders = set(filter(None, args.calibration.split(",")))
    calibration = [it for it in items if it.key.split("/")[0] in folders]
    if folders and not calibration:
        raise SystemExit(f"no manifest files under {', '.join(sorted(folders))}")
    if args.per_group:
        items = [
            it for g in GROUPS for it in [x for x in items if _group(x.key) == g][: args.per_group]
        ]
    minutes = {g: 0.0 for g in GROUPS}
    import soundfile

    for it in items:
        minutes[_group(it.key)] += soundfile.info(str(it.path)).duration / 60
    rows = {}
    texts = {}
    for precision in args.precisions.split(","):
        name = f"{args.arch}-{precision}"
        spec = resolve_model_name(name)
        t0 = time.perf_counter()
        model = ensure_model(name, progress=True)
        built_now = time.perf_counter() - t0
        manifest = model.manifest
        rows[name] = {
            "precision": precision,
            "size_mb": directory_size(Path(model.path)) / 1e6,
            "build_s": manifest.get("build_seconds", built_now),
            "target": manifest.get("deployment_target"),
        }
        fp16 = spec.precision.compute_precision == "float16"
        texts[name] = _transcripts(name, items, fp16, fallback=args.fallback)
    for fraction in filter(None, args.auto_fractions.split(",")):
        clips = [it.path for it in calibration] or None
        path = _auto_variant(args.arch, float(fraction), clips, args.probe)
        name = path.name
        rows[name] = {
            "precision": f"auto@{fraction}",
            "size_mb": directory_size(path) / 1e6,
            "build_s": json.loads((path / "manifest.json").read_text())["build_seconds"],
            "target": "iOS18",
        }
        texts[name] = _transcripts(name, items, True, str(path), args.fallback)
    refs = {it.key: it.reference for it in items}
    job = RESULTS / f".compression_job_{args.arch}.json"
    calibration_keys = {it.key for it in calibration}
    job.write_text(
        json.dumps({"texts": texts, "refs": refs, "calibration": sorted(calibration_keys)}),
        encoding="utf-8",
    )
    wers = run_peer(Path(__file__).resolve(), ["--job", str(job)])
    job.unlink()

    base = rows.get(f"{args.arch}-fp16", {}).get("size_mb")
    counts = {g: sum(_group(it.key) == g for it in items) for g in GROUPS}
    corpora = {
        g: sorted({it.key.split("/")[0] for it in items if _group(it.key) == g}) for g in GROUPS
    }
    command = "python benchmarks/compression_table.py " + " ".join(sys.argv[1:])
    lines = [
        f"## Compression: {args.arch}",
        "",
        f"Command: `{command.strip()}`. "
        + (
            "transcribe's default decoding (greedy, with temperature fallback, seed 0)"
            if args.fallback
            else "Greedy (temperature 0, no fallback)"
        )
        + " through the MIL "
        "interpreter, fp16 emulation for fp16-compute models; WER (%) after openai-whisper's "
        f"EnglishTextNormalizer. LibriSpeech ({', '.join(corpora['librispeech'])}): "
        f"{counts['librispeech']} utterances "
        f"({minutes['librispeech']:.1f} min); other: {counts['other']} files "
        f"({minutes['other']:.1f} min: {', '.join(corpora['other'])}).",
        "",
        (
            f"Calibration: the auto models' sensitivity is measured on the {len(calibration)} "
            f"files under {', '.join(sorted(folders))}; 'WER held out' leaves them out "
            f"({sum(it.key not in calibration_keys for it in items)} files)."
            if calibration
            else ""
        ),
        "",
        "loops: files whose transcript repeats itself (gzip compression ratio > 2.4, the "
        "threshold at which the default temperature fallback would have re-decoded them).",
        "",
        "| model | target | size MB | vs fp16 | build s | WER LibriSpeech | WER other | WER all "
        + ("| WER held out " if calibration else "")
        + "| loops |",
        "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if calibration else "") + "---:|",
    ]
    for name, row in rows.items():
        w = wers.get(name, {})
        ratio = f"{row['size_mb'] / base:.2f}" if base else "-"
        lines.append(
            f"| {name} | {row['target']} | {row['size_mb']:.1f} | {ratio} | {row['build_s']:.0f} | "
            + " | ".join(f"{w[g]:.2f}" if g in w else "-" for g in _columns(bool(calibration)))
            + f" | {sum(_looped(t) for t in texts[name].values())} |"
        )
    table = "\n".join(lines) + "\n"
    out = RESULTS / f"compression_{args.arch}.md"
    out.write_text(table, encoding="utf-8")
    write_results(f"compression_{args.arch}.json", {"rows": rows, "wer": wers, "items": len(items)})
    print(table)


if __name__ == "__main__":
    main()
