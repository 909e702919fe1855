"""Choosing a trained checkpoint's scoring priors on validation: the text prior (models/text_prior.py: score_j +=
w_text x cos(x_last, x_j), lir_text's score) and the transition prior (models/transition_prior.py: score_j +=
w_trans x log(1 + count(last -> j)), the markov baseline's evidence). Both are scoring settings of SASRec,
Bert4Rec and Flare; w = 0 (off) is always a candidate, so validation can refuse either.

The ID scores' scale differs by model and run (a tied-embedding dot product, a bias, a temperature nobody set), so
a fixed grid of weights would mean different things for each. The grid is relative instead: for each prior,
`scale` = the spread (per-row standard deviation over the catalog) of the model's own scores divided by that of
the prior's term, measured on the first validation rows; w = scale x 2^k for k = -3..3 puts the prior from an
eighth of the ID scores' spread to eight times it. The two priors are chosen jointly (an 8 x 8 grid, 0 included),
then refined on the half-octaves around the best point.

Cost: one validation pass of the model, whatever the grid size. Per chunk of validation rows the model scores
once with both priors off; each prior's term is computed once by the model's own prior object; every grid point
is then `scores + w_text x text + w_trans x trans`, the exact float operations `score_all` does at those weights,
ranked by the evaluator's own `target_ranks` and accumulated by its `RankingMetrics` (full ranking, opt and
pes). The chosen point is then evaluated again by `seqrec evaluate`'s code on the written checkpoint
(seqrec.fit.runner.final_metrics): the record's figures never come from this module.
"""
from __future__ import annotations

import dataclasses
import itertools
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
# the scoring priors: config key -> the model attribute that adds its term (TextPrior / TransitionPrior)
PRIORS = {"text_prior_weight": "text_prior", "transition_prior_weight": "transition_prior"}
SHORT = {"text_prior_weight": "text", "transition_prior_weight": "trans"}


@dataclass
class PriorChoice:
    weights: dict[str, float]  # config key -> chosen weight (empty: the model has no prior option)
    scales: dict[str, float]  # config key -> spread of the ID scores / spread of that prior's term
    metric: str
    grid: list[dict[str, Any]] = field(default_factory=list)  # {"weights": {...}, "valid": metrics}, in order
    reason: str = ""
    passes: int = 0  # validation passes of the model the choice cost

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def supported_priors(model_name: str) -> list[str]:
    """The prior weights a registered model's config has (in PRIORS order)."""
    from seqrec.models.registry import MODELS

    if model_name not in MODELS:
        return []
    names = {f.name for f in dataclasses.fields(MODELS[model_name][1])}
    return [key for key in PRIORS if key in names]


def supports_prior(model_name: str) -> bool:
    """Whether a registered model has the text-prior option (its feature cache is filled before training)."""
    return "text_prior_weight" in supported_priors(model_name)


def row_spread(scores: torch.Tensor) -> float:
    """Mean over rows of the standard deviation across items."""
    return float(scores.double().std(dim=1).mean())


def weight_grid(scale: float, octaves=OCTAVES) -> list[tuple[float, float]]:
    """[(multiplier, weight)] for multipliers 2^k, weights rounded to 3 significant digits."""
    return [(2.0 ** k, round_sig(scale * 2.0 ** k)) for k in octaves]


