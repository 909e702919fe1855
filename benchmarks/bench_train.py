"""Training benchmarks for the ID models (single process, the same model / packing / optimizer code as Ray Train).

    # fixed steps on Scientific for each model, packed and unpacked: seq/s, targets/s, padding, peak RSS
    python benchmarks/bench_train.py throughput --steps 200
    # wall time until validation NDCG@10 (pes) first reaches 0.05
    python benchmarks/bench_train.py time-to-quality --model sasrec --threshold 0.05
    # a generated 400k-item catalog: a few steps with the chunked full softmax, peak RSS
    python benchmarks/bench_train.py catalog --catalog-items 400000 --steps 5

Every measurement runs in a fresh subprocess so each peak RSS is its own. Results go to benchmarks/results/.
"seq/s" counts user training sequences (a packed row holds many); "targets/s" counts supervised positions
(next-item targets for SASRec, masked items for Bert4Rec), the unit RecBole's instances/s corresponds to.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_RAW = Path(os.environ.get("SEQREC_SHARED_DATA", ROOT.parent / "shared" / "data")) / "Scientific"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def load_scientific(raw: Path, cache: Path):
    from seqrec.data.dataset import PreparedDataset
    from seqrec.data.unisrec import prepare_unisrec

    out = cache / raw.name
    if not (out / "meta.json").exists():
        prepare_unisrec(raw, out)
    return PreparedDataset.load(out)


def experiment(name: str):
    from seqrec.config import load_config
    from seqrec.train.config import ExperimentConfig

    return load_config(ExperimentConfig, name, subdir="train")


def run_steps(model, stream, optimizer, scheduler, steps: int, grad_clip: float, warmup: int = 5) -> dict:
    """Train `steps` steps after `warmup` untimed ones; count sequences, real tokens and supervised targets."""
    import torch

    model.train()
    it = iter(stream)
    seqs = tokens = slots = 0
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
            seqs = tokens = slots = 0
        batch = next(it)
        loss = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        seg = batch["segments"]
        seqs += int(((batch["positions"] == 0) & (seg > 0)).sum())
        tokens += int((seg > 0).sum())
        slots += seg.numel()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "steps": steps, "seq_per_s": seqs / dt, "tokens_per_s": tokens / dt,
            "padding_fraction_batches": 1 - tokens / max(slots, 1), "final_loss": float(loss)}


def targets_per_token(model_name: str, seqs, model) -> float:
    """Supervised positions per real input token (1 - 1/len for causal SASRec; ~mask rate for Bert4Rec)."""
    from seqrec.models.packing import split_windows

    inputs, targets = split_windows(seqs, model.packed_seq_len, model.causal)
    tokens = sum(len(x) for x in inputs)
    if model.causal:
        return sum(int((t >= 0).sum()) for t in targets) / tokens
    return model.config.mask_prob  # expected; every sequence also has >= 1 masked item, so a lower bound


# ------------------------------------------------------------------------------------------------ modes
def one_throughput(args) -> dict:
    import numpy as np
    import torch

    from seqrec.models.packing import padding_stats
    from seqrec.models.registry import build_model
    from seqrec.train.loop import BatchStream, lr_lambda, make_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = experiment(args.config)
    tc = cfg.train
    tc.packing = not args.no_packing
    if args.no_packing:
        # same number of sequences per step as a packed batch holds on average
        tc.batch_size = args.unpacked_batch
    dataset = load_scientific(Path(args.raw), Path(args.cache))
    seqs = dataset.train_sequences()
    model = build_model(cfg.model.name, cfg.model.params, dataset.n_items)
    opt = make_optimizer(model, tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    stream = BatchStream(seqs, model, tc, rank=0)
    res = run_steps(model, stream, opt, sched, args.steps, tc.grad_clip)
    pad = padding_stats(seqs, tc.pack_len, model.packed_seq_len, model.causal, batch_size=args.unpacked_batch)
    tpt = targets_per_token(cfg.model.name, seqs, model)
    return {"mode": "throughput", "config": args.config, "model": cfg.model.name, "packing": tc.packing,
            "batch_size": tc.batch_size, "pack_len": tc.pack_len if tc.packing else model.packed_seq_len,
            "threads": args.threads, **res, "targets_per_s": res["tokens_per_s"] * tpt,
            "padding": pad, "peak_rss_mb": peak_rss_mb(), "n_items": dataset.n_items}


def one_time_to_quality(args) -> dict:
    import torch

    from seqrec.eval.evaluator import EvalSettings, evaluate
    from seqrec.models.registry import build_model
    from seqrec.train.loop import BatchStream, lr_lambda, make_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = experiment(args.config)
    tc = cfg.train
    dataset = load_scientific(Path(args.raw), Path(args.cache))
    model = build_model(cfg.model.name, cfg.model.params, dataset.n_items)
    opt = make_optimizer(model, tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    stream = BatchStream(dataset.train_sequences(), model, tc, rank=0)
    valid = dataset.eval_rows("valid")
    it = iter(stream)
    t0 = time.perf_counter()
    train_s, history = 0.0, []
    for step in range(1, tc.steps + 1):
        ts = time.perf_counter()
        model.train()
        loss = model.loss(next(it))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        train_s += time.perf_counter() - ts
        if step % args.eval_every == 0:
            ndcg = evaluate(model, valid, dataset.n_items, EvalSettings()).metrics["ndcg@10/pes"]
            wall = time.perf_counter() - t0
            history.append({"step": step, "wall_s": wall, "train_s": train_s, "ndcg@10/pes": ndcg})
            print(f"step {step} valid ndcg@10/pes {ndcg:.4f} wall {wall:.0f}s", flush=True)
            if ndcg >= args.threshold:
                return {"mode": "time-to-quality", "config": args.config, "model": cfg.model.name,
                        "threshold": args.threshold, "reached": True, "step": step, "wall_s": wall,
                        "train_s": train_s, "history": history, "peak_rss_mb": peak_rss_mb()}
    return {"mode": "time-to-quality", "config": args.config, "model": cfg.model.name, "threshold": args.threshold,
            "reached": False, "history": history, "peak_rss_mb": peak_rss_mb()}


def one_catalog(args) -> dict:
    import numpy as np
    import torch

    from seqrec.models.packing import pack_sequences
    from seqrec.models.registry import build_model
    from seqrec.train.config import TrainConfig
    from seqrec.train.loop import BatchStream, lr_lambda, make_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n_items = args.catalog_items
    # Zipf-ish popularity so the catalog looks like a real long tail; lengths 3..50
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    pop /= pop.sum()
    lengths = rng.integers(3, 51, size=args.catalog_users)
    flat = rng.choice(n_items, size=int(lengths.sum()), p=pop)
    seqs = np.split(flat, np.cumsum(lengths)[:-1])
    before = peak_rss_mb()
    params = {"max_len": 50, "dim": args.dim, "layers": 2, "heads": 2, "hidden": 4 * args.dim}
    model = build_model(args.model, params, n_items)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, pack_len=256, lr=1e-3)
    opt = make_optimizer(model, tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    stream = BatchStream(seqs, model, tc, rank=0)
    res = run_steps(model, stream, opt, sched, args.steps, 1.0, warmup=1)
    positions = args.batch_size * 256
    # score a chunk of users the way the evaluator does (B, n_items) in fixed memory
    from seqrec.data.batching import make_batch

    model.eval()
    with torch.no_grad():
        scores = model.score_all(make_batch(seqs[:64], np.zeros(64, dtype=np.int64), max_len=50))
    return {"mode": "catalog", "model": args.model, "n_items": n_items, "users": args.catalog_users, "dim": args.dim,
            **res, "peak_rss_mb": peak_rss_mb(), "rss_before_model_mb": before,
            "plain_softmax_logits_gb": positions * n_items * 4 / 2**30,
            "note": "plain softmax would hold (positions x n_items) fp32 logits + their gradient at once",
            "score_shape": list(scores.shape)}


# ----------------------------------------------------------------------------------------------- driver
def sub(argv: list[str]) -> dict:
    """Run one measurement in a fresh interpreter (own peak RSS) and parse its last JSON line."""
    out = subprocess.run([sys.executable, __file__, *argv, "--child"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "platform")})
    sys.stderr.write(out.stderr[-3000:] if out.returncode else "")
    if out.returncode:
        raise SystemExit(f"benchmark child failed: {argv}")
    for line in reversed(out.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no result from {argv}")


def save(name: str, payload) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["throughput", "time-to-quality", "catalog"])
    p.add_argument("--raw", default=str(DEFAULT_RAW), help="UniSRec Scientific directory")
    p.add_argument("--cache", default="/tmp/seqrec_data", help="where the prepared dataset is cached")
    p.add_argument("--configs", default="sasrec_scientific,bert4rec_scientific")
    p.add_argument("--config", default="sasrec_scientific")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--unpacked-batch", type=int, default=256, help="sequences per step without packing")
    p.add_argument("--no-packing", action="store_true")
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--catalog-items", type=int, default=400_000)
    p.add_argument("--catalog-users", type=int, default=50_000)
    p.add_argument("--model", default="sasrec")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    if args.child:
        fn = {"throughput": one_throughput, "time-to-quality": one_time_to_quality, "catalog": one_catalog}[args.mode]
        print(json.dumps(fn(args)))
        return

    common = ["--raw", args.raw, "--cache", args.cache, "--threads", str(args.threads)]
    if args.mode == "throughput":
        rows = []
        for config in args.configs.split(","):
            for packing in (True, False):
                argv = ["throughput", "--config", config, "--steps", str(args.steps),
                        "--unpacked-batch", str(args.unpacked_batch), *common] + ([] if packing else ["--no-packing"])
                r = sub(argv)
                rows.append(r)
                print(f"{r['model']:9s} packing={str(r['packing']):5s} {r['seq_per_s']:8.0f} seq/s "
                      f"{r['targets_per_s']:8.0f} targets/s  batch padding {r['padding_fraction_batches']:.3f}  "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        pad = rows[0]["padding"]
        print(f"padding fraction (SASRec segments): fixed-length {pad['padding_fixed']:.3f}, "
              f"per-batch {pad['padding_dynamic_batch']:.3f}, packed {pad['padding_packed']:.4f}")
        print(f"-> {save('throughput', rows)}")
    elif args.mode == "time-to-quality":
        r = sub(["time-to-quality", "--config", args.config, "--threshold", str(args.threshold),
                 "--eval-every", str(args.eval_every), *common])
        print(json.dumps({k: v for k, v in r.items() if k != "history"}, indent=2))
        print(f"-> {save('time_to_quality', r)}")
    else:
        r = sub(["catalog", "--catalog-items", str(args.catalog_items), "--catalog-users", str(args.catalog_users),
                 "--steps", str(args.steps), "--model", args.model, "--dim", str(args.dim),
                 "--batch-size", str(args.batch_size), *common])
        print(json.dumps(r, indent=2))
        print(f"peak RSS {r['peak_rss_mb']:.0f} MB for a {r['n_items']}-item catalog ({'OK' if r['peak_rss_mb'] < 8192 else 'OVER'} 8 GB)")
        print(f"-> {save('catalog', r)}")


if __name__ == "__main__":
    main()
