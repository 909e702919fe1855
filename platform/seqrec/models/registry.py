"""Model registry (explicit name -> class) and the one loader every consumer uses: `load_model(checkpoint_dir)`.

A checkpoint directory holds `model.safetensors` (the full, unsharded state dict) and `config.json`
({"model_name", "model": {...}, "n_items", ...}); optimizer/RNG state lives next to it in `train_state.pt`
and is only read when resuming training.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from seqrec.config import from_dict
from seqrec.models.bert4rec import Bert4Rec, Bert4RecConfig
from seqrec.models.sasrec import SASRec, SASRecConfig

MODELS: dict[str, tuple[type[torch.nn.Module], type]] = {
    "sasrec": (SASRec, SASRecConfig),
    "bert4rec": (Bert4Rec, Bert4RecConfig),
    "flare_id": (Bert4Rec, Bert4RecConfig),  # FLARE's name for its tuned Bert4Rec
}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def build_model(name: str, config_dict: dict[str, Any] | None, n_items: int) -> torch.nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    cls, cfg_cls = MODELS[name]
    return cls(from_dict(cfg_cls, dict(config_dict or {}), where=f"model[{name}]"), n_items)


def model_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    return dataclasses.asdict(model.config)


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, config.json contents) from a checkpoint directory written by training."""
    from safetensors.torch import load_model as st_load_model

    checkpoint_dir = Path(checkpoint_dir)
    meta = json.loads((checkpoint_dir / CONFIG_FILE).read_text())
    model = build_model(meta["model_name"], meta["model"], int(meta["n_items"]))
    st_load_model(model, str(checkpoint_dir / WEIGHTS_FILE), strict=True, device=str(device))
    return model.to(device).eval(), meta
