"""Word timestamps from the alignment heads' cross-attention, as openai-whisper.

A few cross-attention heads of the decoder look at the audio frame being
spoken when they emit a token. One prefill call over
``sot_sequence + <|notimestamps|> + text + <|eot|>`` returns those heads'
attention (the decoder's ``alignment`` output); normalising it per frame,
median filtering it along time and averaging the heads gives a token × frame
cost whose cheapest monotonic path (DTW) says when each token starts. Tokens
are grouped into words, punctuation is glued to its neighbour, and a few
duration heuristics tame words that swallow a pause.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from wruntime.transcribe.result import Segment, Word

#: Seconds per encoder position (two mel frames of 10 ms).
TIME_PER_POSITION = 0.02
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
#: Scripts written without spaces: words are split at unicode boundaries instead.

#: (tokens) -> (alignment (A, T, S) softmaxed over S, logits (T, V)); one prefill call.
Aligner = Callable[[list[int]], tuple[np.ndarray, np.ndarray]]


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


# ---------------------------------------------------------------- signal parts


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window along the last axis, reflect-padded (odd width)."""
    if width % 2 != 1 or width < 1:
        raise ValueError("median filter width must be a positive odd number")
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.sort(windows, axis=-1)[..., pad]


def _dtw_trace_numpy(cost_matrix: np.ndarray) -> np.ndarray:
    """DTW trace by anti-diagonals: every cell on one diagonal is independent.

    Moves: 0 diagonal, 1 down (next token, same frame), 2 right (same token,
    next frame). Ties go as openai-whisper's loop breaks them: the diagonal
    only when strictly cheapest, then down when strictly cheapest, else right.
    Costs accumulate in float32 as there.
    """
    n, m = cost_matrix.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    cost[0, 0] = 0.0
    x = cost_matrix.astype(np.float32)
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        c0 = cost[i - 1, j - 1]
        c1 = cost[i - 1, j]
        c2 = cost[i, j - 1]
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        best = np.where(t == 0, c0, np.where(t == 1, c1, c2))
        cost[i, j] = x[i - 1, j - 1] + best
        trace[i, j] = t
    return trace


def _backtrace(trace: np.ndarray) -> np.ndarray:
    trace = trace.copy()
    i, j = trace.shape[0] - 1, trace.shape[1] - 1
    trace[0, :] = 2
    trace[:, 0] = 1
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        move = trace[i, j]
        if move == 0:
            i -= 1
            j -= 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    return np.array(path[::-1], dtype=np.int64).reshape(-1, 2).T


