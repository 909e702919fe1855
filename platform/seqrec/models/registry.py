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
from seqrec.models.calrec import CALRec, CALRecConfig
from seqrec.models.flare import Flare, FlareConfig
from seqrec.models.recformer import Recformer, RecformerConfig
from seqrec.models.sasrec import SASRec, SASRecConfig
from seqrec.models.text_prior import bind_text_prior
from seqrec.models.transition_prior import bind_transition_prior

MODELS: dict[str, tuple[type[torch.nn.Module], type]] = {
    "sasrec": (SASRec, SASRecConfig),
    "bert4rec": (Bert4Rec, Bert4RecConfig),
    "flare_id": (Bert4Rec, Bert4RecConfig),  # FLARE's name for its tuned Bert4Rec
    "calrec": (CALRec, CALRecConfig),  # needs model.attach_catalog(item_texts) before scoring
    "flare": (Flare, FlareConfig),  # Flare T+ID: + frozen text features, Perceiver, ID-text contrastive, critiques
    "recformer": (Recformer, RecformerConfig),  # ID-free: items as key-value text; needs the item attributes
}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def drop_retired_options(name: str, saved: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """A saved model config without the options removed from the model since (its class's RETIRED_OPTIONS: name ->
    the default it had, which meant off). A checkpoint saved with the defaults loads as before; one trained with
    another value is refused (it would not score as it did)."""
    retired = getattr(MODELS[name][0], "RETIRED_OPTIONS", {}) if name in MODELS else {}
    on = {k: saved[k] for k, off in retired.items() if k in saved and saved[k] != off}
    if on:
        raise ValueError(f"{where}: the checkpoint uses removed model options {on}; it needs an older seqrec")
    return {k: v for k, v in saved.items() if k not in retired}


def build_model(name: str, config_dict: dict[str, Any] | None, n_items: int) -> torch.nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    cls, cfg_cls = MODELS[name]
    return cls(from_dict(cfg_cls, dict(config_dict or {}), where=f"model[{name}]"), n_items)


def model_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    return dataclasses.asdict(model.config)


def save_state_dict(model: torch.nn.Module, path: str | Path) -> None:
    """The full state dict as safetensors, robust to the two ways params share memory:
    * tied weights (one tensor under two names): stored once, the other name recorded as an alias;
    * params that are views into one flat buffer (DeepSpeed ZeRO flattens them): each is copied out, which
      safetensors' own save_model refuses to do ("None is covering the entire storage").
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").clone().contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def load_state_dict_into(model: torch.nn.Module, path: str | Path) -> None:
    """Inverse of save_state_dict; strict (every key of the model must be present)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(path))
    for name, target in aliases.items():
        state[name] = state[target]
    model.load_state_dict(state, strict=True)


def bind_dataset(model: torch.nn.Module, dataset, use_ray: bool = True,
                 from_checkpoint: bool = False) -> torch.nn.Module:
    """Attach the catalog data a model reads besides its weights; the one place every consumer (training loop,
    evaluator, serving) does it. Flare T+ID: the frozen encoder's item features (from the feature cache, encoding
    only what is missing; `use_ray=False` encodes in-process) and the training counts; its trained-ID mask comes
    from the dataset's training split unless `from_checkpoint` (loaded weights know which IDs they trained: a refit,
    train.fit_on "train+valid", also trained the validation targets). CALRec: the item texts. Recformer: the item
    attribute dicts (its item matrix is re-encoded only if they differ from the catalog it was saved with).
    SASRec / Bert4Rec with text_prior_weight > 0: the prior's table (models/text_prior.py; Flare pools its own
    from the features above). Any ID model with transition_prior_weight > 0: the training transitions
    (models/transition_prior.py). Otherwise ID models: nothing."""
    if getattr(model, "needs_item_features", False):
        from seqrec.models.flare import load_flare_features

        load_flare_features(model, dataset, use_ray=use_ray, keep_trained_ids=from_checkpoint)
    bind_text_prior(model, dataset, use_ray=use_ray)
    bind_transition_prior(model, dataset)
    if hasattr(model, "attach_catalog"):
        model.attach_catalog(dataset.item_texts())
    if getattr(model, "needs_item_attributes", False):
        model.attach_items(dataset.item_attributes())
    return model


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu", dataset=None,
               use_ray: bool = True, params: dict[str, Any] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, config.json contents) from a checkpoint directory (or its URI) written by training; with
    `dataset` (a PreparedDataset), also bound to that catalog (bind_dataset). `params` override the saved model
    config (scoring settings such as text_prior_weight, whose table binding attaches when the weight is > 0; a key
    the config lacks is an error, and one that changes the architecture fails to load the weights). Binding again
    with another weight encodes nothing: the feature cache has the texts."""
    from seqrec.storage import local_copy

    checkpoint_dir = local_copy(checkpoint_dir, "checkpoints")  # a file:// path, or an s3:// / gs:// URI's copy
    meta = json.loads((checkpoint_dir / CONFIG_FILE).read_text())
    meta["model"] = drop_retired_options(meta["model_name"], meta["model"], checkpoint_dir)
    if params:
        meta["model"] = {**meta["model"], **params}
    model = build_model(meta["model_name"], meta["model"], int(meta["n_items"]))
    load_state_dict_into(model, checkpoint_dir / WEIGHTS_FILE)
    if dataset is not None:
        bind_dataset(model, dataset, use_ray=use_ray, from_checkpoint=True)
    return model.to(device).eval(), meta
