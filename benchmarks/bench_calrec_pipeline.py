"""CALRec's whole pipeline on the CPU, resumable, sized to evaluate >= 1,000 test users.

    python benchmarks/bench_calrec_pipeline.py train --stage1-steps 120 --stage2-steps 60
    python benchmarks/bench_calrec_pipeline.py evaluate --users 1000      # resumable: finished chunks are kept
    python benchmarks/bench_calrec_pipeline.py report --register

train     the `calrec_scientific_smollm2` preset (stage I: Scientific + LC-Rec Scientific, each example's dataset
          drawn ~ |U|^0.3; stage II: Scientific from stage I's checkpoint) with the given steps, validated once at
          the end of each stage; writes <work>/train.json (the staged summary and the arguments).
evaluate  the stage-II checkpoint on the seeded subset of test users that `seqrec evaluate --max-users N` scores,
          chunk by chunk: per chunk one sampling pass (the RNG seeded by the chunk, so a resumed run draws what
          an uninterrupted one would), ranked by QRR-BM25 and by hierarchical matching, and lir_bm25 on the same
          users. Each chunk's per-user ranks and samples are written to <work>/chunks/ (temp file + rename).
report    metrics over the finished chunks (the evaluator's RankingMetrics: full ranking, opt and pes ties), the
          loss curves of both stages, seconds per user; writes benchmarks/results/calrec_pipeline_<time>.json
          and with --register appends a results-registry record.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_calrec_pipeline")
PRESET = "calrec_scientific_smollm2"
VIEWS = ("calrec_qrr_bm25", "calrec_match", "lir_bm25")
SAMPLING_KEYS = ("n_gen", "max_new_tokens", "gen_batch_users", "temperature")


# --------------------------------------------------------------------------------------------------- train
def train(args: argparse.Namespace) -> dict:
    from seqrec.data.dataset import atomic_write_json
    from seqrec.train.staged_loop import load_staged_config, run_staged

    work = Path(args.work).resolve()
    overrides = train_overrides(args, work)
    cfg = load_staged_config(args.config, overrides)
    summary = run_staged(cfg)
    out = {"args": vars(args), "overrides": overrides, "summary": summary}
    atomic_write_json(out, work / "train.json")
    log.info("stage II checkpoint %s; wrote %s", summary["best_checkpoint"], work / "train.json")
    return out


def train_overrides(args: argparse.Namespace, work: Path) -> dict:
    """The preset's overrides: steps, one validation at the end of each stage, the sampling settings."""
    from seqrec.config import parse_overrides

    overrides = {"run.storage_path": str(work / "train"), "run.test": False, "run.name": "calrec_pipeline"}
    for i, steps in enumerate((args.stage1_steps, args.stage2_steps)):
        overrides.update({f"stages.{i}.train.steps": steps, f"stages.{i}.train.eval_every": steps,
                          f"stages.{i}.train.valid_max_rows": args.valid_users,
                          f"stages.{i}.train.warmup_steps": max(1, steps // 10)})
    for key in SAMPLING_KEYS:  # validation samples with the settings the evaluation will use
        if getattr(args, key) is not None:
            overrides[f"model.params.{key}"] = getattr(args, key)
    if args.lm:
        overrides["model.params.lm"] = args.lm
    overrides.update(parse_overrides(args.set))
    return overrides


def read_train(work: Path) -> dict:
    path = work / "train.json"
    if not path.exists():
        raise SystemExit(f"{path} not found: run `bench_calrec_pipeline.py train --work {work}` first")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate_users(args: argparse.Namespace) -> None:
    import torch

    from seqrec.data.dataset import PreparedDataset, atomic_write_json
    from seqrec.eval.baselines import BASELINES
    from seqrec.eval.cli import build_scorer, checkpoint_dataset, seeded_user_subset
    from seqrec.eval.evaluator import EvalSettings, evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()
    checkpoint = args.checkpoint or read_train(work)["summary"]["best_checkpoint"]
    dataset_path = args.dataset or checkpoint_dataset([checkpoint])  # the dataset the checkpoint was validated on
    dataset = PreparedDataset.load(dataset_path)
    rows = seeded_user_subset(dataset.eval_rows("test"), args.users, args.seed)
    params = {k: getattr(args, k) for k in SAMPLING_KEYS if getattr(args, k) is not None}
    model = build_scorer(checkpoint, dataset, params)
    sampling = {k: getattr(model.config, k) for k in SAMPLING_KEYS}
    identity = {"checkpoint": checkpoint, "dataset": dataset_path, "users": len(rows), "seed": args.seed,
                "chunk_users": args.chunk_users, "sampling": sampling}
    chunks = work / "chunks"
    views = {**model.scorers(), "lir_bm25": BASELINES["lir_bm25"].from_dataset(dataset)}
    n_chunks = -(-len(rows) // args.chunk_users)
    for c in range(n_chunks):
        path = chunks / f"{c:04d}.json"
        if path.exists():
            done = json.loads(path.read_text())
            if done["identity"] != identity:
                raise SystemExit(f"{path} was scored with {done['identity']}, not {identity}: use another --work")
            continue
        part = rows.subset(slice(c * args.chunk_users, (c + 1) * args.chunk_users))
        model.reset_samples(seed=args.seed * 100_003 + c)  # this chunk's samples depend on nothing else
        entry = {"identity": identity, "chunk": c, "users": part.user_idx.tolist(), "views": {}}
        for label in VIEWS:  # the QRR view draws the samples; the match view ranks the same (cached) samples
            view = views[label]
            if hasattr(view, "generations"):
                view.generations.clear()
            result = evaluate(view, part, dataset.n_items, EvalSettings())
            entry["views"][label] = {"opt": result.opt_ranks.tolist(), "pes": result.pes_ranks.tolist(),
                                     "seconds": round(result.seconds, 2)}
        entry["generations"] = list(views["calrec_qrr_bm25"].generations)  # n_gen per user, in row order
        atomic_write_json(entry, path)
        s = entry["views"]["calrec_qrr_bm25"]["seconds"]
        log.info("chunk %d/%d: %d users, %.1f s sampling + QRR (%.2f s/user)", c + 1, n_chunks, len(part), s,
                 s / len(part))
    log.info("all %d chunks of %d users scored in %s", n_chunks, len(rows), chunks)


# -------------------------------------------------------------------------------------------------- report
def stage_curves(trained: dict) -> dict:
    """Per stage: the training loss by step and the validation scores, from the run's history.jsonl."""
    from seqrec.plots import HISTORY_FILE, read_history

    curves = {}
    for stage in trained["stages"]:
        history = read_history(Path(stage["run_dir"]) / HISTORY_FILE)
        curves[stage["stage"]] = {
            "loss": [[r["step"], round(float(r["loss"]), 4)] for r in history if r.get("kind") == "train"],
            "valid": [[r["step"], r["metrics"]] for r in history if r.get("kind") == "valid"],
            "train_seconds": stage["train_seconds"], "final_step": stage["final_step"],
            "s_per_step_last": stage["s_per_step_last"], "datasets": [Path(d).name for d in stage["datasets"]]}
    return curves


def report(args: argparse.Namespace) -> dict:
    from seqrec.data.dataset import PreparedDataset
    from seqrec.eval.metrics import RankingMetrics
    from seqrec.retrieval.matching import HierarchicalMatcher, match_level_shares

    work = Path(args.work).resolve()
    train_out = read_train(work) if (work / "train.json").exists() else None  # None: a checkpoint trained elsewhere
    entries = [json.loads(p.read_text()) for p in sorted((work / "chunks").glob("[0-9]*.json"))]
    if not entries:
        raise SystemExit(f"no scored chunks in {work / 'chunks'}: run `bench_calrec_pipeline.py evaluate` first")
    identity = entries[0]["identity"]
    if any(e["identity"] != identity for e in entries):
        raise SystemExit(f"the chunks in {work / 'chunks'} come from different evaluations")
    metrics = {}
    for label in VIEWS:
        acc = RankingMetrics()
        for e in entries:
            acc.update(np.asarray(e["views"][label]["opt"]), np.asarray(e["views"][label]["pes"]))
        metrics[label] = acc.compute()
    n_users = sum(len(e["users"]) for e in entries)
    dataset = PreparedDataset.load(identity["dataset"])
    generations = [g for e in entries for g in e["generations"]]
    shares = match_level_shares(HierarchicalMatcher(dataset.item_texts()), generations)
    sampling_s = sum(e["views"]["calrec_qrr_bm25"]["seconds"] for e in entries)
    result = {"identity": identity, "n_users": n_users, "complete": n_users == identity["users"],
              "metrics": metrics, "match_shares": shares, "seconds_per_user": round(sampling_s / n_users, 2),
              "train_args": train_out and train_out["args"], "overrides": train_out and train_out["overrides"],
              "stages": stage_curves(train_out["summary"]) if train_out else {}}
    for label in VIEWS:
        m = metrics[label]
        print(f"{label:16s} {n_users} users  NDCG@10 opt {m['ndcg@10/opt']:.4f} pes {m['ndcg@10/pes']:.4f}  "
              f"Recall@10 opt {m['recall@10/opt']:.4f} pes {m['recall@10/pes']:.4f}")
    print(f"generations matching an item: {shares['any']:.1%} of {shares['n']}; {result['seconds_per_user']} s/user")
    for name, st in result["stages"].items():
        loss = st["loss"]
        if loss:
            print(f"{name}: {st['final_step']} steps in {st['train_seconds']:.0f} s, loss {loss[0][1]} (step "
                  f"{loss[0][0]}) -> {loss[-1][1]} (step {loss[-1][0]})")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"calrec_pipeline_{time.strftime('%Y%m%d_%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if args.register:
        register(result, out, args.record_id)
    return result


def register(result: dict, source: Path, record_id: str) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results_registry import append_record

    if result["train_args"] is None:
        raise SystemExit("--register: no train.json in the work directory (the record names how the model was trained)")
    if not result["complete"]:
        raise SystemExit(f"--register: {result['n_users']} of {result['identity']['users']} users scored; finish evaluate first")
    m, stages = result["metrics"], result["stages"]
    figures = {
        "ndcg@10/opt": m["calrec_qrr_bm25"]["ndcg@10/opt"], "ndcg@10/pes": m["calrec_qrr_bm25"]["ndcg@10/pes"],
        "recall@10/pes": m["calrec_qrr_bm25"]["recall@10/pes"], "mrr/pes": m["calrec_qrr_bm25"]["mrr/pes"],
        "match/ndcg@10/opt": m["calrec_match"]["ndcg@10/opt"], "match/ndcg@10/pes": m["calrec_match"]["ndcg@10/pes"],
        "lir_bm25/ndcg@10/opt": m["lir_bm25"]["ndcg@10/opt"], "lir_bm25/ndcg@10/pes": m["lir_bm25"]["ndcg@10/pes"],
        "generations_matching_share": result["match_shares"]["any"], "s_per_user": result["seconds_per_user"]}
    for name, st in stages.items():
        figures[f"{name}_s"] = st["train_seconds"]
        figures[f"{name}_steps"] = st["final_step"]
    a = result["train_args"]
    sampling = result["identity"]["sampling"]
    append_record(
        id=record_id, kind="model", title="CALRec (SmolLM2-135M), full pipeline on the CPU",
        command=(f"python benchmarks/bench_calrec_pipeline.py train --stage1-steps {a['stage1_steps']} --stage2-steps "
                 f"{a['stage2_steps']} && python benchmarks/bench_calrec_pipeline.py evaluate --users "
                 f"{result['identity']['users']}"),
        dataset="Scientific", split="test", users=result["n_users"], model="calrec", config=a["config"],
        seeds=None, metrics=figures, source=str(source.resolve().relative_to(ROOT)),
        note=(f"ndcg = calrec_qrr_bm25; {sampling['n_gen']} samples of <= {sampling['max_new_tokens']} tokens per user "
              f"at temperature {sampling['temperature']}; lir_bm25 on the same users"))
    print(f"registered {record_id}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--work", default=str(ROOT / "runs" / "calrec_pipeline"), help="checkpoints, train.json, chunks/")
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--n-gen", type=int, default=None, help="samples per user (default: the preset's)")
    sampling.add_argument("--max-new-tokens", type=int, default=None)
    sampling.add_argument("--gen-batch-users", type=int, default=None, help="users sampled together")
    sampling.add_argument("--temperature", type=float, default=None)

    t = sub.add_parser("train", parents=[common, sampling], help="stage I + stage II")
    t.add_argument("--config", default=PRESET)
    t.add_argument("--lm", default=None, help="smollm2 (the preset's) | tiny | HF name or local directory")
    t.add_argument("--stage1-steps", type=int, required=True)
    t.add_argument("--stage2-steps", type=int, required=True)
    t.add_argument("--valid-users", type=int, default=16, help="validation users at the end of each stage")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="further config overrides")

    e = sub.add_parser("evaluate", parents=[common, sampling], help="score test users chunk by chunk (resumable)")
    e.add_argument("--checkpoint", default=None, help="a CALRec checkpoint (default: train.json's stage II checkpoint)")
    e.add_argument("--dataset", default=None, help="prepared dataset (default: the one the checkpoint was validated on)")
    e.add_argument("--users", type=int, default=1000, help="seeded test-user subset (0: all)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--chunk-users", type=int, default=50)
    e.add_argument("--threads", type=int, default=None)

    r = sub.add_parser("report", parents=[common], help="metrics over the scored chunks")
    r.add_argument("--out", default=None)
    r.add_argument("--register", action="store_true", help="append the figures to the results registry")
    r.add_argument("--record-id", default="model_calrec_pipeline_cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    {"train": train, "evaluate": evaluate_users, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
