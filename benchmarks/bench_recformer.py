"""Recformer at CPU scale: profile a finetuning step, train with the CPU recipe, evaluate on the full test split.

    OMP_NUM_THREADS=1 python benchmarks/bench_recformer.py --train-minutes 14 --seeds 0
    python benchmarks/bench_recformer.py --train-minutes 1 --test-users 200 --zero-shot-users 100   # a smoke run

One process, one thread, no Ray (the staged loop's Ray Train wrapper adds nothing on one core): the same model
(`seqrec.models.recformer`), its own `sample_batch` / `loss` / item-matrix hooks and the shared evaluator
(`seqrec.eval.evaluator.evaluate`, full ranking over all 4,385 items, optimistic and pessimistic ties).

    profile    seconds of: encoding the whole catalog (an item-matrix refresh), one training step (forward +
               backward + AdamW) of mixed lengths and one of length-bucketed batches (`--length-buckets`),
               scoring users
    untrained  the shipped MiniLM as Recformer with zero token-type / item-position tables (exactly the
               encoder): full test split, cold-target users, and the zero-shot catalog
    trained    per seed: finetuning against a frozen item matrix I (the untrained encoder's items: the paper's
               stage 2 from the start) with the lower `--freeze-layers` layers and the embedding tables frozen, so
               the backward pass stops at the first trained layer; validated every `--eval-every` steps on
               `--valid-users` validation users (never test), the best validation state kept; then the same three
               evaluations
Zero-shot: the Scientific-trained model ranks another catalog (the raw Magazine_Subscriptions sample) it never
saw, re-encoding that catalog with its own weights. Prints and writes JSON to
benchmarks/results/recformer_cpu_<time>_lr<lr>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_recformer")


def build(params: dict, dataset):
    from seqrec.models.registry import bind_dataset, build_model

    return bind_dataset(build_model("recformer", params, dataset.n_items), dataset, use_ray=False)


def evaluate_rows(model, rows, n_items) -> dict:
    from seqrec.eval.evaluator import EvalSettings, evaluate

    t0 = time.perf_counter()
    res = evaluate(model, rows, n_items, EvalSettings())
    return {"n_rows": res.n_rows, "seconds": round(time.perf_counter() - t0, 1),
            "metrics": {k: round(float(v), 5) for k, v in res.metrics.items()}}


def freeze_lower(model, n_layers: int) -> int:
    """Freeze word/position embeddings, the two Recformer tables and the lowest n_layers encoder layers; returns
    the number of trainable parameters."""
    if n_layers > 0:
        for p in model.encoder.embeddings.parameters():
            p.requires_grad_(False)
        model.token_type.weight.requires_grad_(False)
        model.item_position.weight.requires_grad_(False)
        for layer in model.encoder.encoder.layer[:n_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def three_evals(model, ds, test_rows, cold_rows, zs_ds, zs_rows, params) -> dict:
    out = {"test": evaluate_rows(model, test_rows, ds.n_items), "cold_target": evaluate_rows(model, cold_rows, ds.n_items)}
    if zs_ds is not None:  # the same weights on a catalog never trained on: its items re-encoded by this model
        from seqrec.models.registry import bind_dataset, build_model

        zs = build_model("recformer", params, zs_ds.n_items)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("item_matrix")}
        zs.load_state_dict(state, strict=False)
        bind_dataset(zs, zs_ds, use_ray=False)
        out["zero_shot"] = evaluate_rows(zs, zs_rows, zs_ds.n_items)
    return out


SHOWN = ("ndcg@10/opt", "ndcg@10/pes", "recall@10/pes", "recall@1/pes", "mrr/pes")


def register(paths: list[str], record_id: str, untrained_id: str | None = None) -> None:
    """Append the untrained and the trained figures of finished runs (one or more result JSONs of the same recipe,
    e.g. one seed each) to the results registry: `untrained_id` (default `<id>_untrained`; left alone when it
    exists, e.g. from a run with another lr) and `record_id` (per-seed means)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results_registry import REGISTRY, append_record, load_records, repeated

    runs = [json.loads(Path(p).read_text()) for p in paths]
    recipes = {json.dumps({k: v for k, v in r["args"].items() if k not in ("seeds", "out", "skip_untrained")},
                          sort_keys=True) for r in runs}
    if len(recipes) != 1:
        raise SystemExit("--register-only: the result files differ in more than their seeds")
    runs.sort(key=lambda r: "test" not in r["untrained"])  # the run with the untrained evaluations first
    first, sources = runs[0], [str(Path(p).resolve().relative_to(ROOT)) for p in paths]
    args = first["args"]

    def figures(entry: dict) -> dict[str, float]:
        out = {k: entry["test"]["metrics"][k] for k in SHOWN}
        out.update({f"{k}[cold]": entry["cold_target"]["metrics"][k] for k in ("ndcg@10/pes", "recall@10/pes")})
        if "zero_shot" in entry:
            out.update({f"{k}[zero-shot]": entry["zero_shot"]["metrics"][k] for k in ("ndcg@10/pes", "recall@10/pes")})
        return out

    recipe = (f"lr {args['lr']:g}, {args['batch_size']} users x <= {args['max_seq_tokens']} tokens a step, "
              f"{args['max_attr_tokens']} tokens per attribute, lower {args['freeze_layers']} layers frozen, "
              f"length buckets {args.get('length_buckets', 1)}, {args['train_minutes']:g} min of one core per seed")
    common = dict(command="python benchmarks/bench_recformer.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in args.items()
        if k not in ("out", "dataset", "zero_shot_dataset", "register_only", "record_id", "untrained_id", "skip_untrained")),
        dataset="Scientific", split="test", users=first["n_test_users"], model="recformer", source=sources)
    untrained_id = untrained_id or f"{record_id}_untrained"
    if untrained_id not in load_records(REGISTRY):
        append_record(id=untrained_id, kind="ablation", title="MiniLM as Recformer, untrained",
                      metrics=figures(first["untrained"]), seeds=None,
                      note=f"the encoder before any training; {first['n_cold_target']} cold-target users; zero-shot: "
                           f"{first['zero_shot_catalog']} ({first['zero_shot_users']} users)", **common)
    seeds = {k: v for r in runs for k, v in r["seeds"].items()}
    per_seed = {k: {**figures(v), "valid/ndcg@10/pes": v["best_valid_ndcg10_pes"]} for k, v in seeds.items()}
    metrics = {m: repeated({sd: f[m] for sd, f in per_seed.items()}) for m in per_seed[next(iter(per_seed))]}
    metrics["steps"] = repeated({sd: float(v["steps"]) for sd, v in seeds.items()})
    metrics["epochs"] = repeated({sd: float(v["epochs"]) for sd, v in seeds.items()})
    append_record(id=record_id, kind="model", title=f"trained on one core ({recipe})", metrics=metrics,
                  seeds=sorted(int(k) for k in seeds),
                  note=f"best validation state ({args['valid_users']} seeded validation users) of each seed; frozen item matrix", **common)
    print(f"registered {record_id} ({len(seeds)} seeds); untrained: {untrained_id}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(ROOT / "runs" / "data" / "Scientific"))
    p.add_argument("--zero-shot-dataset", default=str(ROOT / "runs" / "data" / "raw_sample"),
                   help="a prepared catalog never trained on ('' skips)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--train-minutes", type=float, default=14.0, help="training wall time per seed")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--max-seq-tokens", type=int, default=64)
    p.add_argument("--max-attr-tokens", type=int, default=32, help="paper: 32; at 16, truncated titles make ~140 items textually identical (score ties)")
    p.add_argument("--length-buckets", type=int, default=8,
                   help="batches drawn together and grouped by input length (1: mixed lengths, padded)")
    p.add_argument("--freeze-layers", type=int, default=3, help="lowest encoder layers frozen (MiniLM has 6)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--valid-users", type=int, default=500)
    p.add_argument("--test-users", type=int, default=0, help="0: every test user")
    p.add_argument("--zero-shot-users", type=int, default=0, help="0: every test user of the zero-shot catalog")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--skip-untrained", action="store_true",
                   help="leave out the untrained test / cold-target / zero-shot evaluations (another run has them)")
    p.add_argument("--register-only", nargs="+", metavar="JSON",
                   help="append finished result files (one recipe, e.g. one seed each) to the results registry")
    p.add_argument("--record-id", default="model_recformer_cpu", help="registry id for --register-only")
    p.add_argument("--untrained-id", default=None, help="registry id of the untrained figures (default <record-id>_untrained)")
    args = p.parse_args()
    if args.register_only:
        register(args.register_only, args.record_id, args.untrained_id)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    from seqrec.data.dataset import PreparedDataset, atomic_write_json
    from seqrec.eval.cli import select_users

    ds = PreparedDataset.load(args.dataset)
    params = {"encoder": "minilm", "max_seq_tokens": args.max_seq_tokens, "max_attr_tokens": args.max_attr_tokens,
              "max_items": 50, "temperature": args.temperature, "objective": "finetune", "item_refresh_every": 0,
              "encode_batch_size": 128, "score_batch_size": 64}
    all_test = ds.eval_rows("test")
    test_rows = all_test
    if args.test_users and args.test_users < len(all_test):
        test_rows = all_test.subset(np.sort(np.random.default_rng(0).choice(len(all_test), args.test_users, replace=False)))
    cold_rows = select_users(ds, all_test, "cold-target")
    valid_all = ds.eval_rows("valid")
    valid_rows = valid_all.subset(np.sort(np.random.default_rng(0).permutation(len(valid_all))[: args.valid_users]))
    zs_ds = zs_rows = None
    if args.zero_shot_dataset:
        zs_ds = PreparedDataset.load(args.zero_shot_dataset)
        zs_rows = zs_ds.eval_rows("test")
        if args.zero_shot_users and args.zero_shot_users < len(zs_rows):
            zs_rows = zs_rows.subset(np.arange(args.zero_shot_users))
    result = {"args": vars(args), "params": params, "host": platform.node(), "threads": args.threads,
              "n_test_users": len(test_rows), "n_cold_target": len(cold_rows), "n_valid": len(valid_rows),
              "zero_shot_catalog": zs_ds.name if zs_ds is not None else None,
              "zero_shot_users": len(zs_rows) if zs_rows is not None else 0, "seeds": {}}
    stamp = time.strftime("%Y%m%d_%H%M%S")
    out_path = Path(args.out) / f"recformer_cpu_{stamp}_lr{args.lr:g}.json"

    def save() -> None:
        atomic_write_json(result, out_path)

    # ---------------------------------------------------------------- profile + the untrained encoder
    base = build(params, ds)
    t0 = time.perf_counter()
    base.refresh_item_matrix()
    refresh_s = time.perf_counter() - t0
    frozen_matrix = base.item_matrix.clone()
    probe = copy.deepcopy(base)
    trainable = freeze_lower(probe, args.freeze_layers)
    opt = torch.optim.AdamW([q for q in probe.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.01)
    probe.train()
    seqs = [ds.train_sequences()]
    corpus = probe.prepare_corpus(ds)
    rng = np.random.default_rng(123)

    def timed_steps(batches) -> tuple[float, ...]:
        """Median forward, backward, AdamW seconds, real tokens and padded slots over the batches."""
        out = []
        for batch in batches:
            t0 = time.perf_counter()
            loss = probe.loss(batch)
            t1 = time.perf_counter()
            opt.zero_grad()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            out.append((t1 - t0, t2 - t1, time.perf_counter() - t2, int(batch["attention_mask"].sum()),
                        batch["attention_mask"].numel()))
        return tuple(float(x) for x in np.median(np.asarray(out), axis=0))

    mixed = timed_steps([probe.sample_batch([(corpus, seqs[0], args.batch_size, 0)], rng) for _ in range(3)])
    bucketed = timed_steps(probe.sample_bucketed([(corpus, seqs[0], args.batch_size, 0)], rng, max(3, args.length_buckets)))
    del probe, opt
    fwd, bwd, upd, tok, slots = mixed
    val0 = evaluate_rows(base, valid_rows, ds.n_items)
    result["profile"] = {"item_matrix_refresh_s": round(refresh_s, 1), "n_items": ds.n_items,
                         "step_forward_s": round(float(fwd), 3), "step_backward_s": round(float(bwd), 3),
                         "step_optimizer_s": round(float(upd), 3), "step_tokens": int(tok),
                         "step_padded_slots": int(slots),
                         "bucketed_step_s": round(sum(bucketed[:3]), 3), "mixed_step_s": round(fwd + bwd + upd, 3),
                         "bucketed_padded_slots": int(bucketed[4]),
                         "trainable_params": int(trainable), "batch_size": args.batch_size,
                         "score_s_per_user": round(val0["seconds"] / max(1, val0["n_rows"]), 4)}
    log.info("profile %s", result["profile"])
    result["untrained"] = {"valid": val0}
    save()
    if not args.skip_untrained:  # seed-independent: one of several parallel seed runs need not repeat it
        result["untrained"].update(three_evals(base, ds, test_rows, cold_rows, zs_ds, zs_rows, params))
    log.info("untrained %s", {k: v["metrics"].get("ndcg@10/pes") for k, v in result["untrained"].items()})
    save()

    # ------------------------------------------------------------------------------- training per seed
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        torch.manual_seed(seed)
        model = copy.deepcopy(base)
        model.item_matrix.copy_(frozen_matrix)  # I: the untrained items, frozen (item_refresh_every 0)
        freeze_lower(model, args.freeze_layers)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.01)
        warmup = 20
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        curve, best = [], {"score": val0["metrics"]["ndcg@10/pes"], "step": 0, "state": copy.deepcopy(model.state_dict())}
        t_start, step, win = time.perf_counter(), 0, []
        train_s = 0.0
        while step < args.max_steps and train_s < args.train_minutes * 60:
            t0 = time.perf_counter()
            model.train()
            model.before_step(step)
            if step % args.length_buckets == 0:  # the next `length_buckets` batches, grouped by input length
                pool = model.sample_bucketed([(corpus, seqs[0], args.batch_size, 0)],
                                             np.random.default_rng([seed, step // args.length_buckets]), args.length_buckets)
            batch = pool[step % args.length_buckets]
            loss = model.loss(batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
            opt.step()
            sched.step()
            step += 1
            train_s += time.perf_counter() - t0
            win.append(float(loss.detach()))
            if step % args.eval_every == 0:
                val = evaluate_rows(model, valid_rows, ds.n_items)
                score = val["metrics"]["ndcg@10/pes"]
                curve.append({"step": step, "loss": round(float(np.mean(win)), 4), "valid_ndcg10_pes": score,
                              "train_s": round(train_s, 1)})
                win = []
                log.info("seed %d step %d loss %.4f valid ndcg@10 pes %.4f (train %.0fs)", seed, step,
                         curve[-1]["loss"], score, train_s)
                if score > best["score"]:
                    best = {"score": score, "step": step, "state": copy.deepcopy(model.state_dict())}
        model.load_state_dict(best["state"])
        entry = {"steps": step, "train_s": round(train_s, 1), "wall_s": round(time.perf_counter() - t_start, 1),
                 "s_per_step": round(train_s / max(1, step), 3), "examples": step * args.batch_size,
                 "epochs": round(step * args.batch_size / max(1, sum(len(s) - 1 for s in seqs[0] if len(s) >= 2)), 3),
                 "best_step": best["step"], "best_valid_ndcg10_pes": best["score"], "curve": curve}
        entry.update(three_evals(model, ds, test_rows, cold_rows, zs_ds, zs_rows, params))
        result["seeds"][str(seed)] = entry
        log.info("seed %d trained %s", seed, {k: v["metrics"].get("ndcg@10/pes") for k, v in entry.items()
                                               if isinstance(v, dict) and "metrics" in v})
        save()
    trained = [e["test"]["metrics"]["ndcg@10/pes"] for e in result["seeds"].values()]
    if trained:
        result["summary"] = {"trained_test_ndcg10_pes": trained, "trained_mean": round(float(np.mean(trained)), 5),
                             "trained_spread": round(float(np.max(trained) - np.min(trained)), 5)}
        if "test" in result["untrained"]:
            result["summary"]["untrained_test_ndcg10_pes"] = result["untrained"]["test"]["metrics"]["ndcg@10/pes"]
    save()
    print(json.dumps({k: v for k, v in result.items() if k not in ("seeds",)}, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
