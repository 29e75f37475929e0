"""Log-mel features, numerically the same as openai-whisper's.

The encoder was trained on exactly these features, so every step follows
openai-whisper's `log_mel_spectrogram`: centred STFT with reflect padding, a
periodic Hann window of 400 samples, hop 160, the last frame dropped, power
spectrum, librosa's Slaney mel filterbank, log10 floored at 1e-10, clamped to
8 (i.e. 80 dB) below the maximum of the whole input, then (x + 4) / 4.

openai-whisper runs torch.stft in float32; we frame with a strided view and
use numpy's float64 FFT, which is the more accurate of the two, so our values
differ from theirs by float32 rounding only (well below the 1e-4 budget).
Frames are processed in chunks so a long file never holds its whole complex
spectrogram in memory.
"""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np

from wruntime.audio import SAMPLE_RATE

N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30-second window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in an encoder input
N_SAMPLES_PER_TOKEN = HOP_LENGTH * 2  # the encoder's two convolutions have stride 2 in all
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100: 10 ms per mel frame
TOKENS_PER_SECOND = SAMPLE_RATE // N_SAMPLES_PER_TOKEN  # 50: 20 ms per audio token

SUPPORTED_N_MELS = (80, 128)

# Frames per FFT batch: large enough to amortise Python overhead, small enough
# that the float64 spectrum of one batch (~13 MB) stays in cache-friendly sizes.
_FRAMES_PER_BATCH = 4096


@cache
def mel_filters(n_mels: int) -> np.ndarray:
    """The (n_mels, 201) Slaney mel filterbank Whisper was trained with (read-only).

    librosa computes it; openai-whisper ships the very same matrices as
    mel_filters.npz. Building it costs a librosa import, so it is cached.
    """
    if n_mels not in SUPPORTED_N_MELS:
        raise ValueError(f"n_mels must be one of {SUPPORTED_N_MELS}, got {n_mels}")
    from librosa.filters import mel

    filters = np.ascontiguousarray(
        mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels), dtype=np.float32
    )
    filters.setflags(write=False)
    return filters


@lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    # Periodic (not symmetric) Hann, as torch.hann_window's default.
    n = np.arange(N_FFT, dtype=np.float64)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)
    window.setflags(write=False)
    return window


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """(n_mels, n_frames) float32 log-mel features of 16 kHz mono samples.

    `padding` zero samples are appended first: openai-whisper's transcribe
    pads a whole 30 s window so the last window of a file is complete, and
    the clamp to max - 8 is taken over everything including that padding.
    n_frames = (len(audio) + padding) // 160.
    """
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"audio must be 1-D mono samples, got shape {x.shape}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    filters = mel_filters(n_mels)
    if padding:
        x = np.concatenate([x, np.zeros(padding, dtype=np.float32)])
    n_frames = len(x) // HOP_LENGTH  # torch.stft gives one more; Whisper drops the last
    if n_frames == 0:
        return np.zeros((n_mels, 0), dtype=np.float32)

    # Frames are strided views of the float32 signal; each batch is windowed
    # into float64, so memory holds the input, one padded copy and the output.
    padded = np.pad(x, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
    window = _hann_window()
    filters64 = filters.astype(np.float64)

    log_spec = np.empty((n_mels, n_frames), dtype=np.float32)
    for start in range(0, n_frames, _FRAMES_PER_BATCH):
        stop = min(start + _FRAMES_PER_BATCH, n_frames)
        spectrum = np.fft.rfft(frames[start:stop] * window, axis=-1)
        power = spectrum.real**2 + spectrum.imag**2
        mel = filters64 @ power.T
        log_spec[:, start:stop] = np.log10(np.maximum(mel, 1e-10))

    np.maximum(log_spec, log_spec.max() - np.float32(8.0), out=log_spec)
    log_spec += np.float32(4.0)
    log_spec /= np.float32(4.0)
    return log_spec


def pad_or_trim(array: np.ndarray, length: int = N_SAMPLES, *, axis: int = -1) -> np.ndarray:
    """Zero-pad or cut `array` along `axis` to exactly `length` (the encoder's fixed input)."""
    array = np.asarray(array)
    size = array.shape[axis]
    if size > length:
        array = np.take(array, np.arange(length), axis=axis)
    elif size < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - size)
        array = np.pad(array, widths)
    return array
