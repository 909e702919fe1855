"""Flare T+ID benchmarks on Scientific.

    # feature cache: encode every item text with the frozen encoder (Ray Data actor pool) into a fresh cache,
    # then run again: the second run must encode 0 items
    python benchmarks/bench_flare.py cache [--encoder minilm] [--max-tokens 64]
    # per-step training time of a Flare config (single process, same model/packing/optimizer as Ray Train)
    python benchmarks/bench_flare.py steps --config flare_tid_scientific_cpu --steps 10
    # test metrics of trained checkpoints on all users, on cold-start users (target never in training) and by how
    # often the target occurs in training (1-4, 5-19, 20+)
    python benchmarks/bench_flare.py ablation --checkpoint "T+ID=runs/train/.../checkpoint_..." --checkpoint ...

Results are printed and written to benchmarks/results/flare_<kind>_<timestamp>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
RESULTS = ROOT / "benchmarks" / "results"
FREQUENCY_BUCKETS = ((1, 4), (5, 19), (20, None))  # training occurrences of the target (0 = the cold-target subset)
DEFAULT_RAW = Path(os.environ.get("SEQREC_SHARED_DATA", ROOT.parent / "shared" / "data")) / "Scientific"


def load_scientific(raw: Path, cache: Path):
    from seqrec.data.dataset import PreparedDataset
    from seqrec.data.unisrec import prepare_unisrec

    out = cache / raw.name
    if not (out / "meta.json").exists():
        prepare_unisrec(raw, out)
    return PreparedDataset.load(out)


def write(kind: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"flare_{kind}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


def bench_cache(args) -> None:
    from seqrec.features.cache import FeatureCache
    from seqrec.ray_utils import init_ray

    dataset = load_scientific(Path(args.raw), Path(args.data_cache))
    texts = dataset.item_texts()
    init_ray(num_cpus=args.num_cpus)
    with tempfile.TemporaryDirectory(prefix="flare_cache_bench_") as tmp:
        # --cache-dir: a real cache (e.g. the dataset's features/, so training reuses it); default a fresh one
        cache = FeatureCache(args.cache_dir or tmp, args.encoder, args.max_tokens)
        first = cache.ensure(texts, batch_size=args.batch_size, concurrency=args.concurrency, use_ray=True)
        second = cache.ensure(texts, batch_size=args.batch_size, concurrency=args.concurrency, use_ray=True)
        t0 = time.perf_counter()
        feats = cache.load(texts)
        load_s = time.perf_counter() - t0
    result = {
        "dataset": dataset.name, "items": len(texts), "encoder": args.encoder, "max_tokens": args.max_tokens,
        "cache_dir": args.cache_dir or "fresh temp dir", "concurrency": args.concurrency, "batch_size": args.batch_size,
        "first_run": {"encoded": first.encoded, "reused": first.reused, "seconds": round(first.seconds, 2),
                      "items_per_s": round(first.items_per_second, 1)},
        "second_run": {"encoded": second.encoded, "reused": second.reused, "seconds": round(second.seconds, 2)},
        "load_seconds": round(load_s, 2), "features_shape": list(feats.tokens.shape),
        "mean_tokens": round(float(feats.mask.sum(1).float().mean()), 1),
    }
    write("cache", result)


def bench_steps(args) -> None:
    import numpy as np
    import torch

    from seqrec.config import load_config, parse_overrides
    from seqrec.models.flare import load_flare_features
    from seqrec.models.registry import build_model
    from seqrec.train.config import ExperimentConfig
    from seqrec.train.loop import BatchStream, lr_lambda, make_optimizer

    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    cfg = load_config(ExperimentConfig, args.config, subdir="train", overrides=overrides)
    dataset = load_scientific(Path(args.raw), Path(args.data_cache))
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.model.params, dataset.n_items)
    load_flare_features(model, dataset, use_ray=False)
    optimizer = make_optimizer(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train))
    stream = iter(BatchStream(dataset.train_sequences(), model, cfg.train, 0))
    model.train()
    times, uniq = [], []
    for step in range(args.warmup + args.steps):
        batch = next(stream)
        t0 = time.perf_counter()
        loss = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            uniq.append(int(torch.unique(batch["items"][batch["segments"] > 0]).numel()))
    model.eval()
    t0 = time.perf_counter()
    model._tables()
    table_s = time.perf_counter() - t0
    result = {
        "config": args.config, "overrides": overrides, "threads": args.threads, "steps": args.steps,
        "batch_size": cfg.train.batch_size, "pack_len": cfg.train.pack_len,
        "seconds_per_step": round(float(np.mean(times)), 3), "seconds_per_step_p90": round(float(np.quantile(times, 0.9)), 3),
        "unique_items_per_batch": round(float(np.mean(uniq)), 1),
        "eval_text_table_seconds": round(table_s, 2), "params": sum(p.numel() for p in model.parameters()),
    }
    write("steps", result)


def bench_ablation(args) -> None:
    from seqrec.eval.evaluator import EvalSettings, evaluate, format_table
    from seqrec.models.registry import load_model

    dataset = load_scientific(Path(args.raw), Path(args.data_cache))
    from seqrec.eval.cli import USER_SUBSETS, select_users

    rows = dataset.eval_rows(args.split)
    subsets = {name: select_users(dataset, rows, name) for name in USER_SUBSETS}
    # by how often the target occurs in the training sequences: where a text path helps (rare) and costs (popular)
    counts = dataset.train_item_counts()[rows.targets]
    for lo, hi in FREQUENCY_BUCKETS:
        subsets[f"target-freq {lo}-{hi or ''}"] = rows.subset(np.flatnonzero((counts >= lo) & ((counts <= hi) if hi else True)))
    result, table = {"split": args.split, "users": {k: len(v) for k, v in subsets.items()}, "models": {}}, {}
    for spec in args.checkpoint:
        label, _, path = spec.partition("=")
        model, meta = load_model(path, dataset=dataset)
        result["models"][label] = {"checkpoint": path, "model": meta["model"]}
        for name, sub in subsets.items():
            res = evaluate(model, sub, dataset.n_items, EvalSettings())
            # the median pessimistic rank says more than MRR about a few dozen cold-start users (random: ~N/2)
            metrics = {**res.metrics, "median_rank/opt": float(np.median(res.opt_ranks)),
                       "median_rank/pes": float(np.median(res.pes_ranks))}
            result["models"][label][name] = metrics
            table[f"{label} [{name}, {len(sub)}]"] = metrics
    print(format_table(table))
    write("ablation", result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", default=str(DEFAULT_RAW))
    parser.add_argument("--data-cache", default=str(ROOT / "runs" / "data"))
    sub = parser.add_subparsers(dest="kind", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--encoder", default="minilm")
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--concurrency", type=int, default=1)
    c.add_argument("--num-cpus", type=int, default=2)
    c.add_argument("--cache-dir", default=None, help="cache directory (default: a fresh temporary one)")
    s = sub.add_parser("steps")
    s.add_argument("--config", default="flare_tid_scientific_cpu")
    s.add_argument("--set", action="append", default=[], help="key=value config override (repeatable)")
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--threads", type=int, default=2)
    a = sub.add_parser("ablation")
    a.add_argument("--checkpoint", action="append", required=True, help="LABEL=CHECKPOINT_DIR (repeatable)")
    a.add_argument("--split", default="test", choices=["valid", "test"])
    args = parser.parse_args()
    {"cache": bench_cache, "steps": bench_steps, "ablation": bench_ablation}[args.kind](args)


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
