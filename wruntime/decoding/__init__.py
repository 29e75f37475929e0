"""Decoding one 30 s window: openai-whisper's semantics over the executor interface.

Split as WhisperKit splits it, one concern per module:

- `options`       — DecodingOptions / DecodingResult (openai-whisper's fields and defaults)
- `inference`     — the decoder session: KV cache, mask, positions, one call per step
- `logit_filters` — SuppressBlank, SuppressTokens, ApplyTimestampRules
- `search`        — greedy / sampling, beam search, the final ranking
- `language`      — language identification at <|startoftranscript|>
- `decode`        — the loop that ties them together
"""

from wruntime.decoding.decode import decode
from wruntime.decoding.inference import DecoderSession, ExplicitCacheSession, StatefulSession
from wruntime.decoding.language import detect_language, language_probs
from wruntime.decoding.options import DecodingOptions, DecodingResult

__all__ = [
    "DecoderSession",
    "DecodingOptions",
    "DecodingResult",
    "ExplicitCacheSession",
    "StatefulSession",
    "decode",
    "detect_language",
    "language_probs",
]
