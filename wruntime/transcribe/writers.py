"""Output writers: txt, srt, vtt, tsv, json, or all of them.

The formats are openai-whisper's, so subtitles and JSON made here drop into
the same tools. Every file is written to a temporary file in the output
directory and renamed into place: a crash, a full disk or a bad result never
leaves a half-written transcript. With "all", every format is rendered and
written to its temporary file before the first rename, so a failure there
leaves no output at all; the renames come last, each one atomic.

One deliberate difference from openai-whisper: srt and vtt skip segments
whose text is empty (a cue with no text is noise to a subtitle player).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from wruntime.errors import WruntimeError

FORMATS = ("txt", "srt", "vtt", "tsv", "json")
OUTPUT_FORMATS = (*FORMATS, "all")


def format_timestamp(seconds: float, always_include_hours: bool = False, marker: str = ".") -> str:
    """HH:MM:SS.mmm (hours only when needed or asked), rounded to the millisecond."""
    ms = round(max(0.0, float(seconds)) * 1000.0)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1_000)
    head = f"{hours:02d}:" if always_include_hours or hours else ""
    return f"{head}{minutes:02d}:{secs:02d}{marker}{ms:03d}"


def _as_dict(result: Any) -> dict[str, Any]:
    return result if isinstance(result, dict) else result.to_dict()


def format_txt(result: Any, **_: Any) -> str:
    return "".join(s["text"].strip() + "\n" for s in _as_dict(result)["segments"])


def format_tsv(result: Any, **_: Any) -> str:
    # Integer milliseconds: no locale can turn a decimal point into a comma.
    lines = ["start\tend\ttext\n"]
    for s in _as_dict(result)["segments"]:
        text = s["text"].strip().replace("\t", " ")
        lines.append(f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t{text}\n")
    return "".join(lines)


def format_json(result: Any, **_: Any) -> str:
    return json.dumps(_as_dict(result), ensure_ascii=False)


def _cues(
    result: dict[str, Any],
    max_words_per_line: int | None = None,
    highlight_words: bool = False,
) -> Iterator[tuple[float, float, str]]:
    """(start, end, text) of each subtitle cue.

    One cue per segment; with word timings the cue spans its words, and
    `max_words_per_line` splits a segment into several cues. `highlight_words`
    repeats a cue once per word with that word underlined, as karaoke players
    expect.
    """
    for seg in result["segments"]:
        words = seg.get("words")
        if not words:
            text = seg["text"].strip().replace("-->", "->")
            if text:
                yield seg["start"], seg["end"], text
            continue
        step = max_words_per_line or len(words)
        for i in range(0, len(words), step):
            chunk = words[i : i + step]
            texts = [w["word"] for w in chunk]
            texts[0] = texts[0].lstrip()
            line = "".join(texts).replace("-->", "->")
            if not highlight_words:
                yield chunk[0]["start"], chunk[-1]["end"], line
                continue
            last = chunk[0]["start"]
            for j, w in enumerate(chunk):
                if w["start"] > last:
                    yield last, w["start"], line
                marked = [_underline(t) if k == j else t for k, t in enumerate(texts)]
                yield w["start"], w["end"], "".join(marked).replace("-->", "->")
                last = w["end"]


def _underline(word: str) -> str:
    stripped = word.lstrip()
    return word[: len(word) - len(stripped)] + f"<u>{stripped}</u>"


def format_srt(result: Any, **options: Any) -> str:
    out = []
    for i, (start, end, text) in enumerate(_cues(_as_dict(result), **options), start=1):
        a = format_timestamp(start, True, ",")
        b = format_timestamp(end, True, ",")
        out.append(f"{i}\n{a} --> {b}\n{text}\n\n")
    return "".join(out)


def format_vtt(result: Any, **options: Any) -> str:
    out = ["WEBVTT\n\n"]
    for start, end, text in _cues(_as_dict(result), **options):
        out.append(f"{format_timestamp(start)} --> {format_timestamp(end)}\n{text}\n\n")
    return "".join(out)


FORMATTERS: dict[str, Callable[..., str]] = {
    "txt": format_txt,
    "srt": format_srt,
    "vtt": format_vtt,
    "tsv": format_tsv,
    "json": format_json,
}


def write_result(
    result: Any,
    audio_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    output_format: str = "all",
    **options: Any,
) -> list[Path]:
    """Write `result` as <output_dir>/<audio stem>.<ext> for one format or "all".

    Every text is rendered and written to a temporary file before any file is
    renamed into place, so a failure in any format leaves no output at all.
    Options (`max_words_per_line`, `highlight_words`) apply to srt and vtt.
    """
    if output_format not in OUTPUT_FORMATS:
        raise WruntimeError(
            f"Unknown output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}."
        )
    formats = FORMATS if output_format == "all" else (output_format,)
    out_dir = Path(output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WruntimeError(f"Cannot create output directory {out_dir}: {e.strerror}.") from e
    stem = Path(audio_path).stem
    data = _as_dict(result)
    sub_opts = {k: v for k, v in options.items() if v is not None}

    texts = {
        fmt: FORMATTERS[fmt](data, **(sub_opts if fmt in ("srt", "vtt") else {})) for fmt in formats
    }
    staged: list[tuple[str, Path]] = []
    try:
        for fmt, text in texts.items():
            staged.append((_write_temp(out_dir, stem, text), out_dir / f"{stem}.{fmt}"))
        for tmp, final in staged:
            os.replace(tmp, final)
    except OSError as e:
        for tmp, _ in staged:
            _unlink_quietly(tmp)
        raise WruntimeError(f"Cannot write output to {out_dir}: {e.strerror or e}.") from e
    except BaseException:
        for tmp, _ in staged:
            _unlink_quietly(tmp)
        raise
    return [final for _, final in staged]


def _write_temp(out_dir: Path, stem: str, text: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
