"""`Transcriber`: a built model plus openai-whisper's long-form transcription.

    from wruntime import Transcriber
    t = Transcriber("tiny.en-fp16")
    result = t.transcribe("talk.flac", word_timestamps=True)
    for segment in t.transcribe_iter("talk.flac"):   # segments as they are decoded
        print(segment.start, segment.text)

The model is opened once and reused for every file. A transcription runs the
stages of the design in order, each under the stage timer: audio decode, the
log-mel of the whole file (30 s of zero padding appended, as openai-whisper),
then window after window: encoder, decoding with temperature fallback (decoder
calls and the search around them), segments and text, word timestamps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from wruntime.errors import AudioError, WruntimeError
from wruntime.timing import StageTimer, stage
from wruntime.transcribe import seek as seeking
from wruntime.transcribe.fallback import (
    DEFAULT_TEMPERATURES,
    FallbackRules,
    decode_with_fallback,
    temperatures_of,
)
from wruntime.transcribe.result import Segment, TranscriptionResult
from wruntime.transcribe.word_timestamps import (
    APPEND_PUNCTUATIONS,
    PREPEND_PUNCTUATIONS,
    add_word_timestamps,
)

SAMPLE_RATE = 16000
HOP_LENGTH = 160
N_FRAMES = 3000
N_SAMPLES = 480000

#: Options passed through to each window's `DecodingOptions`.
DECODE_OPTION_NAMES = (
    "task",
    "language",
    "sample_len",
    "best_of",
    "beam_size",
    "patience",
    "length_penalty",
    "prefix",
    "suppress_tokens",
    "suppress_blank",
    "without_timestamps",
    "max_initial_timestamp",
    "seed",
)


@dataclass
class TranscribeOptions:
    """openai-whisper's `transcribe()` arguments (same names, same defaults)."""

    language: str | None = None
    task: str = "transcribe"
    temperature: float | Sequence[float] = DEFAULT_TEMPERATURES
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    initial_prompt: str | None = None
    carry_initial_prompt: bool = False
    word_timestamps: bool = False
    prepend_punctuations: str = PREPEND_PUNCTUATIONS
    append_punctuations: str = APPEND_PUNCTUATIONS
    clip_timestamps: str | Sequence[float] = "0"
    hallucination_silence_threshold: float | None = None
    # Per-window decoding options.
    sample_len: int | None = None
    best_of: int | None = None
    beam_size: int | None = None
    patience: float | None = None
    length_penalty: float | None = None
    prefix: str | None = None
    suppress_tokens: str | Sequence[int] | None = "-1"
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: float | None = 1.0
    seed: int | None = None
    # Runtime extras.
    #: Called with the seconds of audio done so far, after each window.
    progress: Callable[[float, float], None] | None = None

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> TranscribeOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise WruntimeError(f"Unknown transcription option(s): {', '.join(unknown)}.")
        return cls(**kwargs)


def _load_input(audio: str | os.PathLike[str] | np.ndarray) -> np.ndarray:
    """Mono float32 samples at 16 kHz from a path or an array."""
    if isinstance(audio, (str, os.PathLike)):
        from wruntime.audio import load_audio

        return load_audio(audio)
    samples = np.asarray(audio)
    if samples.ndim != 1:
        raise AudioError(
            f"Audio arrays must be 1-D mono samples at 16 kHz, got shape {samples.shape}."
        )
    if not np.issubdtype(samples.dtype, np.floating):
        raise AudioError(f"Audio arrays must be float samples in [-1, 1], got {samples.dtype}.")
    samples = samples.astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise AudioError("The audio array contains NaN or infinite samples.")
    return samples


