"""What a fit leaves behind: the chosen model as a scoring checkpoint, the best record, and the fit report.

    <out>/model/            model.safetensors + config.json of the selected checkpoint, its config carrying the
                            chosen scoring params (text_prior_weight, transition_prior_weight): every reader that loads a checkpoint
                            (seqrec evaluate, seqrec serve, registry.load_model) scores with them, nothing else
                            has to know about the fit
    <out>/best.json         the best record (the shape of a Tune sweep's best.json: checkpoint, dataset, config,
                            metrics), read by `seqrec evaluate --best-record` and `seqrec serve --best-record`
    <out>/fit_report.json   sizing decisions and why, budget plan and use, probe throughput, trials, prior grid,
                            peak memory, validation and test figures of the chosen model
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

MODEL_DIR, BEST_FILE, REPORT_FILE = "model", "best.json", "fit_report.json"
SCORING_FILES = ("model.safetensors",)  # the weights; config.json is rewritten, optimizer state is left behind


def write_scoring_checkpoint(source: str | Path, out_dir: Path, params: dict[str, Any],
                             note: dict[str, Any] | None = None) -> Path:
    """<out_dir>/model: the weights of `source` and its config.json with `params` set in the model config.
    Written to a temporary directory and renamed into place, so a reader never sees half a checkpoint."""
    from seqrec.models.registry import CONFIG_FILE

    source, dst = Path(source), out_dir / MODEL_DIR
    meta = json.loads((source / CONFIG_FILE).read_text())
    unknown = set(params) - set(meta["model"])
    if unknown:
        raise ValueError(f"{source}: the model config has no {sorted(unknown)}")
    meta["model"] = {**meta["model"], **params}
    meta["selected_by"] = {"tool": "seqrec fit", "source_checkpoint": str(source.resolve()), **(note or {})}
    tmp = out_dir / f".{MODEL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in SCORING_FILES:
        shutil.copy2(source / name, tmp / name)
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    old = out_dir / f".{MODEL_DIR}.old"
    if dst.exists():  # a rename cannot replace a non-empty directory: move the previous one aside first
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def best_record(*, name: str, out_dir: Path, dataset_path: str, sweep_record: dict[str, Any], checkpoint: Path,
                prior: dict[str, Any], metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The best record: the sweep's winner (trial, step, swept params, config) with the fit's scoring checkpoint
    and the chosen prior weights, and its validation and test metrics with those weights."""
    config = json.loads(json.dumps(sweep_record["config"]))  # a copy
    config["model"]["params"].update(prior["weights"])
    return {
        "name": name, "kind": "fit", "checkpoint": str(checkpoint.resolve()), "dataset": str(dataset_path),
        "model": sweep_record["model"], "trial_id": sweep_record["trial_id"], "step": sweep_record["step"],
        "source_checkpoint": sweep_record["checkpoint"], "sweep_dir": sweep_record["sweep_dir"],
        "selection": {**sweep_record["selection"], "priors": "chosen on validation"},
        "prior_weights": prior["weights"],  # also in <checkpoint>/config.json, which is what readers apply
        "params": {**sweep_record["params"], **{f"model.params.{k}": v for k, v in prior["weights"].items()}},
        "config": config, "metrics": metrics, "n_trials": sweep_record["n_trials"],
        "reproduce": f"seqrec evaluate --best-record {out_dir.resolve() / BEST_FILE}",
    }
