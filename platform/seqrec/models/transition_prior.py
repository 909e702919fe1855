"""Transition prior: a scoring option of every score_all ID model (SASRec, Bert4Rec / flare_id, Flare T+ID).
With weight w > 0,

    score_j += w * log(1 + count(last -> j))

where count is how often item j followed the row's last history item in the training sequences: the `markov`
baseline's evidence (seqrec.eval.baselines.ItemTransition, the same table), log-damped so a transition seen 50
times does not drown the model's own ranking. 0 for an empty history and for unseen transitions.

Why (issue #34): on catalogs whose transitions repeat (Scientific_LCRec, the Magazine sample), a first-order
Markov chain beats the cloze models at Recall@1: exact successors are what a blurred embedding table loses. The
models keep learning what they learn; this only lets validation decide how much exact-transition evidence to add
on top. Like the text prior it is not trained: w is a scoring setting chosen on validation by `seqrec fit`
(0 when validation does not want it), and it is never in the checkpoint's weights.

The table is catalog data: `registry.bind_dataset` attaches it from the dataset's training split (for a refit,
train.fit_on "train+valid", the refit copy's: validation targets included). At weight 0 nothing is built or added.
"""
from __future__ import annotations

import torch

from seqrec.eval.baselines import ItemTransition


def check_weight(weight: float, where: str) -> None:
    if weight < 0:
        raise ValueError(f"{where}: transition_prior_weight must be >= 0, got {weight}")


class TransitionPrior:
    """The training transitions of one catalog and the add. A plain attribute, not a module: out of state_dict."""

    def __init__(self) -> None:
        self.table: ItemTransition | None = None

    def attach(self, table: ItemTransition) -> None:
        self.table = table

    def add(self, scores: torch.Tensor, batch: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
        """scores (B, N) + weight * log1p(transition counts), in place; `scores` itself at weight 0. Items added
        to the catalog after binding (Flare's add_items) have no transitions: nothing is added for them."""
        if weight <= 0:
            return scores
        if self.table is None:
            raise RuntimeError("transition_prior_weight > 0 needs the catalog's training transitions: bind the model "
                               "to its dataset (registry.bind_dataset, or load_model(..., dataset=...))")
        from seqrec.data.batching import last_items

        rows, items, counts = self.table.transitions(last_items(batch))
        dev = scores.device
        scores[rows.to(dev), items.to(dev)] += weight * torch.log1p(counts).to(dev, scores.dtype)
        return scores


def bind_transition_prior(model: torch.nn.Module, dataset) -> None:
    """Attach the dataset's training transitions to a model with transition_prior_weight > 0; a no-op otherwise."""
    prior = getattr(model, "transition_prior", None)
    if not isinstance(prior, TransitionPrior) or float(getattr(model.config, "transition_prior_weight", 0.0)) <= 0:
        return
    prior.attach(ItemTransition.from_dataset(dataset))
