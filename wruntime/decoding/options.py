"""What a caller asks of one window's decoding, and what comes back.

The fields and their defaults are openai-whisper's `DecodingOptions` /
`DecodingResult`, so a user's settings carry over unchanged; validation raises
`WruntimeError` with one sentence instead of a ValueError traceback, because
these options come straight from the command line.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from wruntime.errors import WruntimeError

TASKS = ("transcribe", "translate", "lang_id")


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode one 30 s window (openai-whisper's options, same names and defaults)."""

    #: "transcribe" (X -> X), "translate" (X -> English) or "lang_id" (detect only).
    task: str = "transcribe"
    #: Spoken language code; None detects it on multilingual models ("en" on English-only).
    language: str | None = None

    #: 0 decodes greedily (or by beam search); above 0 samples.
    temperature: float = 0.0
    #: At most this many tokens; None means n_text_ctx // 2 (224).
    sample_len: int | None = None
    #: Independent samples to draw and rank (temperature > 0 only).
    best_of: int | None = None
    #: Beams for beam search (temperature 0 only).
    beam_size: int | None = None
    #: Beam search keeps going until round(beam_size * patience) sequences have finished.
    patience: float | None = None
    #: None ranks candidates by log-probability / length; alpha in [0, 1] uses
    #: Google NMT's ((5 + length) / 6) ** alpha instead.
    length_penalty: float | None = None

    #: Text or token ids of the previous context (goes after <|startofprev|>).
    prompt: str | Sequence[int] | None = None
    #: Text or token ids that the transcription of this window must start with.
    prefix: str | Sequence[int] | None = None

    #: Token ids (list or comma-separated string) never to emit; -1 stands for
    #: the tokenizer's non-speech symbols.
    suppress_tokens: str | Iterable[int] | None = "-1"
    #: Forbid a blank (space or end of text) as the first sampled token.
    suppress_blank: bool = True

    #: Decode text only (<|notimestamps|>), no timestamp tokens.
    without_timestamps: bool = False
    #: The first timestamp may be at most this many seconds in (None: no limit).
    max_initial_timestamp: float | None = 1.0

    #: Seed for sampling at temperature > 0 (None: fresh entropy). Not in openai-whisper,
    #: whose sampling draws from torch's global generator.
    seed: int | None = None

    def validated(self) -> DecodingOptions:
        """Raise a one-line `WruntimeError` for combinations openai-whisper rejects."""
        if self.task not in TASKS:
            raise WruntimeError(f"Unknown task {self.task!r}; use one of {', '.join(TASKS)}.")
        if self.temperature < 0:
            raise WruntimeError(f"Temperature must be 0 or more, got {self.temperature}.")
        if self.beam_size is not None and self.best_of is not None:
            raise WruntimeError("beam_size and best_of cannot be given together.")
        if self.beam_size is not None and self.beam_size < 1:
            raise WruntimeError(f"beam_size must be at least 1, got {self.beam_size}.")
        if self.best_of is not None and self.best_of < 1:
            raise WruntimeError(f"best_of must be at least 1, got {self.best_of}.")
        if self.temperature == 0 and self.best_of is not None:
            raise WruntimeError("best_of needs a temperature above 0 (greedy decoding is unique).")
        if self.patience is not None and self.beam_size is None:
            raise WruntimeError("patience needs beam_size.")
        if self.beam_size is not None and round(self.beam_size * (self.patience or 1.0)) < 1:
            raise WruntimeError(
                f"beam_size {self.beam_size} with patience {self.patience} keeps no candidates."
            )
        if self.length_penalty is not None and not 0 <= self.length_penalty <= 1:
            raise WruntimeError(
                f"length_penalty must be between 0 and 1, got {self.length_penalty}."
            )
        if self.sample_len is not None and self.sample_len < 1:
            raise WruntimeError(f"sample_len must be at least 1, got {self.sample_len}.")
        return self


@dataclass(frozen=True)
class DecodingResult:
    """One window's decoding (openai-whisper's result, plus sum_logprob)."""

    language: str
    language_probs: dict[str, float] | None = None
    #: The sampled tokens, without the prompt and the end token (timestamps included).
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    #: sum_logprob / (len(tokens) + 1): the end token counts, as in openai-whisper.
    avg_logprob: float = float("nan")
    sum_logprob: float = float("nan")
    #: Probability of <|nospeech|> at the start-of-transcript position.
    no_speech_prob: float = float("nan")
    temperature: float = float("nan")
    compression_ratio: float = float("nan")


def compression_ratio(text: str) -> float:
    """UTF-8 bytes over zlib-compressed bytes (openai-whisper's loop detector)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))