class TranscriptionStream:
    """The segments of one transcription, yielded as each window is decoded.

    Audio decoding, features and language detection happen when the stream is
    made (so a bad file fails at once, and `language` and `duration` are known
    before the first segment); windows are decoded as the stream is iterated.
    `result()` finishes the transcription and returns the whole result.
    """

    def __init__(self, transcriber: Transcriber, audio: Any, options: TranscribeOptions) -> None:
        self._t0 = time.perf_counter()
        self.timer = StageTimer()
        self.options = options
        self._model = transcriber.runtime
        self.segments: list[Segment] = []
        self._done = False
        with self.timer.activate():
            with stage("audio"):
                samples = _load_input(audio)
            self.duration = len(samples) / SAMPLE_RATE
            with stage("features"):
                from wruntime.features import log_mel_spectrogram

                self._mel = log_mel_spectrogram(samples, self._model.n_mels, padding=N_SAMPLES)
            self.content_frames = self._mel.shape[-1] - N_FRAMES
            self.language = self._resolve_language(options)
            # Built (or fetched from cache) here, inside a stage, so the first
            # file's tokenizer cost shows in the profile instead of in "other".
            with stage("text"):
                self._tokenizer = self._model.tokenizer(self.language, options.task)
        self._gen = self._windows()

    def _resolve_language(self, options: TranscribeOptions) -> str:
        if options.language is not None:
            from wruntime.tokenizer import normalize_language

            language = normalize_language(options.language)
            if language != "en" and not self._model.is_multilingual:
                raise WruntimeError(
                    f"This model is English-only; it cannot transcribe {language!r} "
                    "(use a multilingual model such as base-fp16)."
                )
            return language
        if not self._model.is_multilingual:
            return "en"
        if self.content_frames <= 0:
            return "en"
        from wruntime.features import pad_or_trim

        with stage("language"):
            return self._model.detect_language(pad_or_trim(self._mel[:, :N_FRAMES], N_FRAMES))

    # ------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Segment]:
        return self

    def __next__(self) -> Segment:
        with self.timer.activate():
            try:
                return next(self._gen)
            except StopIteration:
                self._done = True
                raise

    def result(self) -> TranscriptionResult:
        """Decode whatever is left and return the whole transcription."""
        for _ in self:
            pass
        tok = self._tokenizer
        prompt_len = len(self._initial_prompt_tokens)
        with self.timer.activate(), stage("text"):
            text = tok.decode([t for t in self._all_tokens[prompt_len:] if t < tok.eot])
        timings = self.timer.to_dict()
        derive_search(timings)
        return TranscriptionResult(
            text=text,
            language=self.language,
            segments=self.segments,
            duration=self.duration,
            timings=timings,
            wall_time=time.perf_counter() - self._t0,
        )

    # ------------------------------------------------------------ the loop

    def _windows(self) -> Iterator[Segment]:
        """openai-whisper's long-form loop: decode a window, cut it, seek, repeat."""
        from wruntime.features import pad_or_trim

        opts = self.options
        model = self._model
        tok = self._tokenizer
        rules = FallbackRules(
            opts.compression_ratio_threshold, opts.logprob_threshold, opts.no_speech_threshold
        )
        temperatures = temperatures_of(opts.temperature)
        decode_options = {
            name: getattr(opts, name)
            for name in DECODE_OPTION_NAMES
            if getattr(opts, name) is not None or name == "max_initial_timestamp"
        }
        decode_options["language"] = self.language

        clips = seeking.parse_clip_timestamps(opts.clip_timestamps, self.content_frames)
        n_text_ctx = model.n_text_ctx
        remaining_prompt_length = n_text_ctx // 2 - 1
        self._all_tokens: list[int] = []
        self._initial_prompt_tokens: list[int] = []
        if opts.initial_prompt is not None:
            self._initial_prompt_tokens = tok.encode(" " + opts.initial_prompt.strip())
            self._all_tokens.extend(self._initial_prompt_tokens)
            remaining_prompt_length -= len(self._initial_prompt_tokens)
        all_tokens = self._all_tokens
        initial = self._initial_prompt_tokens
        prompt_reset_since = 0
        last_speech_timestamp = 0.0
        total_seconds = self.content_frames * HOP_LENGTH / SAMPLE_RATE

        seek = max(clips[0][0], 0) if clips else 0
        for clip_start, clip_end in clips:
            seek = max(seek, clip_start)
            clip_end = min(clip_end, self.content_frames)
            while seek < clip_end:
                time_offset = seek * HOP_LENGTH / SAMPLE_RATE
                segment_size = min(N_FRAMES, self.content_frames - seek, clip_end - seek)
                mel_segment = pad_or_trim(self._mel[:, seek : seek + segment_size], N_FRAMES)

                if opts.carry_initial_prompt:
                    ignored = max(len(initial), prompt_reset_since)
                    rest = all_tokens[ignored:][-remaining_prompt_length:]
                    prompt = initial + rest
                else:
                    prompt = all_tokens[prompt_reset_since:]

                window = model.window(mel_segment)
                result = decode_with_fallback(
                    lambda o, w=window, p=prompt: w.decode({**o, "prompt": p}),
                    decode_options,
                    temperatures,
                    rules,
                )

                previous_seek = seek
                if rules.should_skip(result):
                    seek += segment_size
                    self._report(seek, total_seconds)
                    continue

                split = seeking.split_window(
                    result.tokens, tok.timestamp_begin, seek=seek, segment_size=segment_size
                )
                seek = split.next_seek
                with stage("text"):
                    current = [
                        Segment(
                            id=0,
                            seek=previous_seek,
                            start=p.start,
                            end=p.end,
                            text=tok.decode([t for t in p.tokens if t < tok.eot]),
                            tokens=list(p.tokens),
                            temperature=result.temperature,
                            avg_logprob=result.avg_logprob,
                            compression_ratio=result.compression_ratio,
                            no_speech_prob=result.no_speech_prob,
                        )
                        for p in split.pieces
                    ]

                if opts.word_timestamps:
                    with stage("words"):
                        add_word_timestamps(
                            current,
                            aligner=window.align,
                            tokenizer=tok,
                            num_frames=segment_size,
                            time_offset=time_offset,
                            last_speech_timestamp=last_speech_timestamp,
                            language=self.language,
                            prepend_punctuations=opts.prepend_punctuations,
                            append_punctuations=opts.append_punctuations,
                        )
                    if not split.single_timestamp_ending:
                        end = seeking.last_word_end(current)
                        if end is not None and end > time_offset:
                            seek = round(end * seeking.FRAMES_PER_SECOND)
                    if opts.hallucination_silence_threshold is not None:
                        seek, restart = seeking.skip_hallucinations(
                            current,
                            threshold=opts.hallucination_silence_threshold,
                            seek=seek,
                            previous_seek=previous_seek,
                            segment_size=segment_size,
                            single_timestamp_ending=split.single_timestamp_ending,
                            last_speech_timestamp=last_speech_timestamp,
                            content_frames=self.content_frames,
                        )
                        if restart:
                            continue
                    end = seeking.last_word_end(current)
                    if end is not None:
                        last_speech_timestamp = end

                for s in current:
                    # An instantaneous or empty segment keeps its place but no text.
                    if s.start == s.end or not s.text.strip():
                        s.text, s.tokens = "", []
                        if s.words is not None:
                            s.words = []
                    s.id = len(self.segments)
                    self.segments.append(s)
                    all_tokens.extend(s.tokens)

                if not opts.condition_on_previous_text or result.temperature > 0.5:
                    # A hot sample is a poor prompt: start the context afresh.
                    prompt_reset_since = len(all_tokens)

                self._report(min(seek, self.content_frames), total_seconds)
                yield from current

    def _report(self, seek: int, total: float) -> None:
        if self.options.progress is not None:
            self.options.progress(min(seek * HOP_LENGTH / SAMPLE_RATE, total), total)


