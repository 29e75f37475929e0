"""Long-form seeking: which 30 s window to decode next, and how a window's
tokens become segments. The rules are openai-whisper's, kept exactly, since
they decide where text is cut and therefore whether a long file's transcript
matches theirs:

- the whole file's mel is computed once with 30 s of zero padding, and each
  window is 3000 frames starting at `seek`;
- a window's tokens are cut into segments at every pair of consecutive
  timestamp tokens;
- if the window ends on a single timestamp (text then one timestamp), the
  speech is complete and the next window starts after this one; otherwise the
  last, unfinished segment is dropped and the next window starts at the last
  complete segment's end timestamp, so that segment is decoded again whole;
- a window with no consecutive timestamps is one segment, ending at its last
  timestamp if it has one, else at the end of the window's audio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from wruntime.transcribe.result import Segment

HOP_LENGTH = 160
SAMPLE_RATE = 16000
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
#: Mel frames per encoder position (the encoder's stride-2 convolution).
INPUT_STRIDE = 2
#: Seconds per timestamp token step.
TIME_PRECISION = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # 0.02
PUNCTUATION = "\"'“¿([{-\"'.。,，!！?？:：”)]}、"


@dataclass
class Piece:
    """A segment's span (seconds) and tokens, before the window's stats are attached."""

    start: float
    end: float
    tokens: list[int]


@dataclass
class WindowSplit:
    pieces: list[Piece]
    #: Where the next window starts (mel frames).
    next_seek: int
    #: The window ended on one timestamp: its speech is complete.
    single_timestamp_ending: bool


def parse_clip_timestamps(
    clip_timestamps: str | Sequence[float], content_frames: int
) -> list[tuple[int, int]]:
    """(start, end) frame ranges to transcribe; an odd list ends at the end of the file."""
    if isinstance(clip_timestamps, str):
        try:
            values = [float(v) for v in clip_timestamps.split(",") if v.strip()]
        except ValueError:
            from wruntime.errors import WruntimeError

            raise WruntimeError(
                f"clip_timestamps must be comma-separated seconds, got {clip_timestamps!r}."
            ) from None
    else:
        values = [float(v) for v in clip_timestamps]
    points = [round(v * FRAMES_PER_SECOND) for v in values] or [0]
    if len(points) % 2:
        points.append(content_frames)
    return list(zip(points[::2], points[1::2], strict=False))


def split_window(
    tokens: Sequence[int], timestamp_begin: int, *, seek: int, segment_size: int
) -> WindowSplit:
    """Cut one window's sampled tokens into segments and decide the next seek."""
    tokens = list(tokens)
    time_offset = seek * HOP_LENGTH / SAMPLE_RATE
    is_ts = [t >= timestamp_begin for t in tokens]
    single_ending = len(tokens) >= 2 and is_ts[-2:] == [False, True]
    # Index just after each pair of consecutive timestamps: a segment ends there.
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]

    if cuts:
        if single_ending:
            cuts.append(len(tokens))
        pieces = []
        last = 0
        for cut in cuts:
            piece = tokens[last:cut]
            pieces.append(
                Piece(
                    start=time_offset + (piece[0] - timestamp_begin) * TIME_PRECISION,
                    end=time_offset + (piece[-1] - timestamp_begin) * TIME_PRECISION,
                    tokens=piece,
                )
            )
            last = cut
        if single_ending:
            next_seek = seek + segment_size
        else:
            next_seek = seek + (tokens[last - 1] - timestamp_begin) * INPUT_STRIDE
        return WindowSplit(pieces, next_seek, single_ending)

    duration = segment_size * HOP_LENGTH / SAMPLE_RATE
    stamps = [t for t in tokens if t >= timestamp_begin]
    if stamps and stamps[-1] != timestamp_begin:
        duration = (stamps[-1] - timestamp_begin) * TIME_PRECISION
    piece = Piece(start=time_offset, end=time_offset + duration, tokens=tokens)
    return WindowSplit([piece], seek + segment_size, single_ending)


# ---------------------------------------------------------------- word-timestamp refinements


def last_word_end(segments: Sequence[Segment]) -> float | None:
    """End of the last word, else of the last segment (None when there are none)."""
    for seg in reversed(segments):
        if seg.words:
            return seg.words[-1].end
    return segments[-1].end if segments else None


def _word_anomaly(word: object) -> float:
    # Hallucinated words tend to be improbable and implausibly short or long.
    prob = getattr(word, "probability", 0.0)
    duration = word.end - word.start  # type: ignore[attr-defined]
    score = 0.0
    if prob < 0.15:
        score += 1.0
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def is_segment_anomaly(segment: Segment | None) -> bool:
    if segment is None or not segment.words:
        return False
    words = [w for w in segment.words if w.word not in PUNCTUATION][:8]
    score = sum(_word_anomaly(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def _next_with_words(segments: Sequence[Segment]) -> Segment | None:
    return next((s for s in segments if s.words), None)


def skip_hallucinations(
    segments: list[Segment],
    *,
    threshold: float,
    seek: int,
    previous_seek: int,
    segment_size: int,
    single_timestamp_ending: bool,
    last_speech_timestamp: float,
    content_frames: int,
) -> tuple[int, bool]:
    """openai-whisper's hallucination_silence_threshold rules, applied in place.

    Returns (new seek, restart): with restart the window is decoded again from
    the new seek and its segments are discarded.
    """
    time_offset = previous_seek * HOP_LENGTH / SAMPLE_RATE
    window_end_time = (previous_seek + 3000) * HOP_LENGTH / SAMPLE_RATE
    segment_duration = segment_size * HOP_LENGTH / SAMPLE_RATE
    content_duration = content_frames * HOP_LENGTH / SAMPLE_RATE

    if not single_timestamp_ending:
        end = last_word_end(segments)
        if end is not None and end > time_offset:
            if window_end_time - end > threshold:
                seek = round(end * FRAMES_PER_SECOND)
            else:
                seek = previous_seek + segment_size

    first = _next_with_words(segments)
    if first is not None and is_segment_anomaly(first):
        gap = first.start - time_offset
        if gap > threshold:
            return previous_seek + round(gap * FRAMES_PER_SECOND), True

    hal_last_end = last_speech_timestamp
    for i, seg in enumerate(segments):
        if not seg.words:
            continue
        if is_segment_anomaly(seg):
            nxt = _next_with_words(segments[i + 1 :])
            hal_next_start = (
                nxt.words[0].start if nxt is not None else time_offset + segment_duration
            )  # type: ignore[index]
            silence_before = (
                seg.start - hal_last_end > threshold
                or seg.start < threshold
                or seg.start - time_offset < 2.0
            )
            silence_after = (
                hal_next_start - seg.end > threshold
                or is_segment_anomaly(nxt)
                or window_end_time - seg.end < 2.0
            )
            if silence_before and silence_after:
                seek = round(max(time_offset + 1, seg.start) * FRAMES_PER_SECOND)
                if content_duration - seg.end < threshold:
                    seek = content_frames
                del segments[i:]
                break
        hal_last_end = seg.end
    return seek, False
