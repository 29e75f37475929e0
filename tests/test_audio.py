"""Decoding real files to 16 kHz mono, and one-line errors for everything a user can get wrong."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import CLIPS
from wruntime.audio import (
    SAMPLE_RATE,
    audio_info,
    iter_audio_blocks,
    load_audio,
    resample,
)
from wruntime.errors import AudioError

JFK = CLIPS["jfk"][0]
EXPERIENCE = CLIPS["experience"][0]


def test_stereo_44k_becomes_mono_16k():
    audio = load_audio(JFK)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == 11 * SAMPLE_RATE  # 485100 samples at 44.1 kHz
    stereo, rate = sf.read(JFK, dtype="float32")
    assert stereo.shape[1] == 2 and rate == 44100
    # Averaging channels then resampling: the same as doing it by hand.
    by_hand = resample(stereo.mean(axis=1, dtype=np.float32), rate)
    np.testing.assert_array_equal(audio, by_hand)
    assert 0.01 < float(np.sqrt(np.mean(audio**2))) < 0.5


def test_16k_file_is_passed_through_sample_exact():
    audio = load_audio(EXPERIENCE)
    samples, rate = sf.read(EXPERIENCE, dtype="int16")
    assert rate == SAMPLE_RATE
    # What ffmpeg's s16le pipe gives openai-whisper: int16 / 32768.
    np.testing.assert_array_equal(audio, samples.astype(np.float32) / 32768.0)


def test_audio_info_reads_the_header():
    assert audio_info(JFK) == (11.0, 44100, 2)
    duration, rate, channels = audio_info(EXPERIENCE)
    assert math.isclose(duration, 1.975) and rate == 16000 and channels == 1


@pytest.mark.parametrize("block_seconds", [0.37, 2.0, 30.0])
def test_blocks_concatenate_to_the_whole_file(block_seconds):
    blocks = list(iter_audio_blocks(JFK, block_seconds=block_seconds))
    assert all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
    # Bounded memory: no block is much longer than asked (the resampler's delay shifts edges).
    assert max(len(b) for b in blocks) <= block_seconds * SAMPLE_RATE + 1024
    assert len(blocks) >= math.floor(11.0 / block_seconds)
    np.testing.assert_array_equal(np.concatenate(blocks), load_audio(JFK))


def test_resampling_length_and_content():
    rate = 44100
    t = np.arange(3 * rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    out = resample(tone, rate)
    assert out.dtype == np.float32 and len(out) == 3 * SAMPLE_RATE
    expected = 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(len(out)) / SAMPLE_RATE)
    # Away from the edges a 440 Hz tone survives resampling almost exactly.
    assert np.abs(out[1000:-1000] - expected[1000:-1000]).max() < 1e-3


@pytest.mark.parametrize(
    ("suffix", "fmt", "subtype"),
    [("flac", "FLAC", None), ("ogg", "OGG", "VORBIS"), ("mp3", "MP3", None), ("wav", "WAV", None)],
)
def test_common_formats_decode(tmp_path, suffix, fmt, subtype):
    rate = 22050
    t = np.arange(2 * rate) / rate
    left = 0.4 * np.sin(2 * np.pi * 300.0 * t)
    stereo = np.stack([left, 0.5 * left], axis=1).astype(np.float32)
    path = tmp_path / f"tone.{suffix}"
    sf.write(path, stereo, rate, format=fmt, subtype=subtype)
    audio = load_audio(path)
    # Lossy codecs add a few ms of encoder delay/padding.
    assert abs(len(audio) - 2 * SAMPLE_RATE) < 0.1 * SAMPLE_RATE
    rms = float(np.sqrt(np.mean(audio[2000:-2000] ** 2)))
    assert math.isclose(rms, 0.75 * 0.4 / math.sqrt(2), rel_tol=0.05)


def _assert_one_line_error(path, fragment: str) -> None:
    for reader in (load_audio, audio_info, iter_audio_blocks):
        with pytest.raises(AudioError) as info:
            result = reader(path)
            if reader is iter_audio_blocks:
                list(result)
        message = str(info.value)
        assert fragment in message, (reader.__name__, message)
        assert str(path) in message and "\n" not in message


def test_missing_file(tmp_path):
    _assert_one_line_error(tmp_path / "absent.wav", "does not exist")


def test_directory(tmp_path):
    _assert_one_line_error(tmp_path, "is a directory")


def test_text_renamed_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are meeting notes, not audio\n" * 20)
    _assert_one_line_error(path, "not a readable audio file")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    _assert_one_line_error(path, "empty")


def test_wav_with_no_samples(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros((0, 1), dtype=np.float32), SAMPLE_RATE)
    assert path.stat().st_size > 0
    _assert_one_line_error(path, "zero-length")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path, bad):
    samples = np.zeros(SAMPLE_RATE, dtype=np.float32)
    samples[1234] = bad
    path = tmp_path / "bad.wav"
    sf.write(path, samples, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_truncated_flac(tmp_path):
    path = tmp_path / "cut.flac"
    raw = JFK.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AudioError, match="corrupt") as info:
        load_audio(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
