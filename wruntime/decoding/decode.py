"""One 30 s window, from encoded audio to text: the loop that ties the pieces together.

    prompt ─▶ session.prefill (one decoder call) ─▶ logits at the last prompt position
    repeat: logit filters ─▶ search picks a token per row (beams reorder the cache)
            ─▶ session.step (one decoder call for every row) ─▶ logits
    finally: candidates ─▶ ranker ─▶ DecodingResult

The prompt layout, the filters, the searches and the ranking are openai-whisper's
(see `decoding.options`); what differs is only where the work happens — the
prompt in one call, the cross-attention K/V computed once by the encoder, the
group of beams or samples sharing the prompt's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from wruntime.build.interface import MAX_BATCH
from wruntime.decoding.language import language_probs
from wruntime.decoding.logit_filters import (
    ApplyTimestampRules,
    LogitFilter,
    SuppressBlank,
    SuppressTokens,
)
from wruntime.decoding.options import DecodingOptions, DecodingResult, compression_ratio
from wruntime.decoding.search import BeamSearch, GreedySearch, TokenSearch, rank
from wruntime.errors import WruntimeError

#: Seconds of audio per 30 s window.
CHUNK_SECONDS = 30.0


@dataclass(frozen=True)
class Prompt:
    """The tokens before the first sampled one, and where things sit in them."""

    tokens: tuple[int, ...]
    #: Index of <|startoftranscript|> (after <|startofprev|> + previous text, if any).
    sot_index: int

    @property
    def sample_begin(self) -> int:
        return len(self.tokens)


def _as_tokens(tokenizer: Any, value: Any) -> list[int]:
    if isinstance(value, str):
        return list(tokenizer.encode(" " + value.strip()))
    return [int(t) for t in value]


def build_prompt(tokenizer: Any, options: DecodingOptions, n_ctx: int, sample_len: int) -> Prompt:
    """[<|startofprev|> + last n_ctx//2 - 1 prompt tokens] + SOT sequence (+ <|notimestamps|>) + prefix."""
    if options.without_timestamps:
        tokens = list(tokenizer.sot_sequence_including_notimestamps)
    else:
        tokens = list(tokenizer.sot_sequence)
    if options.prefix:
        prefix = _as_tokens(tokenizer, options.prefix)
        # openai's slice, quirk included: a room of 0 (the default sample_len) keeps the whole prefix.
        tokens += prefix[-(n_ctx // 2 - sample_len) :]
    sot_index = 0
    if options.prompt:
        previous = _as_tokens(tokenizer, options.prompt)[-(n_ctx // 2 - 1) :]
        tokens = [tokenizer.sot_prev, *previous, *tokens]
        sot_index = 1 + len(previous)
    return Prompt(tuple(tokens), sot_index)


def suppress_token_ids(tokenizer: Any, suppress_tokens: Any) -> list[int]:
    """The ids SuppressTokens masks: the option's list ("-1" = non-speech set) + task/start tokens."""
    if isinstance(suppress_tokens, str):
        wanted = [int(t) for t in suppress_tokens.split(",") if t.strip()]
    else:
        wanted = [int(t) for t in (suppress_tokens or [])]
    if -1 in wanted:
        wanted = [t for t in wanted if t >= 0]
        wanted.extend(tokenizer.non_speech_tokens)
    wanted.extend(
        [
            tokenizer.transcribe,
            tokenizer.translate,
            tokenizer.sot,
            tokenizer.sot_prev,
            tokenizer.sot_lm,
        ]
    )
    if tokenizer.no_speech is not None:
        # Its probability is read separately (no_speech_prob); it is never emitted.
        wanted.append(tokenizer.no_speech)
    return sorted(set(wanted))


def build_filters(
    tokenizer: Any, options: DecodingOptions, sample_begin: int, n_audio_ctx: int
) -> list[LogitFilter]:
    filters: list[LogitFilter] = []
    if options.suppress_blank:
        filters.append(SuppressBlank([*tokenizer.encode(" "), tokenizer.eot], sample_begin))
    if options.suppress_tokens:
        filters.append(SuppressTokens(suppress_token_ids(tokenizer, options.suppress_tokens)))
    if not options.without_timestamps:
        precision = CHUNK_SECONDS / n_audio_ctx  # 0.02 s per timestamp step
        max_initial = None
        if options.max_initial_timestamp:
            max_initial = round(options.max_initial_timestamp / precision)
        filters.append(
            ApplyTimestampRules(
                eot=tokenizer.eot,
                timestamp_begin=tokenizer.timestamp_begin,
                no_timestamps=tokenizer.no_timestamps,
                sample_begin=sample_begin,
                max_initial_timestamp_index=max_initial,
            )
        )
    return filters


def _softmax_at(logits: np.ndarray, index: int) -> float:
    x = logits.astype(np.float64)
    p = np.exp(x - x.max())
    return float(p[index] / p.sum())


@dataclass
class _Language:
    code: str
    probs: dict[str, float] | None = None
    #: The session that already holds <|startoftranscript|>, and that call's logits (1, V).
    session: Any = None
    sot_logits: np.ndarray | None = None


def _language(model: Any, cross: Any, options: DecodingOptions, n_group: int) -> _Language:
    """The window's language: given, "en" on English-only models, or detected at SOT.

    Detection needs <|startoftranscript|> at position 0 with nothing before it.
    Without a previous-text prompt that is how the prompt starts anyway, so the
    detection call is the prompt's first call and the session is kept; with one
    (or for lang_id) it is a call of its own.
    """
    if not model.is_multilingual:
        if options.task == "lang_id":
            raise WruntimeError("This model is English-only and has no language tokens to detect.")
        return _Language("en")
    if options.language is not None and options.task != "lang_id":
        return _Language(options.language)
    sot = model.tokenizer.sot
    if options.task == "lang_id" or options.prompt:
        session, sot_logits = None, model.session(cross, batch=1).prefill([sot])
    else:
        session = model.session(cross, batch=n_group)
        sot_logits = session.prefill([sot])
    code, probs = language_probs(sot_logits[0], model.tokenizer)
    return _Language(options.language or code, probs, session, sot_logits)


def _sample(
    session: Any,
    search: TokenSearch,
    filters: list[LogitFilter],
    prompt: Prompt,
    last_logits: np.ndarray,
    n_group: int,
    sample_len: int,
    n_ctx: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The token loop: filter, choose, feed; one decoder call per step for the whole group."""
    tokens = np.tile(np.asarray(prompt.tokens, dtype=np.int64), (n_group, 1))
    sum_logprobs = np.zeros(n_group, dtype=np.float32)
    logits = np.repeat(last_logits[None].astype(np.float32), n_group, axis=0)
    for i in range(sample_len):
        if i > 0:
            logits = np.array(session.step(tokens[:, -1]), dtype=np.float32)
        for f in filters:
            f.apply(logits, tokens)
        tokens, completed = search.update(tokens, logits, sum_logprobs)
        if completed or tokens.shape[1] > n_ctx:
            break
    return tokens, sum_logprobs


def decode(
    model: Any,
    audio: Any,
    options: DecodingOptions | None = None,
    *,
    rng: np.random.Generator | None = None,
    **overrides: Any,
) -> DecodingResult:
    """Decode one window: a log-mel (n_mels, 3000) or the encoder's `CrossKV` for it.

    ``overrides`` replace fields of ``options`` (``decode(m, mel, beam_size=5)``);
    ``rng`` draws the samples at temperature > 0 (default: seeded by options.seed).
    """
    options = options or DecodingOptions()
    if overrides:
        try:
            options = replace(options, **overrides)
        except TypeError:
            unknown = ", ".join(sorted(set(overrides) - set(DecodingOptions.__dataclass_fields__)))
            raise WruntimeError(f"Unknown decoding option(s): {unknown}.") from None
    options = options.validated()
    cross = audio if hasattr(audio, "cross_k") else model.encode(audio)

    n_ctx = model.dims.n_text_ctx
    sample_len = options.sample_len or n_ctx // 2
    n_group = options.beam_size or options.best_of or 1
    if n_group > MAX_BATCH:
        what = "beam_size" if options.beam_size else "best_of"
        raise WruntimeError(
            f"{what} {n_group} is more than the decoder's batch limit of {MAX_BATCH}."
        )

    lang = _language(model, cross, options, n_group)
    if options.task == "lang_id":
        return DecodingResult(language=lang.code, language_probs=lang.probs)

    tokenizer = model.tokenizer_for(language=lang.code, task=options.task)
    prompt = build_prompt(tokenizer, options, n_ctx, sample_len)
    if lang.session is not None:  # SOT is in the cache already
        session = lang.session
        rest = session.prefill(prompt.tokens[1:])
        prompt_logits = np.concatenate([lang.sot_logits, rest], axis=0)
    else:
        session = model.session(cross, batch=n_group)
        prompt_logits = session.prefill(prompt.tokens)

    no_speech_prob = float("nan")
    if tokenizer.no_speech is not None:
        no_speech_prob = _softmax_at(prompt_logits[prompt.sot_index], tokenizer.no_speech)

    filters = build_filters(tokenizer, options, prompt.sample_begin, model.dims.n_audio_ctx)
    search: TokenSearch
    if options.beam_size is not None:
        search = BeamSearch(options.beam_size, tokenizer.eot, session.rearrange, options.patience)
    else:
        generator = rng if rng is not None else np.random.default_rng(options.seed)
        search = GreedySearch(options.temperature, tokenizer.eot, generator)
    tokens, sum_logprobs = _sample(
        session, search, filters, prompt, prompt_logits[-1], n_group, sample_len, n_ctx
    )

    # Candidates end at their first eot; the ranker picks one (length-normalised log-prob).
    candidates, scores = search.finalize(tokens, sum_logprobs)
    eot = tokenizer.eot
    sampled = [c[prompt.sample_begin : c.index(eot, prompt.sample_begin)] for c in candidates]
    best = rank(sampled, scores, options.length_penalty)
    chosen = sampled[best]
    text = tokenizer.decode(chosen).strip()
    return DecodingResult(
        language=lang.code,
        language_probs=lang.probs,
        tokens=chosen,
        text=text,
        avg_logprob=scores[best] / (len(chosen) + 1),
        sum_logprob=scores[best],
        no_speech_prob=no_speech_prob,
        temperature=options.temperature,
        compression_ratio=compression_ratio(text),
    )
