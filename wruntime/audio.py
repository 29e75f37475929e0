"""Audio decoding: any file a user has, as mono float32 samples at 16 kHz.

openai-whisper pipes every file through the ffmpeg CLI (s16le, mono, 16 kHz).
We decode with libsndfile (soundfile: wav, flac, ogg/vorbis/opus, mp3 with
libsndfile >= 1.1) so no external program is needed, and fall back to
`librosa.load` (audioread, which may use ffmpeg where installed) for anything
else. Channels are averaged to mono, then resampled with soxr at "HQ" quality,
the library librosa itself uses. ffmpeg's resampler is a different filter, so
samples of a file that needs resampling differ slightly from openai-whisper's;
transcripts need not be bit-identical across resamplers, and 16 kHz input goes
through untouched and is sample-identical to ffmpeg's s16le output.

Long files are decoded in blocks: soxr's streaming resampler carries its
filter state across blocks, so the concatenated blocks are bit-identical to
resampling the whole signal at once, with memory bounded by the block size.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from wruntime.errors import AudioError

SAMPLE_RATE = 16000

# soxr's "HQ" is librosa's default "soxr_hq": a good anti-alias filter at a
# fraction of the cost of "VHQ".
_SOXR_QUALITY = "HQ"

PathLike = str | os.PathLike


def audio_info(path: PathLike) -> tuple[float, int, int]:
    """Duration in seconds, sample rate and channel count, from the header alone.

    Lets callers size progress bars and plan windows before paying for decoding.
    Formats libsndfile cannot open are decoded once through the fallback.
    """
    p = _checked_path(path)
    try:
        info = sf.info(str(p))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        audio, rate = _fallback_decode(p)
        return audio.shape[-1] / rate, rate, 1 if audio.ndim == 1 else audio.shape[0]
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"Audio file {path} has no samples (zero-length audio).")
    return info.frames / info.samplerate, int(info.samplerate), int(info.channels)


def iter_audio_blocks(
    path: PathLike, block_seconds: float = 30.0, sr: int = SAMPLE_RATE
) -> Iterator[np.ndarray]:
    """Yield the file as consecutive mono float32 blocks at `sr` Hz.

    The file is opened and checked before the first block is asked for, so a
    missing or unreadable file fails at the call, not at the first `next()`.
    Each block holds about `block_seconds` of audio (the resampler's delay
    shifts block edges by a few samples); concatenated, the blocks equal
    `load_audio(path, sr)` exactly.
    """
    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")
    if not block_seconds > 0:
        raise ValueError(f"block_seconds must be positive, got {block_seconds}")
    p = _checked_path(path)
    try:
        handle = sf.SoundFile(str(p))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        audio, rate = _fallback_decode(p)
        return _blocks_from_array(path, _to_mono(audio.T), rate, block_seconds, sr)
    if handle.frames == 0 or handle.samplerate <= 0:
        handle.close()
        raise AudioError(f"Audio file {path} has no samples (zero-length audio).")
    return _blocks_from_file(path, handle, block_seconds, sr)


def load_audio(path: PathLike, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The whole file as one mono float32 array at `sr` Hz (1-D)."""
    # Large blocks: fewer Python round trips; the result does not depend on it.
    blocks = list(iter_audio_blocks(path, block_seconds=120.0, sr=sr))
    audio = np.concatenate(blocks) if len(blocks) != 1 else blocks[0]
    if audio.size == 0:
        raise AudioError(f"Audio file {path} has no samples (zero-length audio).")
    return np.ascontiguousarray(audio, dtype=np.float32)


