"""Checkpoint files, each written to a temp name then renamed (a crash never leaves a half-written file).

    model.safetensors     full (unsharded) model state dict, written by rank 0
    config.json           model name + model config + n_items + experiment config (seqrec.models.registry.load_model)
    train_state.pt        rank 0: step, optimizer (DDP), scheduler, early-stopping state
    rank_state_<r>.pt     every rank: its torch RNG state and its position in its data stream
    deepspeed/            DeepSpeed's own files when strategy=deepspeed (ZeRO optimizer shards of every rank)
Ray Train merges the directories reported by all workers into one checkpoint.
`.pt` files hold only tensors and plain containers and are read with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from seqrec.models.registry import CONFIG_FILE, WEIGHTS_FILE, load_model, load_state_dict_into, save_state_dict  # noqa: F401

TRAIN_STATE = "train_state.pt"


def _tmp_in(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = _tmp_in(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = _tmp_in(path)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Full state dict to model.safetensors (tied weights kept as aliases; ZeRO flat-buffer views copied)."""
    path = Path(directory) / WEIGHTS_FILE
    tmp = _tmp_in(path)
    try:
        save_state_dict(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model_files(model: torch.nn.Module, directory: str | Path, meta: dict[str, Any]) -> None:
    """The two files `load_model` needs."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_weights(model, directory)
    atomic_json(meta, Path(directory) / CONFIG_FILE)


def load_weights_into(model: torch.nn.Module, directory: str | Path) -> None:
    load_state_dict_into(model, Path(directory) / WEIGHTS_FILE)


def load_state(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def rank_state_file(rank: int) -> str:
    return f"rank_state_{rank}.pt"
