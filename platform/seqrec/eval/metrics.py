"""Ranks with optimistic and pessimistic tie handling, and the metrics computed from them.

For a target with score s_t among scores s_1..s_N (full ranking over all items):
    optimistic rank  = 1 + #{j : s_j >  s_t}   (ties broken in the target's favour)
    pessimistic rank =     #{j : s_j >= s_t}   (ties broken against it; counts the target itself)
A model that scores every item equally gets rank 1 optimistically and rank N pessimistically, which is why
both are reported: a gap between them means the model's scores are not decisive.

NDCG@K = 1/log2(rank + 1) if rank <= K else 0 (one relevant item, so IDCG = 1)
Recall@K (= HitRate@K with one target) = 1[rank <= K]
MRR = 1/rank, untruncated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

TIE_MODES = ("opt", "pes")


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(optimistic, pessimistic) 1-based ranks of targets, each (B,) int64. scores: (B, N)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, n_items), got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; the model produced invalid output")
    target_scores = scores.gather(1, targets.long().view(-1, 1))  # (B, 1)
    higher = (scores > target_scores).sum(dim=1)
    higher_or_equal = (scores >= target_scores).sum(dim=1)
    return higher + 1, higher_or_equal


@dataclass
class RankingMetrics:
    """Accumulates rank-based metrics over streamed chunks, for both tie modes."""

    ndcg_ks: tuple[int, ...] = (10,)
    recall_ks: tuple[int, ...] = (1, 10)
    count: int = 0
    _sums: dict[str, float] = field(default_factory=dict)

    def update(self, opt_ranks: torch.Tensor | np.ndarray, pes_ranks: torch.Tensor | np.ndarray) -> None:
        for mode, ranks in (("opt", opt_ranks), ("pes", pes_ranks)):
            r = torch.as_tensor(ranks).to(torch.float64)
            for name, values in self.per_row(r).items():
                key = f"{name}/{mode}"
                self._sums[key] = self._sums.get(key, 0.0) + float(values.sum())
        self.count += int(torch.as_tensor(opt_ranks).numel())

    def per_row(self, ranks: torch.Tensor) -> dict[str, torch.Tensor]:
        r = ranks.to(torch.float64)
        out = {}
        for k in self.ndcg_ks:
            out[f"ndcg@{k}"] = torch.where(r <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))
        for k in self.recall_ks:
            out[f"recall@{k}"] = (r <= k).to(torch.float64)
        out["mrr"] = 1.0 / r
        return out

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no rows were evaluated")
        return {key: value / self.count for key, value in sorted(self._sums.items())}


def ranking_metrics(opt_ranks, pes_ranks, ndcg_ks=(10,), recall_ks=(1, 10)) -> dict[str, float]:
    acc = RankingMetrics(ndcg_ks=tuple(ndcg_ks), recall_ks=tuple(recall_ks))
    acc.update(opt_ranks, pes_ranks)
    return acc.compute()
