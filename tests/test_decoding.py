"""Decoding end to end: real packages through the MIL interpreter, against openai-whisper.

tiny.en fp32 (and base fp32 for language identification) is built once into the
test cache and run by the interpreter; openai-whisper's decodings of the same
weights and clips are in tests/fixtures/decoding_reference.json (made by
make_decoding_fixture.py). Token ids must be identical. The decoder call
counting wraps the real executor; it changes nothing it passes on.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from conftest import CLIPS, FIXTURES

from wruntime.decoding import DecodingOptions, decode
from wruntime.decoding.decode import build_filters, build_prompt
from wruntime.errors import WruntimeError

REFERENCE = json.loads((FIXTURES / "decoding_reference.json").read_text())


class CountingExecutor:
    """Passes every call to the real executor and records what each call fed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[tuple[int, ...], int]] = []  # (tokens shape, first position)

    def predict(self, inputs: dict[str, np.ndarray], state: Any = None) -> dict[str, np.ndarray]:
        self.calls.append((inputs["tokens"].shape, int(inputs["positions"][0])))
        return self.inner.predict(inputs, state)

    def make_state(self) -> Any:
        return self.inner.make_state()


def _mel(clip: str, n_mels: int) -> np.ndarray:
    from wruntime.audio import load_audio
    from wruntime.features import log_mel_spectrogram, pad_or_trim

    return log_mel_spectrogram(pad_or_trim(load_audio(CLIPS[clip][0])), n_mels)


