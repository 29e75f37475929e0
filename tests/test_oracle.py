"""The numpy oracle agrees with openai-whisper on real weights and real speech.

The fixtures (tests/fixtures/make_oracle_fixture.py) hold what openai-whisper
computed in fp32 on the same canonical weights for jfk.flac. The mel is
recomputed here with wruntime.features, so these tests also cover the whole
audio -> features -> encoder -> decoder chain the other paths are judged by.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from wruntime import oracle
from wruntime.audio import load_audio
from wruntime.build.interface import MASK_NEG
from wruntime.features import log_mel_spectrogram, pad_or_trim
from wruntime.weights.canonical import WhisperWeights

ARCHS = ("tiny.en", "base")
TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
CLIP = TESTS / "data" / "jfk.flac"


@dataclass
class Case:
    weights: WhisperWeights
    ref: dict[str, np.ndarray]
    mel: np.ndarray
    features: np.ndarray
    cross_k: np.ndarray
    cross_v: np.ndarray


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs error relative to the reference's scale (max abs value)."""
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module", params=ARCHS)
def case(request) -> Case:
    weights = request.getfixturevalue(
        "tiny_weights" if request.param == "tiny.en" else "base_weights"
    )
    with np.load(FIXTURES / f"oracle_{request.param}.npz") as f:
        ref = dict(f)
    audio = load_audio(CLIP)
    mel = log_mel_spectrogram(pad_or_trim(audio), n_mels=weights.dims.n_mels)
    features = oracle.encode(weights, mel)
    cross_k, cross_v = oracle.cross_kv(weights, features)
    return Case(weights, ref, mel, features, cross_k, cross_v)


def test_mel_is_the_one_openai_whisper_saw(case: Case) -> None:
    # A precondition, not the subject: if this fails, look at audio/features first.
    assert np.abs(case.mel.mean(axis=1) - case.ref["mel_mean"]).max() < 1e-4


def test_encoder_matches_openai_whisper(case: Case) -> None:
    d = case.weights.dims
    assert case.features.shape == (d.n_audio_ctx, d.n_audio_state)
    assert case.features.dtype == np.float32
    rows = case.features[case.ref["enc_rows_index"]]
    # Measured: 9.5e-7 (tiny.en) / 8.1e-7 (base) of the output's scale; channel means 1.6e-6.
    assert rel_err(rows, case.ref["enc_rows"]) < 2e-5
    assert np.abs(case.features.mean(axis=0) - case.ref["enc_mean"]).max() < 1e-5


def test_cross_kv_layout(case: Case) -> None:
    d = case.weights.dims
    shape = (d.n_text_layer, 1, d.n_text_state, d.n_audio_ctx)
    assert case.cross_k.shape == shape and case.cross_v.shape == shape
    # Layer 2's keys are the raw (unscaled, bias-free) projection, channels first.
    want = case.features @ case.weights["decoder.blocks.2.cross_attn.key.weight"].T
    np.testing.assert_allclose(case.cross_k[2, 0], want.T, rtol=1e-5, atol=1e-5)


def test_first_logits_match_openai_whisper(case: Case) -> None:
    logits = oracle.logits_for_sequence(case.weights, case.ref["prompt"], case.features)
    assert logits.shape == (len(case.ref["prompt"]), case.weights.dims.n_vocab)
    # Measured: 1.9e-6 (tiny.en) / 7.6e-7 (base) of the logits' scale (max abs 3.8e-5).
    assert rel_err(logits[-1], case.ref["logits0"]) < 2e-5


def test_first_greedy_steps_match_openai_whisper(case: Case) -> None:
    ref = case.ref
    steps = len(ref["step_ids"])
    seq = np.concatenate([ref["prompt"], ref["greedy"][: steps - 1]])
    logits = oracle.logits_for_sequence(case.weights, seq, case.features)
    got = logits[len(ref["prompt"]) - 1 :]
    assert got.shape[0] == steps
    for k in range(steps):
        values = got[k][ref["step_ids"][k]]
        # Measured: at most 2.6e-6 of the scale over the five steps.
        assert rel_err(values, ref["step_values"][k]) < 2e-5, f"step {k}"
        assert int(np.argmax(got[k])) == int(ref["step_ids"][k][0]), f"step {k}"


