"""Temperature fallback: when to distrust a window's decoding and sample again.

Greedy or beam decoding at temperature 0 sometimes loops ("the the the ...")
or wanders into text the model itself finds unlikely. openai-whisper's remedy,
kept exactly here: judge each decoding by its gzip compression ratio (loops
compress well) and its average log-probability, and retry at the next
temperature — except when the model says the window is silence, where a low
log-probability is expected and resampling would only invent words.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

R = TypeVar("R")

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def compression_ratio(text: str) -> float:
    """Bytes of the text over bytes of its zlib compression (repetition scores high)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def temperatures_of(temperature: float | Sequence[float]) -> tuple[float, ...]:
    if isinstance(temperature, (int, float)):
        return (float(temperature),)
    temps = tuple(float(t) for t in temperature)
    return temps or (0.0,)


@dataclass(frozen=True)
class FallbackRules:
    """The thresholds; None disables a rule, as in openai-whisper."""

    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6

    def needs_fallback(self, result: Any) -> bool:
        """True when `result` (a DecodingResult) should be decoded again hotter."""
        too_repetitive = (
            self.compression_ratio_threshold is not None
            and result.compression_ratio > self.compression_ratio_threshold
        )
        too_unlikely = (
            self.logprob_threshold is not None and result.avg_logprob < self.logprob_threshold
        )
        silent = (
            self.no_speech_threshold is not None
            and result.no_speech_prob > self.no_speech_threshold
        )
        if too_unlikely and silent:
            # Probably silence: a low log-probability is expected there, and
            # sampling hotter would only invent words.
            return False
        return too_repetitive or too_unlikely

    def should_skip(self, result: Any) -> bool:
        """Whether the final result of a window is silence to fast-forward over.

        Same as openai-whisper: a high no-speech probability alone skips the
        window unless the text was decoded with a log-probability above the
        threshold.
        """
        if self.no_speech_threshold is None or result.no_speech_prob <= self.no_speech_threshold:
            return False
        return not (
            self.logprob_threshold is not None and result.avg_logprob > self.logprob_threshold
        )


def options_for_temperature(options: dict[str, Any], t: float) -> dict[str, Any]:
    """Decoding options for one attempt: beams only when greedy, best_of only when sampling."""
    kwargs = dict(options)
    if t > 0:
        kwargs.pop("beam_size", None)
        kwargs.pop("patience", None)
    else:
        kwargs.pop("best_of", None)
    kwargs["temperature"] = t
    return kwargs


def decode_with_fallback(
    decode_once: Callable[[dict[str, Any]], R],
    options: dict[str, Any],
    temperatures: Sequence[float],
    rules: FallbackRules,
) -> R:
    """Decode at each temperature in turn until the rules accept a result."""
    result: R | None = None
    for t in temperatures:
        result = decode_once(options_for_temperature(options, t))
        if not rules.needs_fallback(result):
            break
    assert result is not None
    return result
