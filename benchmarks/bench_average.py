"""Checkpoint averaging on Scientific: the uniform average of the weights of several checkpoints of one run,
evaluated with full ranking on validation and test next to each checkpoint alone.

This is the offline probe behind `train.ema_decay` (README, Training: "Weight averaging"): on Scientific the
validation metric moves by 0.001-0.002 between checkpoints 100 steps apart, and the average of a run's two best
checkpoints scores above either.

    python benchmarks/bench_average.py runs/train/<run>/checkpoint_00000500 runs/train/<run>/checkpoint_00000700

The checkpoints must share the model and its config (same run). Floating-point tensors are averaged; the others
(e.g. Flare's trained-ID mask) must be equal and are kept. Results are printed and written to
benchmarks/results/average_<timestamp>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flare import DEFAULT_RAW, RESULTS, ROOT, load_scientific  # noqa: E402 (also puts platform/ on the path)

SPLITS = ("valid", "test")


def average_state(states: list[dict]) -> dict:
    """Uniform average of float tensors; every other tensor must be identical across the states."""
    import torch

    keys = states[0].keys()
    if any(s.keys() != keys for s in states[1:]):
        raise ValueError("checkpoints hold different tensors: they are not from one model")
    out = {}
    for k in keys:
        first = states[0][k]
        if first is None:
            out[k] = None
        elif first.is_floating_point():
            out[k] = torch.stack([s[k].float() for s in states]).mean(0).to(first.dtype)
        elif all(torch.equal(first, s[k]) for s in states[1:]):
            out[k] = first
        else:
            raise ValueError(f"non-float tensor {k!r} differs between checkpoints")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint directories of one run (two or more)")
    parser.add_argument("--raw", default=str(DEFAULT_RAW))
    parser.add_argument("--data-cache", default=str(ROOT / "runs" / "data"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if len(args.checkpoints) < 2:
        parser.error("give two or more checkpoints to average")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from seqrec.eval.evaluator import EvalSettings, evaluate, format_table
    from seqrec.models.registry import load_model

    torch.set_num_threads(args.threads)
    dataset = load_scientific(Path(args.raw), Path(args.data_cache))
    rows = {split: dataset.eval_rows(split) for split in SPLITS}
    models, configs = [], []
    for path in args.checkpoints:
        model, meta = load_model(path, dataset=dataset)  # bound to the catalog; keeps its trained-ID mask
        models.append(model)
        configs.append(meta["model"])
    if any(c != configs[0] for c in configs[1:]):
        raise ValueError("checkpoints have different model configs: average checkpoints of one run")
    averaged = copy.deepcopy(models[0])
    averaged.load_state_dict(average_state([m.state_dict() for m in models]), strict=True)

    result = {"checkpoints": args.checkpoints, "model": configs[0], "metrics": {}}
    table = {}
    labels = [Path(p).name for p in args.checkpoints] + ["average"]
    for label, model in zip(labels, models + [averaged]):
        result["metrics"][label] = {}
        for split in SPLITS:
            res = evaluate(model.eval(), rows[split], dataset.n_items, EvalSettings())
            result["metrics"][label][split] = res.metrics
            table[f"{label} [{split}]"] = res.metrics
    print(format_table(table))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"average_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
