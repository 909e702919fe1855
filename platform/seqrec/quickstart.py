"""`seqrec quickstart`: the main job end to end on an embedded default.

Local Ray instance (or --address), a generated demo catalog, the shipped MiniLM encoder (item features
through the Ray Data feature cache), baselines, a model trained on Ray Train, one metrics table.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def run_quickstart(workdir: str | Path, users: int = 2000, items: int = 500, seed: int = 0,
                   address: str | None = None, train_steps: int = 300) -> dict:
    from seqrec.data.dataset import PreparedDataset
    from seqrec.data.demo import DemoOptions, generate_demo
    from seqrec.data.stats import dataset_stats, format_stats
    from seqrec.eval.baselines import BASELINES
    from seqrec.eval.evaluator import evaluate, format_table
    from seqrec.ray_utils import init_ray

    workdir = Path(workdir)
    started = time.perf_counter()
    init_ray(address)  # logs the cluster's resources

    data_dir = workdir / "data" / "demo"
    generate_demo(data_dir, DemoOptions(n_users=users, n_items=items, seed=seed))
    dataset = PreparedDataset.load(data_dir)
    print(format_stats(dataset_stats(dataset)))

    rows = dataset.eval_rows("test")
    results: dict[str, dict] = {}
    for name in ("mostpop", "lir", "lir_bm25", "lir_text"):
        if name == "lir_bm25":
            try:
                import seqrec.retrieval.bm25  # noqa: F401
            except ModuleNotFoundError:
                continue
        results[name] = evaluate(BASELINES[name].from_dataset(dataset), rows, dataset.n_items).metrics

    trained = _train_default_model(dataset, workdir, train_steps, seed)
    if trained is not None:
        name, model = trained
        results[name] = evaluate(model, rows, dataset.n_items).metrics

    print(f"\nTest metrics on the demo catalog ({len(rows)} users, {dataset.n_items} items, full ranking):")
    print(format_table(results))
    summary = {"dataset": str(data_dir), "results": results, "seconds": round(time.perf_counter() - started, 1)}
    out = workdir / "quickstart_results.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out}")
    return summary


def _train_default_model(dataset, workdir: Path, steps: int, seed: int):
    """Train SASRec on Ray Train when the training stack is installed; returns (name, model) or None."""
    try:
        from seqrec.train.quick import train_for_quickstart
    except ModuleNotFoundError:
        log.warning("training stack not available; quickstart reports baselines only")
        return None
    return train_for_quickstart(dataset, workdir / "checkpoints", steps=steps, seed=seed)


def _quickstart(args: argparse.Namespace) -> int:
    run_quickstart(args.workdir, args.users, args.items, args.seed, args.address, args.train_steps)
    if args.serve:  # blocks until Ctrl-C: the service lives as long as this process's Ray instance
        from seqrec.serve.cli import serve_quickstart

        serve_quickstart(args.workdir, args.serve_port)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="demo catalog -> MiniLM features -> baselines + a trained model")
    p.add_argument("--workdir", default="runs/quickstart")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--address", default=None,
                   help="Ray cluster address, e.g. 'auto' for the one `ray start` runs on this machine (default: a "
                        "fresh local instance of this command's own, isolated from other commands running at once)")
    p.add_argument("--serve", action="store_true", help="end with the trained model served on 127.0.0.1 (Ctrl-C stops)")
    p.add_argument("--serve-port", type=int, default=8000)
    p.set_defaults(func=_quickstart)
