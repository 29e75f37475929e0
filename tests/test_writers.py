"""Output writers: each format parses back to the segments, and writes are atomic."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from wruntime.errors import WruntimeError
from wruntime.transcribe.result import Segment, TranscriptionResult, Word
from wruntime.transcribe.writers import (
    FORMATS,
    format_srt,
    format_timestamp,
    format_tsv,
    format_txt,
    format_vtt,
    write_result,
)


def _segment(
    i: int, start: float, end: float, text: str, words: list[Word] | None = None
) -> Segment:
    return Segment(
        id=i,
        seek=0,
        start=start,
        end=end,
        text=text,
        tokens=[1, 2, 3],
        temperature=0.0,
        avg_logprob=-0.25,
        compression_ratio=1.2,
        no_speech_prob=float("nan"),
        words=words,
    )


@pytest.fixture
def result() -> TranscriptionResult:
    segments = [
        _segment(0, 0.0, 8.0, " And so my fellow Americans, ask not"),
        _segment(1, 8.0, 11.06, " what you can do --> for your country.\t"),
        _segment(2, 3725.5, 3727.25, " An hour later."),
    ]
    return TranscriptionResult(
        text="".join(s.text for s in segments), language="en", segments=segments, duration=3728.0
    )


def test_format_timestamp() -> None:
    assert format_timestamp(0) == "00:00.000"
    assert format_timestamp(11.0649) == "00:11.065"
    assert format_timestamp(3725.5, True, ",") == "01:02:05,500"
    assert format_timestamp(59.9996) == "01:00.000"


def test_txt_one_line_per_segment(result: TranscriptionResult) -> None:
    lines = format_txt(result).splitlines()
    assert lines == [
        "And so my fellow Americans, ask not",
        "what you can do --> for your country.",
        "An hour later.",
    ]


SRT_CUE = re.compile(
    r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)\n(.+?)\n\n", re.S
)


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def test_srt_parses_back(result: TranscriptionResult) -> None:
    text = format_srt(result)
    cues = SRT_CUE.findall(text)
    assert "".join(m.group(0) for m in SRT_CUE.finditer(text)) == text
    assert [int(c[0]) for c in cues] == [1, 2, 3]
    for cue, seg in zip(cues, result.segments, strict=True):
        assert _seconds(*cue[1:5]) == pytest.approx(seg.start, abs=1e-3)
        assert _seconds(*cue[5:9]) == pytest.approx(seg.end, abs=1e-3)
        assert "-->" not in cue[9]  # an arrow in the text would break the cue
    assert cues[2][1] == "01"


def test_vtt_parses_back(result: TranscriptionResult) -> None:
    text = format_vtt(result)
    assert text.startswith("WEBVTT\n\n")
    cues = re.findall(
        r"((?:\d\d:)?\d\d:\d\d\.\d\d\d) --> ((?:\d\d:)?\d\d:\d\d\.\d\d\d)\n(.+?)\n\n", text
    )
    assert len(cues) == 3
    assert cues[0][:2] == ("00:00.000", "00:08.000")
    assert cues[2][:2] == ("01:02:05.500", "01:02:07.250")


def test_tsv_integer_milliseconds(result: TranscriptionResult) -> None:
    rows = [line.split("\t") for line in format_tsv(result).splitlines()]
    assert rows[0] == ["start", "end", "text"]
    assert rows[2] == ["8000", "11060", "what you can do --> for your country."]
    assert all(len(r) == 3 for r in rows)


def test_subtitles_from_words() -> None:
    words = [
        Word(" Ask", 1.0, 1.4, 0.9),
        Word(" not", 1.4, 1.9, 0.8),
        Word(" what.", 2.0, 2.6, 0.7),
    ]
    res = TranscriptionResult(
        text=" Ask not what.",
        language="en",
        segments=[_segment(0, 0.5, 3.0, " Ask not what.", words)],
        duration=3.0,
    )
    # One cue spanning the words, its text the words joined.
    assert format_vtt(res) == "WEBVTT\n\n00:01.000 --> 00:02.600\nAsk not what.\n\n"
    two = format_srt(res, max_words_per_line=2)
    assert "00:00:01,000 --> 00:00:01,900\nAsk not\n" in two
    assert "00:00:02,000 --> 00:00:02,600\nwhat.\n" in two
    karaoke = format_vtt(res, highlight_words=True)
    assert "00:01.400 --> 00:01.900\nAsk <u>not</u> what.\n" in karaoke
    assert "00:01.900 --> 00:02.000\nAsk not what.\n" in karaoke  # the gap keeps the line


def test_write_all_formats(tmp_path: Path, result: TranscriptionResult) -> None:
    written = write_result(result, "/somewhere/talk.flac", tmp_path / "out", "all")
    assert sorted(p.name for p in written) == sorted(f"talk.{f}" for f in FORMATS)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(f"talk.{f}" for f in FORMATS)
    data = json.loads((tmp_path / "out" / "talk.json").read_text(encoding="utf-8"))
    assert data["text"] == result.text
    assert [s["end"] for s in data["segments"]] == [8.0, 11.06, 3727.25]
    assert data["segments"][0]["no_speech_prob"] is None  # NaN is not JSON


def test_failed_write_leaves_nothing(tmp_path: Path, result: TranscriptionResult) -> None:
    # A result that cannot be rendered as JSON: txt/srt/vtt/tsv render, json fails,
    # and not one file (not even a temporary one) may be left behind.
    result.segments[0].tokens = [object()]  # type: ignore[list-item]
    with pytest.raises(TypeError):
        write_result(result, "talk.wav", tmp_path, "all")
    assert os.listdir(tmp_path) == []


def test_existing_file_survives_a_failed_write(tmp_path: Path, result: TranscriptionResult) -> None:
    (tmp_path / "talk.json").write_text("previous", encoding="utf-8")
    result.segments[0].tokens = [object()]  # type: ignore[list-item]
    with pytest.raises(TypeError):
        write_result(result, "talk.wav", tmp_path, "json")
    assert os.listdir(tmp_path) == ["talk.json"]
    assert (tmp_path / "talk.json").read_text(encoding="utf-8") == "previous"


def test_unwritable_directory_is_one_line_error(
    tmp_path: Path, result: TranscriptionResult
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WruntimeError, match="Cannot create output directory"):
        write_result(result, "talk.wav", blocker / "sub", "txt")


def test_unknown_format(tmp_path: Path, result: TranscriptionResult) -> None:
    with pytest.raises(WruntimeError, match="Unknown output format"):
        write_result(result, "talk.wav", tmp_path, "docx")


def test_disk_error_midway_removes_staged_files(
    tmp_path: Path, result: TranscriptionResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: the third file hits a full disk after two were staged.
    from wruntime.transcribe import writers

    real = writers._write_temp
    calls = []

    def failing(out_dir: Path, stem: str, text: str) -> str:
        calls.append(stem)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(out_dir, stem, text)

    monkeypatch.setattr(writers, "_write_temp", failing)
    with pytest.raises(WruntimeError, match="No space left on device"):
        write_result(result, "talk.wav", tmp_path, "all")
    assert os.listdir(tmp_path) == []
