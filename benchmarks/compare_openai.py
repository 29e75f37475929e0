"""Transcripts of wruntime beside openai-whisper's, on the same weights and samples.

    python benchmarks/compare_openai.py                      # the whole manifest, greedy + beam 5
    python benchmarks/compare_openai.py --subset test-clean --beams 1
    python benchmarks/compare_openai.py --limit 20 --model tiny.en-fp16

Our model (default tiny.en-fp32) runs here; openai-whisper runs in the
reference venv (torch, CPU, fp32) on a checkpoint made from the very same
weights (benchmarks/peers/openai_checkpoint.py). Decoding is deterministic on
both sides: temperature 0 without fallback (sampling would draw different
random numbers), greedy or beam search. Reported per setting: the fraction of
files with identical transcripts, and each side's WER after openai-whisper's
EnglishTextNormalizer on reference and hypothesis alike. Results go to
benchmarks/results/compare_openai_<model>_<subset>[_<limit>][_beams<B>].json (the beams part
only when --beams is not the default 1,5).
"""

from __future__ import annotations

import argparse
import json
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


def ours(model: str, executor: str, audio: dict, beams: list[int]) -> dict[str, dict[str, str]]:
    from wruntime import Transcriber

    t = Transcriber(model, executor=executor)
    out: dict[str, dict[str, str]] = {}
    for beam in beams:
        texts = {}
        t0 = time.perf_counter()
        for i, (key, samples) in enumerate(audio.items()):
            options = {"temperature": 0.0}
            if beam > 1:
                options["beam_size"] = beam
            texts[key] = t.transcribe(samples, **options).text
            print(f"  ours beam={beam} {i + 1}/{len(audio)} {key}: {texts[key][:60]!r}", flush=True)
        print(f"ours beam={beam}: {time.perf_counter() - t0:.1f} s", flush=True)
        out[str(beam)] = texts
    return out


def _wer(jiwer, norm, refs, keys, keep, texts):  # type: ignore[no-untyped-def]
    """Corpus WER over the files whose normalised reference is not empty."""
    return jiwer.wer([refs[i] for i in keep], [norm(texts[keys[i]]) for i in keep])


def peer_worker(args: argparse.Namespace) -> None:
    """In the reference venv: openai-whisper's transcripts, then WER of both sides."""
    import jiwer
    import whisper
    from whisper.normalizers import EnglishTextNormalizer

    audio = load_audio_npz(Path(args.audio))
    job = json.loads(Path(args.job).read_text(encoding="utf-8"))
    model = whisper.load_model(args.checkpoint, device="cpu")
    norm = EnglishTextNormalizer()
    results = {}
    for beam, our_texts in job["ours"].items():
        theirs = {}
        t0 = time.perf_counter()
        for key, samples in audio.items():
            options = {"temperature": 0.0, "fp16": False}
            if int(beam) > 1:
                options["beam_size"] = int(beam)
            theirs[key] = whisper.transcribe(model, samples, **options)["text"]
        elapsed = time.perf_counter() - t0
        keys = list(audio)
        refs = [norm(job["references"][k]) for k in keys]
        keep = [i for i, r in enumerate(refs) if r.strip()]

        identical = [k for k in keys if our_texts[k].strip() == theirs[k].strip()]
        same_norm = [k for k in keys if norm(our_texts[k]) == norm(theirs[k])]
        results[beam] = {
            "files": len(keys),
            "identical": len(identical) / len(keys),
            "identical_normalized": len(same_norm) / len(keys),
            "wer_ours": _wer(jiwer, norm, refs, keys, keep, our_texts),
            "wer_openai": _wer(jiwer, norm, refs, keys, keep, theirs),
            "openai_seconds": elapsed,
            "differences": {
                k: {"ours": our_texts[k], "openai": theirs[k]} for k in keys if k not in identical
            },
        }
    Path(args.answer).write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    p.add_argument("--subset", help="keep rows whose path or corpus contains this")
    p.add_argument("--limit", type=int)
    p.add_argument("--model", default="tiny.en-fp32")
    p.add_argument("--executor", default="auto")
    p.add_argument("--beams", default="1,5", help="comma-separated beam sizes (1 = greedy)")
    p.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--answer", help=argparse.SUPPRESS)
    p.add_argument("--audio", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer_worker:
        peer_worker(args)
        return

    arch = args.model.rsplit("-", 1)[0]
    items = read_manifest(args.manifest, args.subset, args.limit)
    if not items:
        raise SystemExit("no manifest rows selected")
    beams = [int(b) for b in args.beams.split(",")]
    audio = decode_all(items)
    seconds = sum(len(a) for a in audio.values()) / 16000
    print(f"{len(items)} files, {seconds:.0f} s of audio; model {args.model}", flush=True)
    checkpoint = ensure_openai_checkpoint(arch)
    our_texts = ours(args.model, args.executor, audio, beams)
    with tempfile.TemporaryDirectory() as tmp:
        npz = save_audio(audio, Path(tmp))
        job = Path(tmp) / "job.json"
        job.write_text(
            json.dumps({"ours": our_texts, "references": {it.key: it.reference for it in items}}),
            encoding="utf-8",
        )
        peer = run_peer(
            Path(__file__),
            ["--audio", str(npz), "--job", str(job), "--checkpoint", str(checkpoint)],
        )
    print(
        f"\n{'setting':<10} {'files':>5} {'identical':>9} {'ident.norm':>10} {'WER ours':>9} {'WER openai':>10}"
    )
    for beam, r in peer.items():
        name = "greedy" if beam == "1" else f"beam {beam}"
        print(
            f"{name:<10} {r['files']:>5} {100 * r['identical']:>8.1f}% {100 * r['identical_normalized']:>9.1f}%"
            f" {100 * r['wer_ours']:>8.2f}% {100 * r['wer_openai']:>9.2f}%"
        )
    out = write_results(
        f"compare_openai_{args.model}_{args.subset or 'all'}"
        + (f"_{args.limit}" if args.limit else "")
        + ("" if args.beams == "1,5" else f"_beams{args.beams.replace(',', '-')}")
        + ".json",
        {
            "model": args.model,
            "manifest": str(args.manifest),
            "subset": args.subset,
            "files": len(items),
            "audio_seconds": seconds,
            "settings": peer,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
