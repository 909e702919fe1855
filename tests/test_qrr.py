"""Quasi-round-robin (CALRec Algorithm 1) on hand-made corpora with known orders."""
from __future__ import annotations

import math

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from seqrec.retrieval.bm25 import BM25Index, tokenize
from seqrec.retrieval.qrr import qrr_batch, quasi_round_robin, select_samples

EPS = 1.0 / 5000.0
# 5 docs: 'alpha' is in docs 0 and 3 (df 2 of 5 -> positive idf), 'gamma' only in doc 2, 'delta' only in 4
CORPUS = ["alpha", "beta", "gamma", "alpha beta", "delta"]


@pytest.fixture(scope="module")
def index():
    return BM25Index(CORPUS)


def naive_qrr(samples, logprobs, corpus, n_preds=10, epsilon=EPS):
    """Straight transcription of Algorithm 1 on rank_bm25 scores."""
    ref = BM25Okapi([tokenize(t) for t in corpus])
    best = {}
    for pos, (s, lp) in enumerate(zip(samples, logprobs)):
        key = tuple(tokenize(s))
        if key not in best or lp > best[key][0]:
            best[key] = (lp, best.get(key, (None, pos))[1])
    kept = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:n_preds]
    out = np.zeros(len(corpus))
    for key, (lp, _) in kept:
        s = ref.get_scores(list(key))
        if s.max() > s.min():
            out = np.maximum(out, (s - s.min()) / (s.max() - s.min()) * math.exp(epsilon * lp))
    return out


def order(scores):
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def test_known_order_and_best_sample_top1_first(index):
    scores = quasi_round_robin(["alpha", "gamma"], [-1.0, -3.0], index)
    # doc0: alpha's top-1 (scaled 1) * exp(-1*eps); doc2: gamma's top-1 * exp(-3*eps); doc3: alpha's 2nd (<1)
    assert order(scores)[:3] == [0, 2, 3]
    assert scores[0] == math.exp(-1.0 * EPS)  # exactly: scaled value 1.0 times the largest multiplier
    assert scores[2] == math.exp(-3.0 * EPS)
    assert 0 < scores[3] < scores[2]
    assert scores[1] == scores[4] == 0.0  # unmatched tail ties
    # swapping the sample likelihoods swaps which top-1 leads
    swapped = quasi_round_robin(["alpha", "gamma"], [-3.0, -1.0], index)
    assert order(swapped)[:3] == [2, 0, 3]
    np.testing.assert_allclose(scores, naive_qrr(["alpha", "gamma"], [-1.0, -3.0], CORPUS), atol=1e-8)


def test_top1_of_best_sample_beats_stronger_bm25_matches():
    """The best sample matches weakly (one shared token in a long doc); a worse sample matches strongly."""
    corpus = [
        "red apple fruit fresh",
        "green apple fruit",
        "blue car vehicle with many extra words in the title here",
        "red car vehicle",
        "fast red car vehicle sport",
        "yellow banana fruit",
        "green tea",
        "black coffee",
        "white paper",
        "brown box",
    ]
    index = BM25Index(corpus)
    samples = ["blue", "red car vehicle red car", "apple fruit"]
    logprobs = [-0.5, -0.6, -0.7]
    raw = index.score_batch(samples)
    assert raw[1].max() > raw[0].max()  # the second sample's raw BM25 is stronger
    scores = quasi_round_robin(samples, logprobs, index)
    assert order(scores)[0] == int(np.argmax(raw[0])) == 2
    assert scores[2] == math.exp(-0.5 * EPS)
    np.testing.assert_allclose(scores, naive_qrr(samples, logprobs, corpus), atol=1e-8)


