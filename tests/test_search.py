"""Token search: greedy, sampling, beam search and the final ranking.

Beam search is compared step by step with openai-whisper's BeamSearchDecoder run
on the same logits (tests/fixtures/beam_search_reference.json, made by
make_decoding_fixture.py): same beams, same cache reordering, same finished
sequences in the same order, same candidates. The rest are unit tests of our
own code on crafted logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES

from wruntime.decoding.search import BeamSearch, GreedySearch, log_softmax, rank, top_k

EOT = 0


def test_log_softmax_matches_definition():
    x = np.array([[1.0, 2.0, -np.inf, 0.5]], np.float32)
    expected = x - np.log(np.exp(x.astype(np.float64)).sum())
    got = log_softmax(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[0, [0, 1, 3]], expected[0, [0, 1, 3]], rtol=1e-6)
    assert got[0, 2] == -np.inf


@pytest.mark.parametrize("k", [1, 6])
def test_top_k_is_a_stable_descending_sort_even_on_rows_of_minus_inf(k):
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 3, (6, 40)).astype(np.float32)  # many equal values
    x[rng.random(x.shape) < 0.5] = -np.inf
    x[4, :] = -np.inf  # nothing finite
    x[5, :] = -np.inf
    x[5, [7, 30]] = [1.0, 2.0]  # fewer finite values than k
    want = np.argsort(-x, axis=-1, kind="stable")[:, :k]
    assert top_k(x, k).tolist() == want.tolist()


# ------------------------------------------------------------ beam search vs openai


@pytest.mark.parametrize("index", range(6))
def test_beam_search_matches_openai_step_by_step(index):
    case = json.loads((FIXTURES / "beam_search_reference.json").read_text())["cases"][index]
    beam = case["beam_size"]
    reorders: list[list[int]] = []
    search = BeamSearch(beam, case["eot"], reorders.append, case["patience"])
    tokens = np.tile(np.asarray(case["prompt"], np.int64), (beam, 1))
    sums = np.zeros(beam, np.float32)
    for step, (logits, want) in enumerate(zip(case["logits"], case["steps"], strict=True)):
        tokens, completed = search.update(tokens, np.asarray(logits, np.float32), sums)
        assert tokens.tolist() == want["tokens"], f"step {step}"
        assert reorders[-1] == want["source_indices"], f"step {step}"
        np.testing.assert_allclose(sums, want["sum_logprobs"], rtol=1e-6, atol=1e-6)
        assert [list(k) for k in search.finished] == [f[0] for f in want["finished"]]
        assert completed == want["completed"]
    candidates, scores = search.finalize(tokens, sums)
    assert candidates == case["candidates"]
    np.testing.assert_allclose(scores, case["candidate_sums"], rtol=1e-6, atol=1e-6)
    if case["best"] is not None:
        n = len(case["prompt"])
        sampled = [c[n : c.index(EOT, n)] for c in candidates]
        assert rank(sampled, scores, case["length_penalty"]) == case["best"]


def test_beam_search_first_step_from_identical_beams_keeps_distinct_sequences():
    # Every beam starts as the same prompt: the candidates collapse to one set, so the
    # new beams are the beam_size best distinct continuations (not one repeated).
    logits = np.log(np.array([[0.05, 0.4, 0.3, 0.15, 0.1]] * 3, np.float32))
    search = BeamSearch(3, EOT, lambda rows: None)
    tokens, done = search.update(np.full((3, 1), 9), logits, np.zeros(3, np.float32))
    assert tokens[:, -1].tolist() == [1, 2, 3]
    assert not done


def test_beam_search_sets_aside_finished_and_stops_at_patience():
    reorders = []
    search = BeamSearch(2, EOT, reorders.append, patience=1.0)
    tokens = np.array([[9], [9]])
    sums = np.zeros(2, np.float32)
    # eot is the best continuation: it finishes, the next two best become the beams
    logits = np.log(np.array([[0.5, 0.3, 0.2, 1e-6]] * 2, np.float32))
    tokens, done = search.update(tokens, logits, sums)
    assert list(search.finished) == [(9, EOT)] and not done
    assert tokens[:, -1].tolist() == [1, 2]
    # beam 1 (token 2) now has the best eot: the second finished sequence completes the search
    logits = np.log(np.array([[0.1, 0.8, 0.05, 0.05], [0.9, 0.04, 0.03, 0.03]], np.float32))
    tokens, done = search.update(tokens, logits, sums)
    assert done and (9, 2, EOT) in search.finished
    assert reorders[-1] == [0, 0]  # both surviving beams continue beam 0 (9, 1)


def test_beam_search_finalize_fills_with_unfinished_beams():
    search = BeamSearch(3, EOT, lambda rows: None)
    tokens = np.array([[9, 1], [9, 2], [9, 3]])
    sums = np.array([-1.0, -0.5, -2.0], np.float32)
    candidates, scores = search.finalize(tokens, sums)
    assert candidates == [[9, 2, EOT], [9, 1, EOT], [9, 3, EOT]]
    assert scores == [-0.5, -1.0, -2.0]


def test_patience_sets_how_many_must_finish():
    assert BeamSearch(5, EOT, print, patience=2.0).max_candidates == 10
    assert BeamSearch(5, EOT, print, patience=0.5).max_candidates == 2  # round half to even
    with pytest.raises(ValueError):
        BeamSearch(1, EOT, print, patience=0.1)


# ------------------------------------------------------------ greedy and sampling


def test_greedy_takes_the_argmax_and_accumulates_logprobs():
    logits = np.log(np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]], np.float32))
    search = GreedySearch(0.0, EOT)
    sums = np.zeros(2, np.float32)
    tokens, done = search.update(np.array([[5], [5]]), logits, sums)
    assert tokens[:, -1].tolist() == [1, EOT] and not done
    np.testing.assert_allclose(sums, np.log([0.7, 0.6]), rtol=1e-6)
    # a finished row stays finished and its score no longer moves
    tokens, done = search.update(tokens, logits[::-1].copy(), sums)
    assert tokens[:, -1].tolist() == [EOT, EOT] and done
    np.testing.assert_allclose(sums, np.log([0.7 * 0.6, 0.6]), rtol=1e-6)
    candidates, scores = search.finalize(tokens, sums)
    assert candidates == [[5, 1, EOT, EOT], [5, EOT, EOT, EOT]]
    assert scores == [float(sums[0]), float(sums[1])]


def test_sampling_is_seeded_and_follows_softmax_over_temperature():
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4, 1.0]], np.float32))
    logits[0, 4] = -np.inf  # a filtered token is never drawn
    draws = 20000
    t = 0.7

    def sample(seed: int) -> np.ndarray:
        search = GreedySearch(t, EOT, np.random.default_rng(seed))
        tokens = np.full((draws, 1), 9)
        out, _ = search.update(
            tokens, np.repeat(logits, draws, axis=0), np.zeros(draws, np.float32)
        )
        return out[:, -1]

    a, b = sample(1), sample(1)
    assert (a == b).all()  # the same seed, the same samples
    assert not (a == sample(2)).all()
    freq = np.bincount(a, minlength=5) / draws
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.0]) ** (1 / t)
    p /= p.sum()
    np.testing.assert_allclose(freq, p, atol=0.015)
    assert freq[4] == 0


# ------------------------------------------------------------ ranking


def test_rank_by_length_normalized_logprob():
    candidates = [[1, 2], [1, 2, 3, 4]]
    # -1.0 / 2 = -0.5 against -1.8 / 4 = -0.45: the longer one is better per token
    assert rank(candidates, [-1.0, -1.8], None) == 1
    assert rank(candidates, [-1.0, -2.2], None) == 0


def test_rank_with_google_nmt_length_penalty():
    candidates = [[1], [1, 2, 3, 4, 5, 6, 7]]
    sums = [-1.0, -1.5]
    # alpha 0: no normalisation at all, the shorter one wins on raw log-probability
    assert rank(candidates, sums, 0.0) == 0
    # alpha 1: ((5+1)/6)=1 vs ((5+7)/6)=2 -> -1.0 vs -0.75, the longer one wins
    assert rank(candidates, sums, 1.0) == 1


def test_rank_survives_an_empty_candidate():
    assert rank([[], [1]], [-0.1, -5.0], None) == 0