def resample(audio: np.ndarray, orig_sr: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono signal already in memory with the same filter as the loaders."""
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == sr:
        return audio
    return soxr.resample(audio, orig_sr, sr, quality=_SOXR_QUALITY).astype(np.float32, copy=False)


def _checked_path(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise AudioError(f"Audio file {path} does not exist.")
    if p.is_dir():
        raise AudioError(f"{path} is a directory, not an audio file.")
    if not os.access(p, os.R_OK):
        raise AudioError(f"Audio file {path} cannot be read (permission denied).")
    if p.stat().st_size == 0:
        raise AudioError(f"Audio file {path} is empty (0 bytes).")
    return p


def _to_mono(frames: np.ndarray) -> np.ndarray:
    """(n,) or (n, channels) → (n,) float32, averaging channels like ffmpeg's -ac 1."""
    if frames.ndim == 1:
        return np.ascontiguousarray(frames, dtype=np.float32)
    if frames.shape[1] == 1:
        return np.ascontiguousarray(frames[:, 0], dtype=np.float32)
    return frames.mean(axis=1, dtype=np.float32)


def _check_finite(path: PathLike, block: np.ndarray) -> None:
    if not np.isfinite(block).all():
        raise AudioError(f"Audio file {path} contains NaN or infinite samples.")


def _blocks_from_file(
    path: PathLike, handle: sf.SoundFile, block_seconds: float, sr: int
) -> Iterator[np.ndarray]:
    with handle:
        rate = int(handle.samplerate)
        block = max(1, round(block_seconds * rate))
        stream = None
        if rate != sr:
            stream = soxr.ResampleStream(rate, sr, 1, dtype="float32", quality=_SOXR_QUALITY)
        total = 0
        try:
            # Read one block ahead: the resampler must be told which block is
            # last to flush its delay line, and frame counts of compressed
            # formats (mp3) are estimates, so reading until empty is the test.
            pending = handle.read(block, dtype="float32", always_2d=True)
            while len(pending):
                following = handle.read(block, dtype="float32", always_2d=True)
                mono = _to_mono(pending)
                _check_finite(path, mono)
                total += len(mono)
                if stream is not None:
                    mono = stream.resample_chunk(mono, last=len(following) == 0)
                if len(mono):
                    yield mono
                pending = following
        except (sf.LibsndfileError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())  # libsndfile's text, kept to one line
            raise AudioError(
                f"Audio file {path} is corrupt and could not be decoded ({reason})."
            ) from exc
        if total == 0:
            raise AudioError(f"Audio file {path} has no samples (zero-length audio).")


def _blocks_from_array(
    path: PathLike, audio: np.ndarray, rate: int, block_seconds: float, sr: int
) -> Iterator[np.ndarray]:
    if audio.size == 0:
        raise AudioError(f"Audio file {path} has no samples (zero-length audio).")
    _check_finite(path, audio)
    audio = resample(audio, rate, sr)
    step = max(1, round(block_seconds * sr))
    for start in range(0, len(audio), step):
        yield audio[start : start + step]


def _fallback_decode(p: Path) -> tuple[np.ndarray, int]:
    """Decode what libsndfile cannot: (channels, n) or (n,) float32, and the rate.

    This is what `librosa.load` does for such files (audioread: ffmpeg,
    GStreamer or Core Audio, whichever is installed), called directly because
    importing librosa's loader costs seconds even when the file is not audio.
    """
    try:
        with warnings.catch_warnings():
            # audioread's stdlib backend imports modules Python 3.11+ deprecates.
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                import audioread
            except ImportError:  # librosa plans to drop audioread; its loader then decides
                return _librosa_decode(p)
            with audioread.audio_open(str(p)) as f:
                rate, channels = int(f.samplerate), int(f.channels)
                chunks = [np.frombuffer(buf, dtype="<i2") for buf in f]
    except AudioError:
        raise
    except Exception as exc:  # audioread and its backends raise many unrelated types
        raise AudioError(
            f"{p} is not a readable audio file (neither libsndfile nor audioread could decode it)."
        ) from exc
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype="<i2")
    if samples.size == 0 or channels <= 0:
        raise AudioError(f"Audio file {p} has no samples (zero-length audio).")
    audio = (samples.astype(np.float32) / 32768.0).reshape(-1, channels).T
    return (audio[0] if channels == 1 else audio), rate


def _librosa_decode(p: Path) -> tuple[np.ndarray, int]:
    import librosa

    with warnings.catch_warnings():
        # librosa warns that soundfile failed and that audioread is deprecated.
        warnings.simplefilter("ignore")
        audio, rate = librosa.load(str(p), sr=None, mono=False, dtype=np.float32)
    if audio.size == 0:
        raise AudioError(f"Audio file {p} has no samples (zero-length audio).")
    return np.asarray(audio, dtype=np.float32), int(rate)