def test_alignment_heads_match_openai_whisper(case: Case) -> None:
    prompt = case.ref["prompt"]
    out = oracle.decode(
        case.weights, prompt[None], np.arange(len(prompt)), None, None, case.cross_k, case.cross_v
    )
    n_heads = len(case.weights.alignment_heads)
    assert out.alignment.shape == (1, n_heads, len(prompt), case.weights.dims.n_audio_ctx)
    np.testing.assert_allclose(out.alignment.sum(axis=-1), 1.0, atol=1e-5)
    # The fixture stores float16; measured max abs difference 2.8e-5 (the weights are small).
    np.testing.assert_allclose(
        out.alignment[0, :, -1], case.ref["alignment0"].astype(np.float32), atol=1e-4
    )


def test_greedy_tokens_match_openai_whisper(case: Case) -> None:
    tokens = oracle.greedy_tokens(
        case.weights, case.mel, case.ref["prompt"], audio_features=case.features
    )
    assert tokens == case.ref["greedy"].tolist()


def test_cache_path_equals_whole_sequence(case: Case) -> None:
    """Prefill then one token per call through an interface-shaped cache, as the runtime does."""
    w, d = case.weights, case.weights.dims
    seq = np.concatenate([case.ref["prompt"], case.ref["greedy"][:12]]).astype(np.int32)
    whole = oracle.decode(w, seq[None], np.arange(len(seq)), None, None, case.cross_k, case.cross_v)

    n = d.n_text_ctx
    k_cache = np.zeros((d.n_text_layer, 1, d.n_text_state, n), np.float32)
    v_cache = np.zeros_like(k_cache)
    # Garbage in the unused slots must be masked out, not merely zero.
    k_cache[..., 40:] = 7.0
    v_cache[..., 40:] = -3.0
    chunks = [np.arange(0, 5), *[np.array([p]) for p in range(5, len(seq))]]
    logits, align = [], []
    for pos in chunks:
        out = oracle.decode(w, seq[pos][None], pos, k_cache, v_cache, case.cross_k, case.cross_v)
        assert out.k_new.shape == (d.n_text_layer, 1, d.n_text_state, len(pos))
        k_cache[..., pos] = out.k_new
        v_cache[..., pos] = out.v_new
        logits.append(out.logits[0])
        align.append(out.alignment[0])
    np.testing.assert_allclose(np.concatenate(logits), whole.logits[0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.concatenate(align, axis=1), whole.alignment[0], atol=1e-6)
    np.testing.assert_allclose(k_cache[..., : len(seq)], whole.k_new, atol=1e-5)
    np.testing.assert_allclose(v_cache[..., : len(seq)], whole.v_new, atol=1e-5)


def test_batch_rows_are_independent(case: Case) -> None:
    """Two beams in one call give each row what it gives alone (cross K/V broadcast over B)."""
    w = case.weights
    prompt = case.ref["prompt"]
    a = np.concatenate([prompt, case.ref["greedy"][:3]])
    b = np.concatenate([prompt, case.ref["greedy"][3:6]])
    pos = np.arange(len(a))
    both = oracle.decode(w, np.stack([a, b]), pos, None, None, case.cross_k, case.cross_v)
    for row, toks in enumerate((a, b)):
        alone = oracle.decode(w, toks[None], pos, None, None, case.cross_k, case.cross_v)
        np.testing.assert_allclose(both.logits[row], alone.logits[0], atol=1e-4)
        np.testing.assert_allclose(both.alignment[row], alone.alignment[0], atol=1e-6)


def test_causal_mask_follows_the_interface() -> None:
    m = oracle.causal_mask(np.array([3, 4]), cache_len=6)
    assert m.shape == (2, 8) and m.dtype == np.float32
    want = np.full((2, 8), MASK_NEG, np.float32)
    want[:, :3] = 0.0  # cache slots of positions 0..2
    want[0, 6] = want[1, 6] = want[1, 7] = 0.0  # the new tokens, causally
    np.testing.assert_array_equal(m, want)
