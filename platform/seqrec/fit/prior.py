"""Choosing the text-prior weight of a trained checkpoint on validation (models/text_prior.py: score_j += w *
cos(x_last, x_j), lir_text's score, a scoring setting of SASRec, Bert4Rec and Flare).

The ID scores' scale differs by model and run (a tied-embedding dot product, a bias, a temperature nobody set), so
a fixed grid of weights would mean different things for each. The grid is relative instead: `scale` = the spread
(per-row standard deviation over the catalog) of the model's own scores divided by that of the cosines, measured
on a sample of validation rows; w = scale x 2^k for k = -3..3 puts the prior from an eighth of the ID scores'
spread to eight times it, plus w = 0 (no prior). One refinement step evaluates the half-octaves beside the best.
Every candidate is scored as `seqrec evaluate --model-param text_prior_weight=w` scores it (the checkpoint loaded
by load_model with that param, the shared evaluator; loaded once, the weight set per point), on the validation
split only.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)
OCTAVES = (-3, -2, -1, 0, 1, 2, 3)
SCALE_ROWS = 256


@dataclass
class PriorChoice:
    weight: float
    scale: float | None  # spread of the ID scores / spread of the cosines (None: the model has no prior)
    metric: str
    grid: list[dict[str, Any]] = field(default_factory=list)  # {"weight", "multiplier", "valid": metrics}, in order
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def supports_prior(model_name: str) -> bool:
    """Whether a registered model's config has the text_prior_weight scoring option."""
    from seqrec.models.registry import MODELS

    cfg_cls = MODELS[model_name][1] if model_name in MODELS else None
    return cfg_cls is not None and "text_prior_weight" in {f.name for f in dataclasses.fields(cfg_cls)}


def row_spread(scores: torch.Tensor) -> float:
    """Mean over rows of the standard deviation across items."""
    return float(scores.double().std(dim=1).mean())


def weight_grid(scale: float, octaves=OCTAVES) -> list[tuple[float, float]]:
    """[(multiplier, weight)] for multipliers 2^k, weights rounded to 3 significant digits."""
    return [(2.0 ** k, round_sig(scale * 2.0 ** k)) for k in octaves]


def round_sig(x: float, digits: int = 3) -> float:
    return 0.0 if x == 0 else round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def best_entry(grid: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The best validation entry; among equal values the smallest weight (no prior beats an equal prior)."""
    return max(grid, key=lambda e: (e["valid"][metric], -e["weight"]))


def load_with_prior(checkpoint: str, dataset):
    """The checkpoint loaded once for the whole grid, by `seqrec evaluate --model-param`'s path (load_model with
    params), at a weight > 0 so that the prior's table is bound to the catalog (with Flare, its text table is
    computed once too, not per weight)."""
    from seqrec.models.registry import load_model

    model, _ = load_model(checkpoint, dataset=dataset, params={"text_prior_weight": 1.0})
    return model


def set_weight(model, weight: float) -> None:
    """Score with another prior weight. The weight is read by score_all at every call (models/text_prior.py), so
    this gives exactly the scores of a fresh load_model(..., params={"text_prior_weight": weight}) without
    reloading and re-binding the catalog for every grid point."""
    model.config.text_prior_weight = float(weight)


def measure_scale(model, rows) -> float:
    """spread(ID scores) / spread(cosines) on up to SCALE_ROWS rows: cos = score(w=1) - score(w=0)."""
    from seqrec.data.batching import make_batch

    part = rows.subset(np.arange(min(len(rows), SCALE_ROWS)))
    batch = make_batch(part.histories, part.targets, part.user_idx, max_len=getattr(model, "max_len", None))
    scores = []
    with torch.no_grad():
        for w in (0.0, 1.0):
            set_weight(model, w)
            scores.append(model.score_all(batch).double())
    cos = row_spread(scores[1] - scores[0])
    if not cos > 0:
        raise ValueError("the text prior adds nothing on these rows (identical item texts?)")
    return row_spread(scores[0]) / cos


def evaluate_weight(model, dataset, rows, weight: float) -> dict[str, float]:
    from seqrec.eval.evaluator import EvalSettings, evaluate

    set_weight(model, weight)
    return evaluate(model, rows, dataset.n_items, EvalSettings()).metrics


def choose_text_prior(checkpoint: str, model_name: str, dataset, metric: str = "ndcg@10/pes",
                      deadline: float | None = None) -> PriorChoice:
    """The validation-best text-prior weight of `checkpoint` (0 when the model has no such option). With a
    `deadline` (time.monotonic()), grid points left when it passes are skipped (the octaves nearest the scale go
    first) and the choice is among those evaluated; the reason says how many were skipped."""
    if not supports_prior(model_name):
        return PriorChoice(weight=0.0, scale=None, metric=metric, reason=f"{model_name} has no text_prior_weight option")
    rows = dataset.eval_rows("valid")
    model = load_with_prior(checkpoint, dataset)
    scale = measure_scale(model, rows)
    grid = [{"weight": 0.0, "multiplier": 0.0, "valid": evaluate_weight(model, dataset, rows, 0.0)}]
    skipped = 0

    def add(mult: float, w: float) -> None:
        nonlocal skipped
        if deadline is not None and time.monotonic() > deadline:
            skipped += 1
            return
        grid.append({"weight": w, "multiplier": mult, "valid": evaluate_weight(model, dataset, rows, w)})

    for mult, w in sorted(weight_grid(scale), key=lambda mw: abs(math.log2(mw[0]))):  # 1x, then outwards
        add(mult, w)
    best = best_entry(grid, metric)
    if best["multiplier"] > 0:  # refine between the best octave and its neighbours
        for mult in (best["multiplier"] / math.sqrt(2), best["multiplier"] * math.sqrt(2)):
            add(mult, round_sig(scale * mult))
    best = best_entry(grid, metric)
    base = grid[0]["valid"][metric]
    reason = (f"validation {metric} {best['valid'][metric]:.4f} at w={best['weight']:g} ({best['multiplier']:.3g} x "
              f"the scale {scale:.3g}) vs {base:.4f} without the prior" if best["weight"] > 0
              else f"no weight beat the model alone on validation ({base:.4f})")
    if skipped:
        reason += f"; {skipped} grid point(s) skipped at the budget's end"
    log.info("text prior: %s", reason)
    return PriorChoice(weight=float(best["weight"]), scale=float(scale), metric=metric, grid=grid, reason=reason)


N_PRIOR_EVALS = 1 + len(OCTAVES) + 2 + 1  # w = 0, the octaves, the refinement, and loading the model
