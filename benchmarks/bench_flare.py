"""Flare T+ID benchmarks on Scientific.

    # feature cache: encode every item text with the frozen encoder (Ray Data actor pool) into a fresh cache,
    # then run again: the second run must encode 0 items
    python benchmarks/bench_flare.py cache [--encoder minilm] [--max-tokens 64]
    # per-step training time of a Flare config (single process, same model/packing/optimizer as Ray Train)
    python benchmarks/bench_flare.py steps --config flare_tid_scientific --steps 10
    # test metrics of trained checkpoints on all users, on cold-start users (target never in training) and by how
    # often the target occurs in training (1-4, 5-19, 20+)
    python benchmarks/bench_flare.py ablation --checkpoint "T+ID=runs/train/.../checkpoint_..." --checkpoint ...
    # the text-similarity prior (text_prior_weight of Flare, Bert4Rec and SASRec; models/text_prior.py):
    # checkpoint and weight chosen on validation, test without and with it, all users and by target frequency
    python benchmarks/bench_flare.py prior --checkpoint "Flare=runs/train/x/checkpoint_A,runs/train/x/checkpoint_B" \
        --weights 0,1,2,4,8

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


def frequency_subsets(dataset, rows) -> dict:
    """Rows by how often their target occurs in the training sequences (FREQUENCY_BUCKETS): where a text path
    helps (rare targets) and where it costs (popular ones)."""
    counts = dataset.train_item_counts()[rows.targets]
    return {f"target-freq {lo}-{hi or ''}": rows.subset(np.flatnonzero((counts >= lo) & ((counts <= hi) if hi else True)))
            for lo, hi in FREQUENCY_BUCKETS}


def bench_prior(args) -> None:
    """The text-similarity prior (text_prior_weight), selected on validation. Each --checkpoint is LABEL=DIR or
    LABEL=DIR1,DIR2,... (one run's checkpoints): validation NDCG@10 (pes) for every checkpoint and weight of the
    grid; validation picks the checkpoint at weight 0 (what training without the prior selects) and the pair
    (checkpoint, weight) jointly (what training with the prior selects); test for both, all users and by target
    frequency."""
    import torch

    from seqrec.eval.evaluator import EvalSettings, evaluate
    from seqrec.models.registry import load_model

    torch.set_num_threads(args.threads)
    dataset = load_scientific(Path(args.raw), Path(args.data_cache))
    weights = [float(w) for w in args.weights.split(",")]
    if 0.0 not in weights:
        weights.insert(0, 0.0)
    valid_rows = dataset.eval_rows("valid")
    test_subsets = {"all": dataset.eval_rows("test"), **frequency_subsets(dataset, dataset.eval_rows("test"))}
    result = {"weights": weights, "users": {k: len(v) for k, v in test_subsets.items()}, "models": {}}

    def loaded(path):  # bound with a weight > 0 so the prior's table is attached; the weight is then a setting
        return load_model(path, dataset=dataset, params={"text_prior_weight": max(weights)})

    def scorer(model, w):
        model.config.text_prior_weight = w
        return model

    for spec in args.checkpoint:
        label, _, paths = spec.partition("=")
        valid = {}  # (checkpoint, weight) -> validation NDCG@10 pes
        for path in paths.split(","):
            model, meta = loaded(path)
            for w in weights:
                valid[(path, w)] = evaluate(scorer(model, w), valid_rows, dataset.n_items, EvalSettings()).metrics["ndcg@10/pes"]
            print(f"{label} {Path(path).name}: valid NDCG@10 " + ", ".join(f"w={w:g} {valid[(path, w)]:.4f}" for w in weights))
        plain = max((k for k in valid if k[1] == 0.0), key=lambda k: valid[k])
        joint = max(valid, key=lambda k: (valid[k], -k[1]))  # ties: the smaller weight
        entry = {"model": meta["model_name"], "selected": {},
                 "valid_ndcg@10/pes": [{"checkpoint": p, "weight": w, "value": v} for (p, w), v in valid.items()]}
        for name, (path, w) in (("without prior", plain), ("with prior", joint)):
            model, _ = loaded(path)
            test = {sub_name: evaluate(scorer(model, w), sub, dataset.n_items, EvalSettings()).metrics
                    for sub_name, sub in test_subsets.items()}
            entry["selected"][name] = {"checkpoint": path, "weight": w, "valid_ndcg@10/pes": valid[(path, w)], "test": test}
            m = test["all"]
            print(f"  {name}: {Path(path).name} w={w:g} valid {valid[(path, w)]:.4f} | test NDCG@10 {m['ndcg@10/pes']:.4f}"
                  f" (opt {m['ndcg@10/opt']:.4f}) R@10 {m['recall@10/pes']:.4f} (opt {m['recall@10/opt']:.4f})"
                  f" R@1 {m['recall@1/pes']:.4f} | by target frequency " +
                  " / ".join(f"{test[k]['ndcg@10/pes']:.4f}" for k in test if k != "all"))
        result["models"][label] = entry
    write("prior", result)


def bench_ablation(args) -> None:
    from seqrec.eval.evaluator import EvalSettings, evaluate, format_table
    from seqrec.models.registry import load_model

    dataset = load_scientific(Path(args.raw), Path(args.data_cache))
    from seqrec.eval.cli import USER_SUBSETS, select_users

    rows = dataset.eval_rows(args.split)
    subsets = {name: select_users(dataset, rows, name) for name in USER_SUBSETS}
    subsets.update(frequency_subsets(dataset, rows))
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
    s.add_argument("--config", default="flare_tid_scientific")
    s.add_argument("--set", action="append", default=[], help="key=value config override (repeatable)")
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--threads", type=int, default=2)
    a = sub.add_parser("ablation")
    a.add_argument("--checkpoint", action="append", required=True, help="LABEL=CHECKPOINT_DIR (repeatable)")
    a.add_argument("--split", default="test", choices=["valid", "test"])
    pr = sub.add_parser("prior")
    pr.add_argument("--checkpoint", action="append", required=True,
                    help="LABEL=CHECKPOINT_DIR or LABEL=DIR1,DIR2,... (one run's checkpoints; repeatable)")
    pr.add_argument("--weights", default="0,1,2,3,4,6,8", help="text_prior_weight grid (comma-separated)")
    pr.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    {"cache": bench_cache, "steps": bench_steps, "ablation": bench_ablation, "prior": bench_prior}[args.kind](args)


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