def round_sig(x: float, digits: int = 3) -> float:
    return 0.0 if x == 0 else round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def best_entry(grid: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The best validation entry; among equal values the one with the least prior (no prior beats an equal one)."""
    return max(grid, key=lambda e: (e["valid"][metric], -sum(e["multipliers"].values())))


def set_weights(model, weights: dict[str, float]) -> None:
    """Score with other prior weights: score_all reads them at every call, so this gives exactly the scores of a
    fresh load_model(..., params=weights) without reloading and re-binding the catalog."""
    for key, value in weights.items():
        setattr(model.config, key, float(value))


def load_with_priors(checkpoint: str, dataset, keys: list[str]):
    """The checkpoint loaded once, by `seqrec evaluate --model-param`'s path (load_model with params), at weights
    > 0 so that every prior's table is bound to the catalog."""
    from seqrec.models.registry import load_model

    model, _ = load_model(checkpoint, dataset=dataset, params={k: 1.0 for k in keys})
    return model


def chunk_components(model, batch, keys: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the model's scores with every prior off, {key: that prior's term at weight 1}) for one batch."""
    set_weights(model, {k: 0.0 for k in keys})
    with torch.no_grad():
        base = model.score_all(batch).float()
        if keys and getattr(model, "text_prior", None) is not None and "text_prior_weight" in keys \
                and model.text_prior.table is None:  # Flare pools its table on the first scoring at weight > 0
            set_weights(model, {"text_prior_weight": 1.0})
            model.score_all({k: v[:1] for k, v in batch.items()})
            set_weights(model, {"text_prior_weight": 0.0})
        terms = {k: getattr(model, PRIORS[k]).add(torch.zeros_like(base), batch, 1.0) for k in keys}
    return base, terms


def grid_metrics(points: list[dict[str, float]], keys: list[str], rows, model, n_items: int,
                 deadline: float | None) -> list[dict[str, float]] | None:
    """Validation metrics of every point ({key: weight}) in one pass over `rows`; None when the deadline passed
    before the pass ended."""
    from seqrec.data.batching import make_batch
    from seqrec.eval.evaluator import EvalSettings, chunk_size_for
    from seqrec.eval.metrics import RankingMetrics, target_ranks

    settings = EvalSettings()
    chunk = max(1, chunk_size_for(n_items, settings) // (2 + len(keys)))  # the base, the terms and one point
    max_len = getattr(model, "max_len", None)
    accs = [RankingMetrics(ndcg_ks=settings.ndcg_ks, recall_ks=settings.recall_ks) for _ in points]
    for lo in range(0, len(rows), chunk):
        if deadline is not None and time.monotonic() > deadline:
            return None
        part = rows.subset(slice(lo, lo + chunk))
        batch = make_batch(part.histories, part.targets, part.user_idx, max_len=max_len)
        base, terms = chunk_components(model, batch, keys)
        targets = batch["target"]
        for point, acc in zip(points, accs):
            scores = base.clone()
            for key in keys:  # score_all's order and operation: scores.add_(w * term)
                if point[key] > 0:
                    scores.add_(point[key] * terms[key])
            acc.update(*target_ranks(scores, targets))
    return [acc.compute() for acc in accs]


def measure_scales(model, rows, keys: list[str]) -> dict[str, float]:
    """spread(ID scores) / spread(prior term) on up to SCALE_ROWS validation rows, per prior."""
    from seqrec.data.batching import make_batch

    part = rows.subset(np.arange(min(len(rows), SCALE_ROWS)))
    batch = make_batch(part.histories, part.targets, part.user_idx, max_len=getattr(model, "max_len", None))
    base, terms = chunk_components(model, batch, keys)
    scales = {}
    for key, term in terms.items():
        spread = row_spread(term)
        if spread > 0:
            scales[key] = row_spread(base) / spread
        else:
            log.info("%s adds nothing on these rows (identical texts / no repeated transitions): not searched", key)
    return scales


def choose_priors(checkpoint: str, model_name: str, dataset, metric: str = "ndcg@10/pes",
                  deadline: float | None = None) -> PriorChoice:
    """The validation-best prior weights of `checkpoint` (none when the model has no prior option). With a
    `deadline` (time.monotonic()) the refinement pass is skipped when the first pass ends after it."""
    keys = supported_priors(model_name)
    if not keys:
        return PriorChoice(weights={}, scales={}, metric=metric, reason=f"{model_name} has no scoring prior option")
    rows = dataset.eval_rows("valid")
    model = load_with_priors(checkpoint, dataset, keys)
    scales = measure_scales(model, rows, keys)
    searched = [k for k in keys if k in scales]
    axes = [[(0.0, 0.0)] + weight_grid(scales[k]) for k in searched]  # (multiplier, weight), 0 = off
    grid: list[dict[str, Any]] = []

    def run(combos, until: float | None) -> bool:
        combos = [c for c in combos if not any(e["multipliers"] == {k: m for k, (m, _) in zip(searched, c)} for e in grid)]
        points = [{**{k: 0.0 for k in keys}, **{k: w for k, (_, w) in zip(searched, c)}} for c in combos]
        results = grid_metrics(points, keys, rows, model, dataset.n_items, until)
        if results is None:
            return False
        for c, p, r in zip(combos, points, results):
            grid.append({"weights": p, "multipliers": {k: m for k, (m, _) in zip(searched, c)}, "valid": r})
        return True

    passes = 1
    run(list(itertools.product(*axes)), None)  # the first pass always runs: the choice needs it
    best = best_entry(grid, metric)
    refine_axes = []
    for k in searched:
        m = best["multipliers"][k]
        refine_axes.append([(m, round_sig(scales[k] * m))] if m == 0 else
                           [(m * f, round_sig(scales[k] * m * f)) for f in (2 ** -0.5, 1.0, 2 ** 0.5)])
    refined = False
    if any(len(a) > 1 for a in refine_axes):
        refined = run(list(itertools.product(*refine_axes)), deadline)
        passes += 1
    best = best_entry(grid, metric)
    base = next(e for e in grid if not any(e["multipliers"].values()))["valid"][metric]
    chosen = {k: float(best["weights"][k]) for k in keys}
    if any(chosen.values()):
        parts = ", ".join(f"{SHORT[k]} w={chosen[k]:g} ({best['multipliers'][k]:.3g} x {scales[k]:.3g})"
                          for k in searched if chosen[k] > 0)
        reason = f"validation {metric} {best['valid'][metric]:.4f} with {parts} vs {base:.4f} without priors"
    else:
        reason = f"no prior weight beat the model alone on validation ({base:.4f})"
    if not refined and any(len(a) > 1 for a in refine_axes):
        reason += "; refinement skipped at the budget's end"
    log.info("scoring priors: %s", reason)
    set_weights(model, chosen)
    return PriorChoice(weights=chosen, scales={k: float(v) for k, v in scales.items()}, metric=metric, grid=grid,
                       reason=reason, passes=passes)


N_PRIOR_PASSES = 2 + 1 + 1  # the grid's pass, its refinement, loading the model, and ~73 grid points' ranking