class Opened:
    """A model plus each clip's encoder output, computed once per module."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        from wruntime.model import WhisperModel

        self.model = WhisperModel.open(name, executor="interpreter", progress=False, **kwargs)
        self._cross: dict[str, Any] = {}

    def cross(self, clip: str) -> Any:
        if clip not in self._cross:
            self._cross[clip] = self.model.encode(_mel(clip, self.model.dims.n_mels))
        return self._cross[clip]


@pytest.fixture(scope="module")
def tiny(test_home) -> Opened:
    # stateful=True loads the stateful decoder too; each test chooses which one runs.
    opened = Opened("tiny.en-fp32", stateful=True)
    model = opened.model
    model.prefer_stateful = False
    model.decoder = CountingExecutor(model.decoder)
    for batch in (1, 5):
        model._stateful[batch] = CountingExecutor(model.stateful_decoder(batch))
    return opened


@pytest.fixture(scope="module")
def base(test_home) -> Opened:
    opened = Opened("base-fp32")
    opened.model.decoder = CountingExecutor(opened.model.decoder)
    return opened


def _check(result, ref) -> None:
    assert result.tokens == ref["tokens"]
    assert result.text == ref["text"]
    assert result.language == ref["language"]
    assert abs(result.avg_logprob - ref["avg_logprob"]) < 1e-3
    assert abs(result.no_speech_prob - ref["no_speech_prob"]) < 1e-4


def _check_calls(calls, result, options: DecodingOptions, prompt_len: int) -> None:
    """One prefill call for the shared prompt, then one call per token for every row at once."""
    (prefill_shape, prefill_pos), *steps = calls
    assert prefill_shape == (1, prompt_len) and prefill_pos == 0
    rows = options.beam_size or options.best_of or 1
    assert all(shape == (rows, 1) for shape, _ in steps)
    assert [pos for _, pos in steps] == list(range(prompt_len, prompt_len + len(steps)))
    if rows == 1:
        assert len(steps) == len(result.tokens)  # the end token needs no call after it
    else:
        assert len(result.tokens) <= len(steps) <= 224


# ------------------------------------------------------------ against openai-whisper

# experience is in the fixture too; jfk and belly cover every setting at half the encoder time.
TINY_CASES = [
    (clip, setting)
    for clip, settings in REFERENCE["tiny.en"].items()
    if clip != "experience"
    for setting in settings
]


@pytest.mark.slow
@pytest.mark.parametrize(("clip", "setting"), TINY_CASES, ids=[f"{c}-{s}" for c, s in TINY_CASES])
def test_tiny_en_matches_openai_whisper(tiny, clip, setting):
    ref = REFERENCE["tiny.en"][clip][setting]
    options = DecodingOptions(**ref["options"])
    tiny.model.decoder.calls.clear()
    result = decode(tiny.model, tiny.cross(clip), options)
    _check(result, ref)
    assert result.temperature == 0.0
    assert result.sum_logprob == pytest.approx(result.avg_logprob * (len(result.tokens) + 1))
    prompt = build_prompt(tiny.model.tokenizer, options, 448, options.sample_len or 224)
    _check_calls(tiny.model.decoder.calls, result, options, prompt.sample_begin)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["greedy", "beam5"])
def test_stateful_session_gives_the_same_tokens(tiny, setting):
    model = tiny.model
    ref = REFERENCE["tiny.en"]["belly"][setting]
    options = DecodingOptions(**ref["options"])
    stateful = model.stateful_decoder(options.beam_size or 1)
    stateful.calls.clear()
    model.decoder.calls.clear()
    model.prefer_stateful = True
    try:
        result = decode(model, tiny.cross("belly"), options)
    finally:
        model.prefer_stateful = False
    assert stateful.calls and not model.decoder.calls  # the stateful decoder did all the work
    assert result.tokens == ref["tokens"]
    # the stateful prefill runs every row (its batch is fixed), still in one call
    assert stateful.calls[0] == ((options.beam_size or 1, 1), 0)
    assert len(stateful.calls) == 1 + len([c for c in stateful.calls[1:] if c[0][1] == 1])


def test_filters_on_real_first_step_logits(tiny):
    """jfk's first step: after the filters only <|0.00|>..<|1.00|> remain; argmax is openai's."""
    model = tiny.model
    tok = model.tokenizer
    prompt = build_prompt(tok, DecodingOptions(), 448, 224)
    logits = np.array(model.session(tiny.cross("jfk")).prefill(prompt.tokens)[-1:])
    for f in build_filters(tok, DecodingOptions(), prompt.sample_begin, 1500):
        f.apply(logits, np.asarray([prompt.tokens]))
    allowed = set(np.flatnonzero(np.isfinite(logits[0])).tolist())
    assert allowed == set(range(tok.timestamp_begin, tok.timestamp_begin + 51))
    assert int(np.argmax(logits)) == REFERENCE["tiny.en"]["jfk"]["greedy"]["tokens"][0]


# ------------------------------------------------------------ the session itself


def test_prefill_in_one_call_equals_feeding_token_by_token(tiny):
    model = tiny.model
    tok = model.tokenizer
    prompt = build_prompt(tok, DecodingOptions(prompt="ask not what your country"), 448, 224)
    one = model.session(tiny.cross("jfk"), stateful=False)
    together = one.prefill(prompt.tokens)
    assert one.alignment is not None
    assert one.alignment.shape == (1, len(model.alignment_heads), len(prompt.tokens), 1500)
    np.testing.assert_allclose(one.alignment.sum(axis=-1), 1.0, atol=1e-4)
    each = model.session(tiny.cross("jfk"), stateful=False)
    rows = [each.forward(np.asarray([[t]]))[0, 0] for t in prompt.tokens]
    np.testing.assert_allclose(np.stack(rows), together, atol=2e-3)
    assert each.position == one.position == len(prompt.tokens)


def test_rearrange_makes_beams_continue_their_source_rows(tiny):
    model = tiny.model
    tok = model.tokenizer
    s = model.session(tiny.cross("jfk"), batch=3, stateful=False)
    s.prefill(tok.sot_sequence)
    words = [tok.encode(w)[0] for w in (" And", " So", " Ask")]
    first = s.step(np.asarray(words))
    assert not np.allclose(first[0], first[1], atol=1e-3)
    s.rearrange([2, 2, 0])
    again = s.step(np.asarray([words[0]] * 3))
    np.testing.assert_array_equal(again[0], again[1])  # both continue row 2 (" Ask")
    fresh = model.session(tiny.cross("jfk"), batch=1, stateful=False)
    fresh.prefill(tok.sot_sequence)
    fresh.step(np.asarray([words[0]]))
    np.testing.assert_allclose(again[2], fresh.step(np.asarray([words[0]]))[0], atol=1e-3)


def test_beams_keep_their_own_history_through_shuffles_and_copies(tiny):
    # Beams live in cache rows that need not be their index (rearrange moves as
    # little as it can): after swaps, a cycle and duplicated sources, every beam's
    # logits must still be those of its own token history fed alone.
    model = tiny.model
    tok = model.tokenizer
    words = [tok.encode(w)[0] for w in (" And", " So", " Ask", " not", " what", " your")]
    s = model.session(tiny.cross("jfk"), batch=4, stateful=False)
    s.prefill(tok.sot_sequence)
    histories = [[] for _ in range(4)]
    orders = [[0, 1, 2, 3], [1, 2, 3, 0], [2, 2, 0, 1], [3, 1, 1, 1], [1, 0, 3, 2]]
    for step, order in enumerate(orders):
        fed = [words[(step + i) % len(words)] for i in range(4)]
        logits = s.step(np.asarray(fed))
        histories = [[*h, t] for h, t in zip(histories, fed, strict=True)]
        for beam in range(4):
            alone = model.session(tiny.cross("jfk"), batch=1, stateful=False)
            alone.prefill([*tok.sot_sequence, *histories[beam][:-1]])
            want = alone.step(np.asarray(histories[beam][-1:]))[0]
            np.testing.assert_allclose(logits[beam], want, atol=1e-3, err_msg=f"step {step}")
        s.rearrange(order)
        histories = [list(histories[r]) for r in order]


def test_vocabulary_chunked_logits_are_joined(tiny):
    """A decoder built for the Neural Engine names its logits logits_0, logits_1, ..."""
    from wruntime.build.decoder import vocab_chunks

    class ChunkedLogits:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def predict(self, inputs, state=None):
            out = dict(self.inner.predict(inputs, state))
            logits = out.pop("logits")
            for i, (offset, rows) in enumerate(vocab_chunks(logits.shape[-1])):
                out[f"logits_{i}"] = logits[..., offset : offset + rows]
            return out

    model = tiny.model
    ref = REFERENCE["tiny.en"]["belly"]["greedy"]
    model.decoder = ChunkedLogits(model.decoder)
    try:
        result = decode(model, tiny.cross("belly"), DecodingOptions(**ref["options"]))
    finally:
        model.decoder = model.decoder.inner
    assert len(vocab_chunks(model.dims.n_vocab)) > 1
    assert result.tokens == ref["tokens"]


def test_sampling_with_best_of_is_seeded(tiny):
    options = DecodingOptions(temperature=0.6, best_of=3, seed=7, without_timestamps=True)
    a = decode(tiny.model, tiny.cross("belly"), options)
    b = decode(tiny.model, tiny.cross("belly"), options)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.temperature == 0.6 and a.tokens and np.isfinite(a.avg_logprob)
    assert tiny.model.tokenizer.eot not in a.tokens


def test_more_beams_than_the_decoder_batch_is_a_one_line_error(tiny):
    with pytest.raises(WruntimeError, match="batch limit of 8"):
        decode(tiny.model, tiny.cross("belly"), beam_size=9)


def test_english_only_model_has_no_language_to_detect(tiny):
    with pytest.raises(WruntimeError):
        decode(tiny.model, tiny.cross("belly"), DecodingOptions(task="lang_id"))
    assert decode(tiny.model, tiny.cross("belly"), sample_len=3).language == "en"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beam_size": 5, "best_of": 2},
        {"best_of": 2},
        {"patience": 2.0},
        {"length_penalty": 1.5},
        {"task": "summarize"},
        {"beam_size": 0},
        {"temperature": -1.0},
    ],
)
def test_bad_options_are_one_line_errors(kwargs):
    with pytest.raises(WruntimeError) as e:
        DecodingOptions(**kwargs).validated()
    assert "\n" not in str(e.value) and str(e.value).endswith(".")


# ------------------------------------------------------------ multilingual


@pytest.mark.slow
def test_base_detects_english_and_decodes_like_openai(base):
    model = base.model
    code, probs = model.detect_language(base.cross("jfk"))
    ref = REFERENCE["base"]["jfk"]
    assert code == "en"
    for lang, p in ref["greedy_detect"]["language_probs_top"].items():
        assert probs[lang] == pytest.approx(p, abs=1e-3)
    assert sum(probs.values()) == pytest.approx(1.0)
    for setting in ("greedy_detect", "beam5_detect_notimestamps"):
        model.decoder.calls.clear()
        result = decode(model, base.cross("jfk"), DecodingOptions(**ref[setting]["options"]))
        _check(result, ref[setting])
        assert result.language_probs is not None and result.language_probs["en"] > 0.9
        # detection is the prompt's first call: <|startoftranscript|>, then the rest at once
        assert [c[0][1] for c in model.decoder.calls[:2]] == [
            1,
            2 if "notimestamps" not in setting else 3,
        ]