def test_dedup_keeps_max_logprob_and_frees_slots(index):
    dup = quasi_round_robin(["alpha", "gamma", "alpha", "ALPHA!"], [-5.0, -3.0, -1.0, -2.0], index)
    single = quasi_round_robin(["alpha", "gamma"], [-1.0, -3.0], index)
    np.testing.assert_array_equal(dup, single)
    texts, lps = select_samples(["alpha", "gamma", "alpha", "ALPHA!"], [-5.0, -3.0, -1.0, -2.0])
    assert texts == ["alpha", "gamma"] and lps.tolist() == [-1.0, -3.0]
    # copies do not use up n_preds: gamma is still among the top 2 distinct samples
    capped = quasi_round_robin(["alpha", "alpha", "alpha", "gamma"], [-1.0, -1.5, -2.0, -3.0], index, n_preds=2)
    assert capped[2] > 0


def test_n_preds_cutoff(index):
    samples, logprobs = ["alpha", "gamma", "delta"], [-1.0, -2.0, -3.0]
    two = quasi_round_robin(samples, logprobs, index, n_preds=2)
    three = quasi_round_robin(samples, logprobs, index, n_preds=3)
    assert two[4] == 0.0 and three[4] > 0.0  # 'delta' (least likely) is cut at n_preds=2
    np.testing.assert_array_equal(two[[0, 2, 3]], three[[0, 2, 3]])
    # order of the inputs does not matter, only the logprobs
    shuffled = quasi_round_robin(samples[::-1], logprobs[::-1], index, n_preds=2)
    np.testing.assert_array_equal(shuffled, two)
    np.testing.assert_allclose(two, naive_qrr(samples, logprobs, CORPUS, n_preds=2), atol=1e-8)


def test_constant_rows_contribute_nothing(index):
    base = quasi_round_robin(["gamma"], [-2.0], index)
    # the most likely sample has no known token: its BM25 row is constant (zeros) -> scaled to zeros
    with_constant = quasi_round_robin(["zzz unknown", "gamma"], [0.0, -2.0], index)
    np.testing.assert_array_equal(with_constant, base)
    assert not quasi_round_robin(["zzz", ""], [0.0, -1.0], index).any()
    assert not quasi_round_robin([], [], index).any()
    # a term in every doc of equal length gives a constant positive row: also zeros
    flat = BM25Index(["common a", "common b", "common c"])
    assert not quasi_round_robin(["common"], [0.0], flat).any()


def test_qrr_batch_matches_per_user(index):
    users = [["alpha", "gamma"], [], ["delta", "beta", "alpha beta"], ["zzz"]]
    lps = [[-1.0, -3.0], [], [-0.1, -0.2, -0.3], [-1.0]]
    batch = qrr_batch(users, lps, index, n_preds=2)
    assert batch.shape == (4, len(CORPUS)) and batch.dtype == np.float64
    for u in range(4):
        np.testing.assert_array_equal(batch[u], quasi_round_robin(users[u], lps[u], index, n_preds=2))
    assert qrr_batch(users, lps, index, dtype=np.float32).dtype == np.float32


def test_invalid_inputs(index):
    with pytest.raises(ValueError):
        quasi_round_robin(["alpha"], [float("nan")], index)
    with pytest.raises(ValueError):
        quasi_round_robin(["alpha", "beta"], [-1.0], index)


def test_row_maximum_maps_exactly_to_multiplier(index, monkeypatch):
    from seqrec.retrieval import qrr

    rng = np.random.default_rng(0)
    for span, mult in zip(rng.random(200) * 100 + 1e-3, np.exp(-rng.random(200) * 0.01)):
        s = qrr._unit_scale(float(span), float(mult))
        assert s is None or float(span) * s == float(mult)
    samples, logprobs = ["alpha", "gamma", "alpha beta"], [-1.0, -2.0, -3.0]
    fast = quasi_round_robin(samples, logprobs, index)
    monkeypatch.setattr(qrr, "_unit_scale", lambda span, mult: None)  # the divide-then-multiply path
    slow = quasi_round_robin(samples, logprobs, index)
    np.testing.assert_allclose(fast, slow, rtol=1e-15, atol=0)
    assert fast.max() == slow.max() == math.exp(-1.0 * EPS)


def test_empty_catalog():
    empty = BM25Index([])
    assert quasi_round_robin(["alpha"], [-1.0], empty).shape == (0,)
    assert qrr_batch([["alpha"]], [[-1.0]], empty).shape == (1, 0)
