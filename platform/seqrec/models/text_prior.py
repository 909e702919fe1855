"""Text-similarity prior: a scoring option of every score_all model with item text (SASRec, Bert4Rec / flare_id,
Flare T+ID). With weight w > 0,

    score_j += w * cos(x_last, x_j)

where x are the frozen encoder's mean-pooled item features: exactly the `lir_text` baseline's score
(seqrec.eval.baselines.last_item_similarity), 0 for an empty history. It is not trained: w is a scoring setting
chosen on validation (training validates with it on; `load_model(..., params={"text_prior_weight": w})` sets it
on a checkpoint). Why: on Scientific the last item's text similarity ranks rare targets far better than what the
models learn for them (docs/models/flare.md; test NDCG@10 Bert4Rec 0.0657 -> 0.0789,
Flare T+ID 0.0676 -> 0.0730).

The table, (n_items, encoder dim) float32 unit rows, is catalog data, not weights: never in the checkpoint.
`registry.bind_dataset` attaches it (`bind_text_prior`) for ID models, pooled from the Ray Data feature cache
(`prepare_params` fills that cache on the driver before Ray Train workers start, so workers only read it);
Flare pools it from the token features it already holds. At weight 0 score_all is untouched: no table, no op.
"""
from __future__ import annotations

from typing import Any

import torch

from seqrec.eval.baselines import last_item_similarity

PRIOR_MAX_TOKENS = 64  # token limit of the pooled features (the prior and lir_text share one table)


def check_weight(weight: float, where: str) -> None:
    if weight < 0:
        raise ValueError(f"{where}: text_prior_weight must be >= 0, got {weight}")


class TextPrior:
    """The (N, D) unit-row table of one model and the add. A plain attribute, not a module or buffer: it stays out
    of state_dict (and of DDP's buffer broadcasts); it follows the scores' device on first use."""

    def __init__(self, encoder: str | None = None):
        self.encoder = encoder  # the features to pool (ID models); None = the model supplies the table (Flare)
        self.table: torch.Tensor | None = None

    def attach(self, table: torch.Tensor, n_items: int) -> None:
        if table.dim() != 2 or table.shape[0] != n_items:
            raise ValueError(f"text prior table must be ({n_items}, D), got {tuple(table.shape)}")
        self.table = table.float()

    def clear(self) -> None:
        self.table = None

    def add(self, scores: torch.Tensor, batch: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
        """scores (B, N) + weight * lir_text's scores, in place; `scores` itself at weight 0."""
        if weight <= 0:
            return scores
        if self.table is None:
            raise RuntimeError("text_prior_weight > 0 needs the catalog's text table: bind the model to its dataset "
                               "(registry.bind_dataset, or load_model(..., dataset=...))")
        if self.table.shape[0] != scores.shape[1]:
            raise RuntimeError(f"text prior table has {self.table.shape[0]} items, the scores {scores.shape[1]}")
        if self.table.device != scores.device:
            self.table = self.table.to(scores.device)  # once: the model moved after binding
        return scores.add_(weight * last_item_similarity(self.table, batch).to(scores.dtype))


def catalog_table(dataset, encoder: str, cache_dir=None, use_ray: bool = True) -> torch.Tensor:
    """(N, D) float32 unit rows: the dataset's item texts through the feature cache (encoding only what is
    missing), mean-pooled over real tokens."""
    from seqrec.features.cache import dataset_features, pooled

    return pooled(dataset_features(dataset, encoder, PRIOR_MAX_TOKENS, cache_dir=cache_dir, use_ray=use_ray))


def bind_text_prior(model: torch.nn.Module, dataset, use_ray: bool = True, cache_dir=None) -> None:
    """Attach the prior's table to a model that pools it from the feature cache, when its weight is > 0; a no-op
    for every other model (and for Flare, which pools its own features)."""
    prior = getattr(model, "text_prior", None)
    if not isinstance(prior, TextPrior) or prior.encoder is None or model.config.text_prior_weight <= 0:
        return
    prior.attach(catalog_table(dataset, prior.encoder, cache_dir=cache_dir, use_ray=use_ray), model.n_items)


def prepare_params(params: dict[str, Any], dataset) -> dict[str, Any]:
    """The ID models' driver-side hook (`Model.prepare_params`, called by the training loop and the sweep runner
    before Ray Train workers start): with text_prior_weight > 0, fill the feature cache once with Ray Data, so the
    workers' bind_dataset only reads it. The params come back unchanged."""
    if float(params.get("text_prior_weight") or 0.0) > 0:
        from seqrec.features.cache import ensure_dataset_features

        encoder = params.get("text_prior_encoder") or "minilm"  # the configs' default
        ensure_dataset_features(dataset, encoder, PRIOR_MAX_TOKENS, use_ray=True)
    return dict(params)
