"""The single evaluation loop. Every model, the CLI, training-time validation and serving checks use it.

It streams users in chunks sized so that one (chunk, n_items) float32 score matrix fits `memory_budget_mb`,
so a 400k-item catalog evaluates in fixed memory. Ranking is always over the full catalog (no sampling).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from seqrec.console import progress
from seqrec.data.batching import make_batch
from seqrec.data.dataset import EvalRows
from seqrec.eval.metrics import RankingMetrics, target_ranks

log = logging.getLogger(__name__)


class Scorer(Protocol):
    """What evaluation needs from a model: scores for every item, (B, n_items), higher is better."""

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


@dataclass
class EvalSettings:
    ndcg_ks: tuple[int, ...] = (10,)
    recall_ks: tuple[int, ...] = (1, 10)
    memory_budget_mb: float = 256.0  # for one chunk's float32 score matrix (float64 scorers use twice that)
    max_batch_size: int = 1024
    max_len: int | None = None  # history truncation passed to the batch builder (None: model decides)
    mask_history: bool = False  # repeats are legitimate in these datasets, so off by default


@dataclass
class EvalResult:
    metrics: dict[str, float]
    n_rows: int
    seconds: float
    opt_ranks: np.ndarray
    pes_ranks: np.ndarray

    def as_dict(self) -> dict:
        return {"metrics": self.metrics, "n_rows": self.n_rows, "seconds": round(self.seconds, 3)}


def chunk_size_for(n_items: int, settings: EvalSettings) -> int:
    by_memory = int(settings.memory_budget_mb * 2**20 // (4 * max(n_items, 1)))
    return max(1, min(settings.max_batch_size, by_memory))


def mask_history_scores(scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Set history items to -inf, except each row's own target (a repeat purchase stays rankable)."""
    history = batch["history"]
    rows = torch.arange(history.shape[0])[:, None].expand_as(history)
    valid = history >= 0
    scores = scores.clone()
    target = batch.get("target")
    kept = scores.gather(1, target[:, None]).clone() if target is not None else None
    scores[rows[valid], history[valid]] = float("-inf")
    if target is not None:
        scores.scatter_(1, target[:, None], kept)
    return scores


@torch.no_grad()
def evaluate(
    model: Scorer,
    rows: EvalRows,
    n_items: int,
    settings: EvalSettings | None = None,
    device: str | torch.device = "cpu",
) -> EvalResult:
    """Full-ranking metrics of `model` on `rows`, optimistic and pessimistic."""
    settings = settings or EvalSettings()
    if len(rows) == 0:
        raise ValueError("no evaluation rows")
    if isinstance(model, torch.nn.Module):
        model.eval()
    max_len = settings.max_len if settings.max_len is not None else getattr(model, "max_len", None)
    chunk = chunk_size_for(n_items, settings)
    acc = RankingMetrics(ndcg_ks=settings.ndcg_ks, recall_ks=settings.recall_ks)
    opt_all, pes_all = [], []
    start = time.perf_counter()
    bar = progress(total=len(rows), desc="evaluating", unit="user")  # drawn only on the driver, after 1 s
    for lo in range(0, len(rows), chunk):
        part = rows.subset(slice(lo, lo + chunk))
        batch = make_batch(part.histories, part.targets, part.user_idx, max_len=max_len)
        batch = {k: v.to(device) for k, v in batch.items()}
        scores = model.score_all(batch)
        if scores.dtype not in (torch.float32, torch.float64):
            scores = scores.float()  # half precision would create ties the model did not mean
        if scores.shape != (len(part), n_items):
            raise ValueError(f"score_all returned {tuple(scores.shape)}, expected ({len(part)}, {n_items})")
        if settings.mask_history:
            # mask against the full history, not only the truncated window the model saw
            scores = mask_history_scores(scores.cpu(), make_batch(part.histories, part.targets))
        opt, pes = target_ranks(scores.cpu(), batch["target"].cpu())
        acc.update(opt, pes)
        opt_all.append(opt.numpy())
        pes_all.append(pes.numpy())
        bar.update(len(part))
    bar.close()
    seconds = time.perf_counter() - start
    result = EvalResult(
        metrics=acc.compute(),
        n_rows=len(rows),
        seconds=seconds,
        opt_ranks=np.concatenate(opt_all),
        pes_ranks=np.concatenate(pes_all),
    )
    # debug: callers print the metrics; one line per validation would repeat all through a training log
    log.debug("evaluated %d rows in %.1fs (chunk %d)", len(rows), seconds, chunk)
    return result


POPULARITY_EDGES = (1, 5, 20)  # lower edges of the warm buckets: 1-4, 5-19, 20+ (bucket "0": cold targets)


def bucket_labels(edges: tuple[int, ...]) -> list[str]:
    """'0' (never in training) and one label per edge: (1, 5, 20) -> 0, 1-4, 5-19, 20+."""
    if not edges or edges[0] != 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"popularity bucket edges must be increasing integers starting at 1, got {list(edges)}")
    return ["0"] + [f"{lo}-{hi - 1}" if hi - 1 > lo else str(lo) for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]}+"]


def bucket_metrics(result: EvalResult, target_counts: np.ndarray, edges: tuple[int, ...] = POPULARITY_EDGES,
                   settings: EvalSettings | None = None) -> dict[str, dict]:
    """Metrics of an evaluation by popularity of each row's target (`target_counts`: its occurrences in the
    training sequences, aligned with the evaluated rows), from the result's own per-row ranks and the same metric
    code as the overall numbers. Returns bucket label -> {"n": rows, "metrics": {...}} (no metrics when empty)."""
    settings = settings or EvalSettings()
    counts = np.asarray(target_counts)
    if counts.shape != result.opt_ranks.shape:
        raise ValueError(f"{counts.shape[0] if counts.ndim else 0} target counts for {result.n_rows} evaluated rows")
    labels = bucket_labels(tuple(edges))
    which = np.digitize(counts, edges)  # 0: count < 1 (cold), i: edges[i-1] <= count < edges[i]
    out = {}
    for i, label in enumerate(labels):
        mask = which == i
        entry: dict = {"n": int(mask.sum()), "metrics": {}}
        if mask.any():
            acc = RankingMetrics(ndcg_ks=settings.ndcg_ks, recall_ks=settings.recall_ks)
            acc.update(result.opt_ranks[mask], result.pes_ranks[mask])
            entry["metrics"] = acc.compute()
        out[label] = entry
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per model, one column per metric, opt and pes side by side."""
    if not results:
        return ""
    metric_names = sorted({k.rsplit("/", 1)[0] for r in results.values() for k in r if "/" in k})
    header = ["model"] + [f"{m}/{mode}" for m in metric_names for mode in ("opt", "pes")]
    lines = [header]
    for name, metrics in results.items():
        lines.append([name] + [f"{metrics.get(h, float('nan')):.4f}" for h in header[1:]])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines)
