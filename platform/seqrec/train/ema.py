"""Exponential moving average (EMA) of a model's trainable parameters, for validation, checkpoints and serving.

Why: on Scientific the validation-best step of Bert4Rec and Flare T+ID sits in a noisy region (the metric moves by
~0.001-0.002 between evaluations 100 steps apart), and the average of the two best checkpoints of one run scored
higher on validation AND test than either checkpoint, for both models (docs/training.md, "Weight averaging (EMA)"). An EMA is the
running form of that average: shadow <- d * shadow + (1 - d) * live after every optimizer step, with the usual
warm-up d_t = min(decay, (1 + t) / (10 + t)) so that the first steps do not drag the average towards the random
initialisation. Training always continues from the live weights; what is validated, saved as model.safetensors
and served is the average.

Checkpoints with an EMA: model.safetensors holds the averaged weights (the deployable model), the train state
holds the live ones (`live_weights`) and the update count, so a resumed run continues exactly.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float, updates: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1); got {decay}")
        self.decay, self.updates = float(decay), int(updates)
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Call after every optimizer step."""
        self.updates += 1
        d = self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), 1.0 - d)

    @torch.no_grad()
    def live_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in self.shadow}

    @torch.no_grad()
    def load_live(self, model: torch.nn.Module, live: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        missing = set(self.shadow) - set(live)
        if missing:
            raise ValueError(f"train state lacks live weights for {sorted(missing)[:3]}...")
        for name in self.shadow:
            params[name].copy_(live[name].to(params[name].device, params[name].dtype))

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The model with the averaged weights inside the block, the live ones restored after (also on error)."""
        params = dict(model.named_parameters())
        live = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, v in self.shadow.items():
                params[n].copy_(v)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, v in live.items():
                    params[n].copy_(v)