def _make_numba_trace() -> Callable[[np.ndarray], np.ndarray] | None:
    try:
        import numba
    except ImportError:  # pragma: no cover - numba comes with librosa
        return None

    @numba.njit(cache=True)
    def trace_numba(x: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
        n, m = x.shape
        cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
        trace = -np.ones((n + 1, m + 1), dtype=np.int8)
        cost[0, 0] = 0.0
        for j in range(1, m + 1):
            for i in range(1, n + 1):
                c0 = cost[i - 1, j - 1]
                c1 = cost[i - 1, j]
                c2 = cost[i, j - 1]
                if c0 < c1 and c0 < c2:
                    c, t = c0, 0
                elif c1 < c0 and c1 < c2:
                    c, t = c1, 1
                else:
                    c, t = c2, 2
                cost[i, j] = np.float32(x[i - 1, j - 1]) + c
                trace[i, j] = t
        return trace

    return trace_numba


_numba_trace: Callable[[np.ndarray], np.ndarray] | bool | None = False


def dtw(cost_matrix: np.ndarray, use_numba: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest monotonic path through a (tokens, frames) cost: (token indices, frame indices)."""
    global _numba_trace
    trace_fn: Callable[[np.ndarray], np.ndarray] = _dtw_trace_numpy
    if use_numba:
        if _numba_trace is False:
            _numba_trace = _make_numba_trace()
        if _numba_trace:
            trace_fn = _numba_trace  # type: ignore[assignment]
    path = _backtrace(trace_fn(np.ascontiguousarray(cost_matrix, dtype=np.float64)))
    return path[0], path[1]


# ---------------------------------------------------------------- words


def find_alignment(
    aligner: Aligner,
    tokenizer: object,
    text_tokens: list[int],
    num_frames: int,
    language: str | None,
    medfilt_width: int = 7,
) -> list[WordTiming]:
    """Word timings (seconds from the window start) for `text_tokens` in one window."""
    if not text_tokens:
        return []
    sot_sequence = list(tokenizer.sot_sequence)  # type: ignore[attr-defined]
    eot = tokenizer.eot  # type: ignore[attr-defined]
    tokens = [*sot_sequence, tokenizer.no_timestamps, *text_tokens, eot]  # type: ignore[attr-defined]
    weights, logits = aligner(tokens)
    weights = np.asarray(weights, dtype=np.float64)
    logits = np.asarray(logits, dtype=np.float64)

    # Token probabilities of the text under teacher forcing (text tokens only).
    sampled = logits[len(sot_sequence) : len(sot_sequence) + len(text_tokens), :eot]
    sampled = sampled - sampled.max(axis=-1, keepdims=True)
    log_probs = sampled - np.log(np.exp(sampled).sum(axis=-1, keepdims=True))
    text_probs = np.exp(log_probs[np.arange(len(text_tokens)), text_tokens])

    # The decoder's weights are softmaxed over all 1500 positions; keeping the
    # positions with audio and renormalising equals openai's softmax over them.
    n_pos = max(1, num_frames // 2)
    w = weights[:, :, :n_pos]
    w = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-30)
    mean = w.mean(axis=-2, keepdims=True)
    std = w.std(axis=-2, keepdims=True)
    w = (w - mean) / np.where(std > 0, std, 1.0)
    w = median_filter(w, medfilt_width)
    matrix = w.mean(axis=0)[len(sot_sequence) : -1]
    text_idx, time_idx = dtw(-matrix)

    # The tokenizer knows its language: spaces, or character boundaries for
    # languages written without them.
    words, word_tokens = tokenizer.split_to_word_tokens([*text_tokens, eot])  # type: ignore[attr-defined]
    if len(word_tokens) <= 1:
        return []
    boundaries = np.concatenate([[0], np.cumsum([len(t) for t in word_tokens[:-1]])])
    jumps = np.concatenate([[True], np.diff(text_idx) != 0])
    jump_times = time_idx[jumps] * TIME_PER_POSITION
    starts = jump_times[boundaries[:-1]]
    ends = jump_times[boundaries[1:]]
    return [
        WordTiming(word, toks, float(s), float(e), float(np.mean(text_probs[i:j])))
        for word, toks, s, e, i, j in zip(
            words, word_tokens, starts, ends, boundaries[:-1], boundaries[1:], strict=False
        )
    ]


def merge_punctuations(alignment: list[WordTiming], prepended: str, appended: str) -> None:
    """Glue opening punctuation to the next word and closing punctuation to the previous."""
    following = len(alignment) - 1
    for i in range(len(alignment) - 2, -1, -1):
        prev, nxt = alignment[i], alignment[following]
        if prev.word.startswith(" ") and prev.word.strip() in prepended:
            nxt.word = prev.word + nxt.word
            nxt.tokens = prev.tokens + nxt.tokens
            prev.word, prev.tokens = "", []
        else:
            following = i
    preceding = 0
    for j in range(1, len(alignment)):
        prev, nxt = alignment[preceding], alignment[j]
        if not prev.word.endswith(" ") and nxt.word in appended:
            prev.word = prev.word + nxt.word
            prev.tokens = prev.tokens + nxt.tokens
            nxt.word, nxt.tokens = "", []
        else:
            preceding = j


def add_word_timestamps(
    segments: Sequence[Segment],
    *,
    aligner: Aligner,
    tokenizer: object,
    num_frames: int,
    time_offset: float,
    last_speech_timestamp: float,
    language: str | None = None,
    prepend_punctuations: str = PREPEND_PUNCTUATIONS,
    append_punctuations: str = APPEND_PUNCTUATIONS,
) -> None:
    """Set `words` on the segments of one window (and adjust their bounds), in place."""
    if not segments:
        return
    eot = tokenizer.eot  # type: ignore[attr-defined]
    per_segment = [[t for t in s.tokens if t < eot] for s in segments]
    text_tokens = [t for toks in per_segment for t in toks]
    alignment = find_alignment(aligner, tokenizer, text_tokens, num_frames, language)

    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median_duration = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    max_duration = median_duration * 2

    # Words at sentence boundaries tend to absorb the pause: cap them.
    if len(durations):
        for i in range(1, len(alignment)):
            cur = alignment[i]
            if cur.end - cur.start > max_duration:
                if cur.word in SENTENCE_END_MARKS:
                    cur.end = cur.start + max_duration
                elif alignment[i - 1].word in SENTENCE_END_MARKS:
                    cur.start = cur.end - max_duration

    merge_punctuations(alignment, prepend_punctuations, append_punctuations)

    index = 0
    for segment, toks in zip(segments, per_segment, strict=False):
        consumed = 0
        words: list[Word] = []
        while index < len(alignment) and consumed < len(toks):
            timing = alignment[index]
            if timing.word:
                words.append(
                    Word(
                        timing.word,
                        round(time_offset + timing.start, 2),
                        round(time_offset + timing.end, 2),
                        timing.probability,
                    )
                )
            consumed += len(timing.tokens)
            index += 1
        if words:
            last_speech_timestamp = _fix_segment_bounds(
                segment, words, last_speech_timestamp, median_duration, max_duration
            )
        segment.words = words


def _fix_segment_bounds(
    segment: Segment,
    words: list[Word],
    last_speech: float,
    median_duration: float,
    max_duration: float,
) -> float:
    """openai's heuristics for the first word after a pause and the segment bounds."""
    first = words[0]
    after_pause = first.end - last_speech > median_duration * 4
    too_long = first.end - first.start > max_duration or (
        len(words) > 1 and words[1].end - first.start > max_duration * 2
    )
    if after_pause and too_long:
        if len(words) > 1 and words[1].end - words[1].start > max_duration:
            boundary = max(words[1].end / 2, words[1].end - max_duration)
            first.end = words[1].start = boundary
        first.start = max(0.0, first.end - max_duration)

    if segment.start < first.end and segment.start - 0.5 > first.start:
        first.start = max(0.0, min(first.end - median_duration, segment.start))
    else:
        segment.start = first.start

    last = words[-1]
    if segment.end > last.start and segment.end + 0.5 < last.end:
        last.end = max(last.start + median_duration, segment.end)
    else:
        segment.end = last.end
    return segment.end
