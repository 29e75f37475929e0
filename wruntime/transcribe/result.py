"""What a transcription returns: segments, words, text, language and timings.

Field names follow openai-whisper's result dictionary, so `to_dict()` output
can be read by any tool written for `whisper.transcribe(...)` and its JSON
writer; the timings and audio duration are extra keys such tools ignore.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Word:
    """One word with its time span (seconds) and mean token probability."""

    word: str
    start: float
    end: float
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "word": self.word,
            "start": self.start,
            "end": self.end,
            "probability": _finite(self.probability),
        }


@dataclass
class Segment:
    """One timestamped piece of text, with the decoding statistics that produced it."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "seek": self.seek,
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "tokens": list(self.tokens),
            "temperature": self.temperature,
            "avg_logprob": _finite(self.avg_logprob),
            "compression_ratio": _finite(self.compression_ratio),
            "no_speech_prob": _finite(self.no_speech_prob),
        }
        if self.words is not None:
            out["words"] = [w.to_dict() for w in self.words]
        return out


@dataclass
class TranscriptionResult:
    """The whole transcription of one input."""

    text: str
    language: str
    segments: list[Segment]
    duration: float
    timings: dict[str, dict[str, float | int]] = field(default_factory=dict)
    wall_time: float = 0.0

    @property
    def realtime_factor(self) -> float:
        """Processing time over audio time (below 1 is faster than realtime)."""
        return self.wall_time / self.duration if self.duration > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "segments": [s.to_dict() for s in self.segments],
            "language": self.language,
            "duration": self.duration,
            "wall_time": self.wall_time,
            "realtime_factor": _finite(self.realtime_factor),
            "timings": self.timings,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, **kwargs)


def _finite(x: float) -> float | None:
    # JSON has no NaN: a statistic that was never computed is written as null.
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)
