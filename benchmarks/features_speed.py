"""Log-mel feature time per minute of audio, on 10 minutes of real speech.

    python benchmarks/features_speed.py [path/to/manifest.tsv] [--minutes 10] [--repeats 5]

Concatenates the manifest's recordings (decoded to 16 kHz mono) until the
length is reached, then times `log_mel_spectrogram(audio, padding=N_SAMPLES)`,
the call transcription makes once per file. Prints the median of the repeats.
The first call (librosa import, filterbank) is timed apart as the one-off cost.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import numpy as np

from wruntime.audio import SAMPLE_RATE, load_audio
from wruntime.features import N_SAMPLES, log_mel_spectrogram, mel_filters

DEFAULT_MANIFEST = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "manifest.tsv"
)


def speech_signal(manifest: Path, seconds: float) -> np.ndarray:
    needed = int(seconds * SAMPLE_RATE)
    parts: list[np.ndarray] = []
    total = 0
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    while total < needed:  # loop over the set again if it is shorter than asked
        for row in rows:
            audio = load_audio(manifest.parent / row["path"])
            parts.append(audio)
            total += len(audio)
            if total >= needed:
                break
    return np.concatenate(parts)[:needed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", nargs="?", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-mels", type=int, default=80, choices=(80, 128))
    args = parser.parse_args()

    audio = speech_signal(args.manifest, args.minutes * 60)
    start = time.perf_counter()
    mel_filters(args.n_mels)
    setup = time.perf_counter() - start

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        mel = log_mel_spectrogram(audio, n_mels=args.n_mels, padding=N_SAMPLES)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    minutes = len(audio) / SAMPLE_RATE / 60
    print(f"audio: {minutes:.1f} min of speech from {args.manifest}")
    print(f"features: {mel.shape} float32, n_mels={args.n_mels}")
    print(f"one-off filterbank setup: {setup:.2f} s")
    print(
        f"median of {args.repeats}: {median:.3f} s = {median / minutes * 1000:.1f} ms per minute "
        f"of audio (min {min(times):.3f} s, max {max(times):.3f} s)"
    )


if __name__ == "__main__":
    main()
