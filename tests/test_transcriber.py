"""Transcriber: openai-whisper's long-form rules, word timestamps and the real pipeline.

The first part checks the pieces against openai-whisper's semantics directly
(segment cutting and seeking, fallback rules, DTW, median filter, punctuation
merging, the stage timer). The second transcribes real audio with a real
built model (tiny.en, fp16 by default, on the MIL interpreter off macOS) and
checks the text against the references and against openai-whisper's own
long-form output on the same samples (tests/fixtures/transcribe_openai.json).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from tests.transcribe_inputs import clip_audio, long_audio
from wruntime.errors import WruntimeError
from wruntime.timing import StageTimer, TimedExecutor, stage
from wruntime.transcribe.fallback import FallbackRules, options_for_temperature, temperatures_of
from wruntime.transcribe.seek import parse_clip_timestamps, split_window
from wruntime.transcribe.word_timestamps import WordTiming, dtw, median_filter, merge_punctuations

FIXTURE = Path(__file__).parent / "fixtures" / "transcribe_openai.json"
TS = 50364  # <|0.00|> in the English-only vocabulary
EOT = 50256


# ---------------------------------------------------------------- seeking


def test_split_consecutive_timestamps_single_ending() -> None:
    # <|0.00|> a b <|2.00|><|2.00|> c <|5.00|>  -> two segments, speech complete: next window.
    tokens = [TS, 1, 2, TS + 100, TS + 100, 3, TS + 250]
    split = split_window(tokens, TS, seek=1000, segment_size=3000)
    assert split.single_timestamp_ending
    assert [(p.start, p.end) for p in split.pieces] == [(10.0, 12.0), (12.0, 15.0)]
    assert split.pieces[1].tokens == [TS + 100, 3, TS + 250]
    assert split.next_seek == 4000


def test_split_unfinished_last_segment_seeks_back() -> None:
    # The text after the last complete segment is dropped and decoded again from its start.
    tokens = [TS, 1, 2, TS + 100, TS + 100, 3, 4]
    split = split_window(tokens, TS, seek=0, segment_size=3000)
    assert not split.single_timestamp_ending
    assert len(split.pieces) == 1 and split.pieces[0].tokens == [TS, 1, 2, TS + 100]
    assert split.next_seek == 200  # timestamp 100 * 2 mel frames


def test_split_without_consecutive_timestamps() -> None:
    split = split_window([TS, 1, 2, TS + 150], TS, seek=3000, segment_size=1200)
    assert [(p.start, p.end) for p in split.pieces] == [(30.0, 33.0)]
    assert split.next_seek == 4200
    no_ts = split_window([1, 2], TS, seek=0, segment_size=1200)
    assert (no_ts.pieces[0].start, no_ts.pieces[0].end) == (0.0, 12.0)


def test_clip_timestamps() -> None:
    assert parse_clip_timestamps("0", 5000) == [(0, 5000)]
    assert parse_clip_timestamps("1.5,10,20", 5000) == [(150, 1000), (2000, 5000)]
    assert parse_clip_timestamps([], 700) == [(0, 700)]
    with pytest.raises(WruntimeError):
        parse_clip_timestamps("a,b", 100)


# ---------------------------------------------------------------- fallback


class _R:
    def __init__(self, cr: float, lp: float, ns: float, t: float = 0.0) -> None:
        self.compression_ratio, self.avg_logprob, self.no_speech_prob = cr, lp, ns
        self.temperature = t


def test_fallback_rules() -> None:
    rules = FallbackRules()
    assert not rules.needs_fallback(_R(1.5, -0.3, 0.1))
    assert rules.needs_fallback(_R(2.5, -0.3, 0.1))  # repetitive
    assert rules.needs_fallback(_R(1.5, -1.2, 0.1))  # unlikely
    assert not rules.needs_fallback(_R(2.5, -1.2, 0.9))  # silence overrides both
    assert rules.should_skip(_R(1.5, -1.2, 0.9))
    assert not rules.should_skip(_R(1.5, -0.5, 0.9))  # confident text is kept
    off = FallbackRules(None, None, None)
    assert not off.needs_fallback(_R(9.0, -9.0, 1.0)) and not off.should_skip(_R(1, -9, 1))


def test_options_per_temperature() -> None:
    opts = {"beam_size": 5, "best_of": 5, "patience": 1.0, "language": "en"}
    assert options_for_temperature(opts, 0.0) == {
        "beam_size": 5,
        "patience": 1.0,
        "language": "en",
        "temperature": 0.0,
    }
    assert options_for_temperature(opts, 0.4) == {
        "best_of": 5,
        "language": "en",
        "temperature": 0.4,
    }
    assert temperatures_of(0.3) == (0.3,)
    assert temperatures_of((0.0, 0.5)) == (0.0, 0.5)


# ---------------------------------------------------------------- word-timestamp pieces


def test_dtw_numba_and_numpy_agree() -> None:
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (3, 50), (20, 300), (7, 7)]:
        x = rng.standard_normal(shape)
        a, b = dtw(x), dtw(x, use_numba=False)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        # A monotonic path from (0, 0) to the far corner.
        assert a[0][0] == 0 and a[1][0] == 0
        assert a[0][-1] == shape[0] - 1 and a[1][-1] == shape[1] - 1
        assert (np.diff(a[0]) >= 0).all() and (np.diff(a[1]) >= 0).all()


def test_dtw_follows_cheap_cells() -> None:
    # Token i is cheap only over frames [2i, 2i + 2): the path must visit exactly those.
    cost = np.ones((3, 6))
    for i in range(3):
        cost[i, 2 * i : 2 * i + 2] = -5.0
    tokens, frames = dtw(cost)
    assert list(zip(tokens.tolist(), frames.tolist(), strict=True)) == [
        (0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)
    ]  # fmt: skip


def test_median_filter_matches_scipy() -> None:
    from scipy.ndimage import median_filter as scipy_median

    x = np.random.default_rng(2).standard_normal((4, 9, 40)).astype(np.float32)
    # numpy's "reflect" (no edge repeat) is scipy's "mirror".
    expected = scipy_median(x, size=(1, 1, 7), mode="mirror")
    np.testing.assert_array_equal(median_filter(x, 7), expected)
    short = x[..., :3]
    np.testing.assert_array_equal(median_filter(short, 7), short)


def test_merge_punctuations() -> None:
    words = [
        WordTiming(' "', [1], 0, 1, 1),
        WordTiming(" Hello", [2], 1, 2, 1),
        WordTiming(",", [3], 2, 3, 1),
        WordTiming(" world", [4], 3, 4, 1),
        WordTiming(".", [5], 4, 5, 1),
        WordTiming('"', [6], 5, 6, 1),
    ]
    merge_punctuations(words, "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、")
    assert [w.word for w in words] == ["", ' " Hello,', "", ' world."', "", ""]
    assert words[1].tokens == [1, 2, 3] and words[3].tokens == [4, 5, 6]


# ---------------------------------------------------------------- timing


def test_stage_timer_records_nested_stages() -> None:
    timer = StageTimer()
    with stage("audio"):  # no active timer: nothing recorded, no error
        pass
    with timer.activate(), stage("decode"):
        with stage("decoder"):
            time.sleep(0.01)
        with stage("decoder"):
            pass
    assert set(timer.stats) == {"decode", "decoder"}
    assert timer.stats["decoder"].count == 2
    assert timer.wall("decode") >= timer.wall("decoder") >= 0.01

    class Echo:
        def predict(self, inputs, state=None):  # type: ignore[no-untyped-def]
            return {"seen": inputs["x"], "state": state}

        extra = 7

    wrapped = TimedExecutor(Echo(), "encoder")
    with timer.activate():
        assert wrapped.predict({"x": 1})["seen"] == 1
        assert wrapped.predict({"x": 2}, state="s")["state"] == "s"
    assert timer.stats["encoder"].count == 2 and wrapped.extra == 7


# ---------------------------------------------------------------- the real pipeline


def _words(text: str) -> list[str]:
    text = text.lower().replace("counselled", "counseled")
    return re.sub(r"[^a-z0-9' ]+", " ", text).split()


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = _words(reference), _words(hypothesis)
    d = np.arange(len(hyp) + 1)
    for i, r in enumerate(ref, 1):
        prev, d = d, np.empty_like(d)
        d[0] = i
        for j, h in enumerate(hyp, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (r != h))
    return float(d[-1]) / max(1, len(ref))


@pytest.fixture(scope="module")
def transcriber(test_home: Path):
    try:
        from wruntime.build import ensure_model  # noqa: F401
    except ImportError:
        pytest.skip("the model builder (wruntime.build.ensure_model) is not in this checkout yet")
    from wruntime import Transcriber

    return Transcriber("tiny.en-fp16", executor="interpreter")


@pytest.fixture(scope="module")
def openai_reference() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def long_result(transcriber):
    return transcriber.transcribe(long_audio(), word_timestamps=True)


def test_clips_match_references(transcriber) -> None:
    from tests.conftest import CLIPS

    refs, hyps = [], []
    for name, (path, reference) in CLIPS.items():
        result = transcriber.transcribe(path, temperature=0.0)
        assert result.language == "en"
        assert result.duration == pytest.approx(len(clip_audio(name)) / 16000)
        refs.append(reference)
        hyps.append(result.text)
    assert wer(CLIPS["jfk"][1], hyps[0]) == 0.0
    assert wer(" ".join(refs), " ".join(hyps)) < 0.15, hyps


def test_long_form_has_no_seam_errors(long_result, openai_reference) -> None:
    segments = long_result.segments
    assert long_result.duration == pytest.approx(len(long_audio()) / 16000)
    text = " ".join(_words(long_result.text))
    # Each sentence exactly once (twice for the repeated one): nothing dropped or repeated at the seam.
    assert text.count("ask what you can do for your country") == 2
    assert text.count("his belly counseled him") == 1
    assert text.count("experience proves this") == 1
    assert wer(openai_reference["long_words"]["text"], long_result.text) < 0.1
    starts = [s.start for s in segments]
    assert starts == sorted(starts)
    for s in segments:
        assert 0.0 <= s.start <= s.end <= long_result.duration + 0.5
    assert [s.id for s in segments] == list(range(len(segments)))
    assert {"audio", "features", "encoder", "decoder", "search", "text"} <= set(long_result.timings)
    assert long_result.timings["encoder"]["count"] >= 2  # at least two windows


def test_word_timestamps_inside_segments(long_result, openai_reference) -> None:
    all_words = []
    for s in long_result.segments:
        assert s.words is not None
        if s.text:
            assert "".join(w.word for w in s.words).strip() == s.text.strip()
        for w in s.words:
            # openai's rule for an overlong last (or first) word keeps it at least a
            # median word duration (at most 0.7 s) long, even past the segment's end.
            assert s.start - 0.7 <= w.start <= w.end <= s.end + 0.7
            assert w.start >= s.start - 1e-6 or w is s.words[0]
            assert w.end <= s.end + 1e-6 or w is s.words[-1]
            assert 0.0 <= w.probability <= 1.0
        all_words.extend(s.words)
    ends = [w.end for w in all_words]
    assert ends == sorted(ends)
    # Close to openai-whisper's alignment of the same words (fp16 vs fp32 may move a frame or two).
    ref = [w for s in openai_reference["long_words"]["segments"] for w in s["words"]]
    if [w.word for w in all_words] == [w["word"] for w in ref]:
        diffs = [abs(a.start - b["start"]) for a, b in zip(all_words, ref, strict=True)]
        assert np.median(diffs) <= 0.1


def test_silence_gives_empty_text(transcriber) -> None:
    result = transcriber.transcribe(np.zeros(5 * 16000, np.float32))
    assert result.text.strip() == ""
    assert all(not s.text for s in result.segments)


def test_streaming_yields_segments_before_the_end(transcriber) -> None:
    stream = transcriber.transcribe_iter(long_audio(), temperature=0.0)
    assert stream.language == "en" and stream.duration > 30
    first = next(stream)
    # Only the first window has been decoded when its first segment arrives.
    assert stream.timer.stats["encoder"].count == 1
    assert first.start < 30.0
    rest = list(stream)
    assert rest and stream.timer.stats["encoder"].count >= 2
    result = stream.result()
    assert [s.text for s in result.segments] == [first.text] + [s.text for s in rest]


def test_bad_inputs_raise_one_line_errors(transcriber, tmp_path: Path) -> None:
    with pytest.raises(WruntimeError):
        transcriber.transcribe(tmp_path / "missing.wav")
    with pytest.raises(WruntimeError):
        transcriber.transcribe(np.zeros((2, 100), np.float32))
    with pytest.raises(WruntimeError, match="Unknown transcription option"):
        transcriber.transcribe(np.zeros(1600, np.float32), beam_sise=5)


@pytest.fixture(scope="module")
def transcriber_fp32(transcriber):
    from wruntime import Transcriber

    return Transcriber("tiny.en-fp32", executor="interpreter")


def test_long_form_fp32_equals_openai_whisper(transcriber_fp32, openai_reference) -> None:
    """At fp32 the whole long-form result is openai-whisper's: every segment, token and word."""
    result = transcriber_fp32.transcribe(long_audio(), word_timestamps=True)
    reference = openai_reference["long_words"]
    assert result.text == reference["text"]
    assert len(result.segments) == len(reference["segments"])
    for ours, theirs in zip(result.segments, reference["segments"], strict=True):
        assert (ours.seek, ours.start, ours.end, ours.text) == (
            theirs["seek"],
            theirs["start"],
            theirs["end"],
            theirs["text"],
        )
        assert ours.tokens == theirs["tokens"]
        assert [(w.word, w.start, w.end) for w in ours.words] == [
            (w["word"], w["start"], w["end"]) for w in theirs["words"]
        ]


def test_long_form_fp32_beam5_equals_openai_whisper(transcriber_fp32, openai_reference) -> None:
    result = transcriber_fp32.transcribe(long_audio(), beam_size=5)
    reference = openai_reference["long_beam5"]
    assert [(s.seek, s.start, s.end, s.text) for s in result.segments] == [
        (s["seek"], s["start"], s["end"], s["text"]) for s in reference["segments"]
    ]
