"""Full-ranking evaluation at catalog scale: time and peak memory of the streamed evaluator.

A dot-product scorer (user vectors x item table, the shape every ID model's score_all has) over a generated
catalog. Prints users/s and peak RSS for a few memory budgets and writes benchmarks/results/eval.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from seqrec.data.dataset import EvalRows
from seqrec.eval.evaluator import EvalSettings, evaluate


class DotScorer:
    max_len = 50

    def __init__(self, n_items: int, dim: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.items = torch.randn(n_items, dim, generator=g)  # (N, D)
        self.proj = torch.randn(n_items, dim, generator=g) * 0.1

    def score_all(self, batch):
        hist = batch["history"].clamp(min=0)
        mask = (batch["history"] >= 0).unsqueeze(-1).float()
        user = (self.proj[hist] * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
        return user @ self.items.T  # (B, N)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=400_000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--budgets-mb", type=float, nargs="+", default=[64, 256])
    parser.add_argument("--out", default="benchmarks/results/eval.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows = EvalRows(np.arange(args.users), [rng.integers(0, args.items, size=rng.integers(3, 50)) for _ in range(args.users)],
                    rng.integers(0, args.items, size=args.users))
    model = DotScorer(args.items, args.dim)
    base = peak_rss_mb()
    results = []
    for budget in args.budgets_mb:
        t = time.perf_counter()
        res = evaluate(model, rows, args.items, EvalSettings(memory_budget_mb=budget))
        secs = time.perf_counter() - t
        results.append({"items": args.items, "users": args.users, "budget_mb": budget, "seconds": round(secs, 2),
                        "users_per_s": round(args.users / secs, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                        "rss_before_mb": round(base, 1), "ndcg@10/pes": res.metrics["ndcg@10/pes"]})
        print(json.dumps(results[-1]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
