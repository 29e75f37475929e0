"""Test inputs for transcription, made the same way by the tests and the fixture script."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
FILES = {
    "jfk": DATA / "jfk.flac",
    "belly": DATA / "1089-134686-0001.flac",
    "experience": DATA / "2830-3980-0043.wav",
}

SILENCE_SECONDS = 3.0


def clip_audio(name: str) -> np.ndarray:
    from wruntime.audio import load_audio

    return load_audio(FILES[name])


def long_audio() -> np.ndarray:
    """36 s: jfk, belly, experience, jfk again, 3 s of silence between; the 30 s seam
    falls inside the second jfk."""
    gap = np.zeros(int(SILENCE_SECONDS * 16000), np.float32)
    parts = [clip_audio("jfk"), gap, clip_audio("belly"), gap, clip_audio("experience"), gap]
    parts.append(clip_audio("jfk"))
    return np.concatenate(parts).astype(np.float32)