def derive_search(timings: dict[str, dict[str, float | int]]) -> None:
    """Search time = decoding time not spent inside decoder calls.

    The encoder runs once per window before decoding starts, so it is outside
    "decode"; what is left there besides decoder calls is the logit filters,
    the token search and the bookkeeping around them.
    """
    decode = timings.get("decode")
    if decode is None:
        return
    decoder = timings.get("decoder", {})
    timings["search"] = {
        "wall": max(0.0, decode["wall"] - decoder.get("wall", 0.0)),
        "cpu": max(0.0, decode["cpu"] - decoder.get("cpu", 0.0)),
        "count": decode["count"],
    }


class Transcriber:
    """A built Whisper model, opened once, that transcribes files or arrays.

    `model` is a catalog name ("tiny.en-fp16", "base-int8", ...), built on
    first use, or the path of a built model directory. `executor` is "auto"
    (Core ML on macOS, the MIL interpreter elsewhere), "coreml" or
    "interpreter"; `compute_units` maps "encoder"/"decoder" to Core ML compute
    units; `weights` builds the named architecture from the user's own weight
    file or directory.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = "tiny.en-fp16",
        *,
        executor: str = "auto",
        compute_units: dict[str, str] | None = None,
        weights: str | os.PathLike[str] | None = None,
        fp16_emulation: bool | None = None,
        build_progress: Callable[..., Any] | None = None,
    ) -> None:
        from wruntime.transcribe.runtime import ModelRuntime

        self.model_name = str(model)
        self.runtime = ModelRuntime.open(
            model,
            executor=executor,
            compute_units=compute_units,
            weights=Path(weights) if weights is not None else None,
            fp16_emulation=fp16_emulation,
            build_progress=build_progress,
        )

    def transcribe_iter(
        self, audio: str | os.PathLike[str] | np.ndarray, **options: Any
    ) -> TranscriptionStream:
        """Stream of segments, decoded as it is iterated; `.result()` for the whole."""
        return TranscriptionStream(self, audio, TranscribeOptions.from_kwargs(options))

    def transcribe(
        self, audio: str | os.PathLike[str] | np.ndarray, **options: Any
    ) -> TranscriptionResult:
        """Transcribe a file path or 16 kHz float32 mono samples (openai-whisper's options)."""
        return self.transcribe_iter(audio, **options).result()
