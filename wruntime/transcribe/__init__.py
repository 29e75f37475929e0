"""Long-form transcription: `Transcriber`, its results and the output writers."""

from __future__ import annotations

from wruntime.transcribe.result import Segment, TranscriptionResult, Word
from wruntime.transcribe.transcriber import TranscribeOptions, Transcriber, TranscriptionStream
from wruntime.transcribe.writers import OUTPUT_FORMATS, write_result

__all__ = [
    "OUTPUT_FORMATS",
    "Segment",
    "TranscribeOptions",
    "Transcriber",
    "TranscriptionResult",
    "TranscriptionStream",
    "Word",
    "write_result",
]
