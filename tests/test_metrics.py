"""Every metric and both tie modes against hand-computed values."""
import math

import numpy as np
import pytest
import torch

from seqrec.eval.metrics import RankingMetrics, ranking_metrics, target_ranks


def test_ranks_strict_order():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    opt, pes = target_ranks(scores, torch.tensor([2]))  # 0.9 > 0.5 -> rank 2 both ways
    assert opt.tolist() == [2] and pes.tolist() == [2]


def test_ranks_with_ties():
    # target score 0.5 shares its value with two others; one item scores higher
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1]])
    opt, pes = target_ranks(scores, torch.tensor([2]))
    assert opt.tolist() == [2]  # 1 + one strictly higher
    assert pes.tolist() == [4]  # 0.9, 0.5, 0.5, 0.5 (itself)


def test_all_tied_scores():
    n = 1000
    scores = torch.zeros(3, n)
    opt, pes = target_ranks(scores, torch.tensor([0, 5, 999]))
    assert opt.tolist() == [1, 1, 1]
    assert pes.tolist() == [n, n, n]
    m = ranking_metrics(opt, pes)
    assert m["ndcg@10/opt"] == pytest.approx(1.0)
    assert m["recall@1/opt"] == pytest.approx(1.0)
    assert m["ndcg@10/pes"] == 0.0
    assert m["recall@10/pes"] == 0.0
    assert m["mrr/pes"] == pytest.approx(1 / n)


def test_metric_values_by_hand():
    opt = np.array([1, 3, 10, 11, 50])
    pes = np.array([2, 3, 12, 11, 100])
    m = ranking_metrics(opt, pes, ndcg_ks=(10,), recall_ks=(1, 10))
    ndcg_opt = (1 / math.log2(2) + 1 / math.log2(4) + 1 / math.log2(11)) / 5
    ndcg_pes = (1 / math.log2(3) + 1 / math.log2(4)) / 5
    assert m["ndcg@10/opt"] == pytest.approx(ndcg_opt)
    assert m["ndcg@10/pes"] == pytest.approx(ndcg_pes)
    assert m["recall@1/opt"] == pytest.approx(1 / 5)
    assert m["recall@1/pes"] == pytest.approx(0.0)
    assert m["recall@10/opt"] == pytest.approx(3 / 5)
    assert m["recall@10/pes"] == pytest.approx(2 / 5)
    assert m["mrr/opt"] == pytest.approx((1 + 1 / 3 + 1 / 10 + 1 / 11 + 1 / 50) / 5)
    assert m["mrr/pes"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 12 + 1 / 11 + 1 / 100) / 5)


def test_streaming_accumulation_equals_one_shot():
    rng = np.random.default_rng(0)
    opt = rng.integers(1, 200, size=101)
    pes = opt + rng.integers(0, 5, size=101)
    acc = RankingMetrics()
    for lo in range(0, 101, 17):
        acc.update(opt[lo : lo + 17], pes[lo : lo + 17])
    assert acc.compute() == pytest.approx(ranking_metrics(opt, pes))


def test_nan_scores_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(torch.tensor([[0.1, float("nan")]]), torch.tensor([0]))


def test_empty_accumulator_raises():
    with pytest.raises(ValueError):
        RankingMetrics().compute()
