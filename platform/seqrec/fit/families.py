"""The model families `seqrec fit` trains, and what each keeps fixed whatever the dataset.

A family is a registered model (seqrec.models.registry) plus the settings that are not sized from the data: the
architecture's shape ratios and, for Flare T+ID, its text path. Everything that depends on the catalog (width,
history length, schedule, regularisation) comes from seqrec.fit.sizing. The values here are the shipped presets'
(configs/train/*_scientific*.yaml) where they are shape choices rather than Scientific-tuned magnitudes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NEXT_ITEM, CLOZE = "next_item", "cloze"  # training objectives: every position a target vs masked positions only


@dataclass(frozen=True)
class Family:
    name: str  # the `seqrec fit --model` choice
    model: str  # key of seqrec.models.registry.MODELS
    objective: str  # NEXT_ITEM (SASRec) or CLOZE (Bert4Rec, Flare)
    fixed: dict[str, Any] = field(default_factory=dict)  # model params no sizing rule changes
    # relative cost of one training step against an ID model of the same width (used only before the probe
    # measures it, to order candidate widths); Flare's Perceiver over item tokens roughly doubles a step
    step_cost: float = 1.0


FAMILIES: dict[str, Family] = {
    "sasrec": Family("sasrec", "sasrec", NEXT_ITEM, fixed={"heads": 2, "output_bias": False}),
    "bert4rec": Family("bert4rec", "bert4rec", CLOZE,
                       fixed={"heads": 2, "tied_output": True, "output_bias": True, "positions_from_end": False}),
    # Flare T+ID's text path as shipped in flare_tid_scientific_tuned (alpha, tau, margin, text_norm, a small
    # Perceiver over frozen MiniLM tokens); critiques and the frequent-item options off
    "flare_tid": Family("flare_tid", "flare", CLOZE, step_cost=2.0, fixed={
        "heads": 2, "output_bias": True, "use_text": True, "perceiver_dim": 192, "perceiver_heads": 8,
        "perceiver_layers": 1, "perceiver_latents": 2, "contrastive": True, "alpha": 0.3, "tau": 0.3,
        "margin": 0.2, "text_norm": 0.25, "encoder": "minilm", "max_text_tokens": 64, "id_dropout": 0.05,
        "critique_prob": 0.0}),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} for seqrec fit; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]
