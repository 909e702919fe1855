"""The quickstart's training step: the shipped `quickstart_sasrec` config on Ray Train, best checkpoint back."""
from __future__ import annotations

from pathlib import Path


def train_for_quickstart(dataset, checkpoints_dir: str | Path, steps: int = 300, seed: int = 0):
    from seqrec.config import load_config
    from seqrec.models.registry import load_model
    from seqrec.train.config import ExperimentConfig
    from seqrec.train.loop import run_experiment

    cfg = load_config(
        ExperimentConfig,
        "quickstart_sasrec",
        "train",
        overrides={"data.path": str(dataset.path), "train.steps": steps, "train.seed": seed,
                   "run.storage_path": str(Path(checkpoints_dir).resolve())},
    )
    summary = run_experiment(cfg)
    model, _ = load_model(summary["best_checkpoint"])
    return "sasrec", model
