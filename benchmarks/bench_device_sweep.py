"""Bert4Rec vs Flare T+ID random search on one accelerator, without Ray (the GPU lease machine has no Ray).

Why a separate script: on the 2-core CPU machine one 1,000-step Flare run takes ~40 min, so the Scientific grid
cannot be searched there; a lent GPU machine has torch but no Ray (and nothing can be installed beyond ~64 MiB
of carried wheels). Each trial is the same training as `seqrec train` on one worker: the same model classes,
config files and overrides, packed batches (train.loop.BatchStream), optimizer, schedule and step
(train.loop.setup_training / optimizer_step, bf16 autocast on CUDA as the Ray loop uses), validation with the
shared evaluator every `eval_every` steps, early stopping on `patience`, and test metrics of the best-validation
weights. Only the Ray plumbing (workers, checkpoints, reports) is absent.

Fairness: both models get the same number of trials and each sampled setting of the shared hyperparameters
(size, dropout, masking, lr, weight decay, steps) is run once as Bert4Rec and once as Flare (plus Flare's own
text-path settings). Selection is on validation NDCG@10 (pessimistic), then the top settings per model are rerun
on more seeds and the final pick is the best mean validation score. Test figures are reported, never used.

    # here (CPU machine): a bundle with the prepared Scientific data and MiniLM weights in float16 (fits the
    # 64 MiB a device call may carry; the sweep casts them back to float32 before encoding)
    python benchmarks/bench_device_sweep.py bundle --out runs/device_bundle
    # on the device machine
    python benchmarks/bench_device_sweep.py sweep --bundle runs/device_bundle --out $OUT --budget-s 420

Results: <out>/sweep.json (every trial: params, validation curve, best step, valid and test metrics) and the best
checkpoint per model under <out>/best_<model>.tar (safetensors + JSON config, `seqrec evaluate --checkpoint`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
DEFAULT_RAW = Path(os.environ.get("SEQREC_SHARED_DATA", ROOT.parent / "shared" / "data")) / "Scientific"
ENCODER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

# The shared grid (both models), around the CPU-tuned settings this sweep started from (dim 192, 1 layer,
# dropout 0.2, mask 0.2, last-only 0.3, lr 3.2e-4 / 5e-4).
SHARED_GRID: dict[str, list[Any]] = {
    "dim": [128, 192, 256],
    "layers": [1, 2],
    "dropout": [0.1, 0.2, 0.3, 0.5],
    "mask_prob": [0.15, 0.2, 0.3, 0.4],
    "last_only_prob": [0.1, 0.3],
    "lr": [3e-4, 5e-4, 1e-3, 2e-3],
    "weight_decay": [0.01, 0.0288, 0.1],
    "steps": [1000, 2000, 3000],
}
# Flare's text path only (FLARE Table 3 ranges and the CPU findings: alpha 0.3, text_norm 0.25)
FLARE_GRID: dict[str, list[Any]] = {
    "alpha": [0.2, 0.3, 0.5],
    "text_norm": [None, 0.15, 0.25, 0.4],
    "tau": [0.1, 0.3],
    "perceiver_layers": [1, 2],
    "perceiver_latents": [2, 4],
    "id_dropout": [0.0, 0.05],
}
BASE_CONFIG = {"bert4rec": "bert4rec_scientific", "flare": "flare_tid_scientific"}
# The sweep compares training recipes, so both models score without the text-similarity prior (a scoring setting
# of either model, chosen afterwards: models/text_prior.py)
BASE_OVERRIDES = {"bert4rec": {"model.params.text_prior_weight": 0.0}, "flare": {"model.params.text_prior_weight": 0.0}}


# ------------------------------------------------------------------------------------------------- bundle
def make_bundle(args) -> None:
    """Prepared Scientific (no feature cache: it is re-encoded there) + float16 MiniLM."""
    import torch

    from seqrec.data.unisrec import prepare_unisrec
    from seqrec.features.encoder import resolve_encoder_path

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    prepare_unisrec(Path(args.raw), out / "Scientific")
    copy_encoder(Path(resolve_encoder_path("minilm")), out / "minilm_fp16", torch.float16)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"bundle {out}: {size / 2**20:.1f} MiB")


def float32_encoder(bundle: Path, where: Path) -> Path:
    """The bundle's float16 MiniLM cast back to float32 (the encoder runs in float32 as on the CPU)."""
    import torch

    return copy_encoder(bundle / "minilm_fp16", where, torch.float32)


def copy_encoder(src: Path, dst: Path, dtype) -> Path:
    """The encoder directory `src` (tokenizer, config, weights) copied to `dst` with floating weights cast to `dtype`."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for name in ENCODER_FILES:
        shutil.copy(src / name, dst / name)
    weights = load_file(str(src / "model.safetensors"))
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}, str(dst / "model.safetensors"))
    return dst


# ------------------------------------------------------------------------------------------------- trials
def sample_trials(n: int, seed: int) -> list[dict[str, Any]]:
    """n shared settings, each as a Bert4Rec and a Flare trial; trial pair 0 is the shipped presets (BASE_CONFIG)."""
    rng = random.Random(seed)
    trials = [{"model": "bert4rec", "overrides": {}, "key": "b-shipped"},
              {"model": "flare", "overrides": {}, "key": "f-shipped"}]
    seen = set()
    while len(trials) < 2 * n:
        shared = {k: rng.choice(v) for k, v in SHARED_GRID.items()}
        text = {k: rng.choice(v) for k, v in FLARE_GRID.items()}
        key = json.dumps(shared, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        i = len(trials) // 2
        trials.append({"model": "bert4rec", "overrides": shared_overrides(shared), "key": f"b{i}"})
        trials.append({"model": "flare", "overrides": {**shared_overrides(shared),
                                                       **{f"model.params.{k}": v for k, v in text.items()}},
                       "key": f"f{i}"})
    return trials


def shared_overrides(p: dict[str, Any]) -> dict[str, Any]:
    out = {f"model.params.{k}": p[k] for k in ("dim", "layers", "mask_prob", "last_only_prob")}
    out["model.params.hidden"] = 4 * p["dim"]
    out["model.params.dropout"] = out["model.params.attn_dropout"] = p["dropout"]
    out.update({"train.lr": p["lr"], "train.weight_decay": p["weight_decay"], "train.steps": p["steps"]})
    return out


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run on the device, as the Ray worker loop runs it; returns its record."""
    import torch

    from seqrec.config import load_config
    from seqrec.data.dataset import PreparedDataset
    from seqrec.eval.cli import select_users
    from seqrec.eval.evaluator import EvalSettings, evaluate
    from seqrec.models.registry import bind_dataset, build_model
    from seqrec.train.checkpoint import save_model_files
    from seqrec.train.config import ExperimentConfig
    from seqrec.train.loop import BatchStream, averaged, experiment_meta, optimizer_step, setup_training, start_ema

    torch.set_num_threads(spec.get("threads", 1))  # many trials share the device machine's cores
    t_start = time.perf_counter()
    overrides = {**BASE_OVERRIDES[spec["model"]], **spec["overrides"], **spec.get("extra", {}), "train.seed": spec["seed"]}
    if spec["model"] == "flare":  # the encoder decoded here; no LC-Rec category source (no training critiques)
        overrides.update({"model.params.encoder": spec["encoder"], "model.params.category_source": None})
    cfg = load_config(ExperimentConfig, BASE_CONFIG[spec["model"]], "train", overrides=overrides)
    tc = cfg.train
    device = torch.device(spec["device"])
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    dataset = PreparedDataset.load(spec["dataset"])
    model = build_model(cfg.model.name, cfg.model.params, dataset.n_items)
    bind_dataset(model, dataset, use_ray=False)
    torch.manual_seed(tc.seed + 1000)
    model.to(device)
    state = {"step": 0}
    ema = start_ema(model, tc.ema_decay, None)
    optimizer, scheduler, engine, train_module = setup_training(model, tc, cfg.scaling, 1, device, None, state)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    valid_rows = dataset.eval_rows("valid")
    stream = iter(BatchStream(dataset.train_sequences(), model, tc, 0))
    curve, best, best_step, best_state, since = [], -math.inf, 0, None, 0
    stopped = "steps"
    train_s = 0.0
    model.train()
    for step in range(1, tc.steps + 1):
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
        optimizer_step(batch, model, train_module, optimizer, scheduler, engine, tc.grad_clip, autocast)
        if ema is not None:
            ema.update(model)
        train_s += time.perf_counter() - t0
        if step % tc.eval_every and step != tc.steps:
            continue
        with averaged(ema, model):  # with train.ema_decay: the weight average is validated and kept
            score = float(evaluate(model, valid_rows, dataset.n_items, EvalSettings(), device).metrics[tc.eval_metric])
            model.train()
            if score > best:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        curve.append([step, round(score, 5)])
        if score > best:
            best, best_step, since = score, step, 0
        else:
            since += 1
        if tc.patience and since >= tc.patience:
            stopped = "patience"
            break
        if time.time() > spec["deadline"]:
            stopped = "deadline"
            break
    model.load_state_dict(best_state)
    record = {"key": spec["key"], "model": spec["model"], "seed": tc.seed, "overrides": spec["overrides"],
              "curve": curve, "best_step": best_step, "stopped": stopped, "steps_run": step,
              "s_per_step": round(train_s / max(step, 1), 4), "wall_s": 0.0}
    test_rows = dataset.eval_rows("test")
    for split, rows in (("valid", valid_rows), ("test", test_rows)):
        record[split] = evaluate(model, rows, dataset.n_items, EvalSettings(), device).metrics
    cold = select_users(dataset, test_rows, "cold-target")
    record["test_cold"] = evaluate(model, cold, dataset.n_items, EvalSettings(), device).metrics
    record["test_cold"]["users"] = len(cold)
    if spec.get("save_dir"):
        out = Path(spec["save_dir"]) / f"{spec['key']}_s{tc.seed}"
        save_model_files(model.cpu(), out, experiment_meta(cfg, model, dataset.n_items))
        record["checkpoint"] = str(out)
    record["wall_s"] = round(time.perf_counter() - t_start, 1)
    return record


# -------------------------------------------------------------------------------------------------- sweep
def sweep(args) -> None:
    import multiprocessing as mp

    import torch

    from seqrec.config import parse_overrides
    from seqrec.data.dataset import PreparedDataset
    from seqrec.features.cache import dataset_features

    t0 = time.time()
    deadline = t0 + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle).resolve()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.workdir)
    dataset_dir = work / "Scientific"
    if dataset_dir.exists():
        shutil.rmtree(dataset_dir)
    shutil.copytree(bundle / "Scientific", dataset_dir)  # the carried copy may be read-only: features go here
    encoder = float32_encoder(bundle, work / "minilm")
    dataset = PreparedDataset.load(dataset_dir)
    te = time.perf_counter()
    feats = dataset_features(dataset, str(encoder), 64, use_ray=False)  # in-process, on the GPU when present
    encode_s = time.perf_counter() - te
    info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
            "encode_items": int(feats.tokens.shape[0]), "encode_s": round(encode_s, 1),
            "encode_items_per_s": round(feats.tokens.shape[0] / encode_s, 1), "workers": args.workers,
            "budget_s": args.budget_s}
    print(json.dumps(info), flush=True)
    common = {"dataset": str(dataset_dir), "encoder": str(encoder), "device": device, "deadline": deadline,
              "save_dir": str(work / "ckpt"), "extra": parse_overrides(args.set)}
    records: list[dict[str, Any]] = []

    def dump() -> None:
        (out / "sweep.json").write_text(json.dumps({"info": info, "trials": records}, indent=1))

    def run_phase(specs: list[dict[str, Any]], stop_at: float) -> None:
        queue = list(specs)
        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            running = {}
            while queue or running:
                while queue and len(running) < args.workers and time.time() < stop_at:
                    spec = queue.pop(0)
                    running[pool.submit(run_trial, {**common, **spec})] = spec  # spec's deadline wins
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    spec = running.pop(fut)
                    try:
                        rec = fut.result()
                    except Exception as e:  # one bad setting must not lose the sweep
                        rec = {"key": spec["key"], "model": spec["model"], "seed": spec["seed"], "error": repr(e)}
                    rec["phase"] = spec["phase"]
                    records.append(rec)
                    v = rec.get("valid", {}).get("ndcg@10/pes", float("nan"))
                    t = rec.get("test", {}).get("ndcg@10/pes", float("nan"))
                    print(f"[{time.time() - t0:5.0f}s] {rec['key']} seed {rec['seed']}: valid {v:.4f} test {t:.4f} "
                          f"best@{rec.get('best_step')} {rec.get('stopped', rec.get('error'))} "
                          f"{rec.get('s_per_step', 0):.3f}s/step", flush=True)
                    dump()

    trials = sample_trials(args.trials, args.seed)
    phase1_stop = t0 + args.budget_s * args.phase1_share
    # a phase-1 trial still running well past the phase's end is cut (and not ranked), so phase 2 gets its time
    phase1_cut = t0 + args.budget_s * min(1.0, args.phase1_share + 0.25)
    run_phase([{**t, "seed": seed, "phase": 1, "deadline": phase1_cut} for t in trials for seed in args.seeds],
              phase1_stop)
    # phase 2: the top settings per model on more seeds (ranked on phase-1 validation)
    finals = []
    for model in ("bert4rec", "flare"):
        ok = [r for r in records if r["model"] == model and "valid" in r and r["stopped"] != "deadline"]
        ok.sort(key=lambda r: -r["valid"]["ndcg@10/pes"])
        finals += [{"model": model, "key": r["key"], "overrides": r["overrides"], "seed": s, "phase": 2}
                   for r in ok[: args.top] for s in args.more_seeds]
    run_phase(finals, deadline)
    summary = summarize(records)
    info["total_s"] = round(time.time() - t0, 1)
    (out / "sweep.json").write_text(json.dumps({"info": info, "summary": summary, "trials": records}, indent=1))
    print(json.dumps(summary, indent=1), flush=True)
    for model, pick in summary["selected"].items():  # the selected setting's best seed on validation
        ckpt = pick.get("checkpoint")
        if ckpt and Path(ckpt).exists():
            with tarfile.open(out / f"best_{model}.tar", "w") as tar:
                tar.add(ckpt, arcname=Path(ckpt).name)


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: settings ranked by mean validation NDCG@10 (pes) over their seeds; the selected one's test."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if "valid" in r and r["stopped"] != "deadline":  # a run cut short is not its setting's result
            by_key.setdefault(r["key"], []).append(r)
    out: dict[str, Any] = {"selected": {}, "ranking": {}}
    for model in ("bert4rec", "flare"):
        rows = []
        for key, rs in by_key.items():
            if rs[0]["model"] != model:
                continue
            mean = lambda split, m: float(np.mean([r[split][m] for r in rs]))  # noqa: E731
            rows.append({"key": key, "seeds": [r["seed"] for r in rs], "overrides": rs[0]["overrides"],
                         "valid_ndcg10": round(mean("valid", "ndcg@10/pes"), 5),
                         "test_ndcg10": round(mean("test", "ndcg@10/pes"), 5),
                         "test_ndcg10_opt": round(mean("test", "ndcg@10/opt"), 5),
                         "test_recall10": round(mean("test", "recall@10/pes"), 5),
                         "test_recall10_opt": round(mean("test", "recall@10/opt"), 5),
                         "test_recall1": round(mean("test", "recall@1/pes"), 5),
                         "test_mrr": round(mean("test", "mrr/pes"), 5),
                         "test_ndcg10_per_seed": [round(r["test"]["ndcg@10/pes"], 5) for r in rs],
                         "cold_recall10": round(mean("test_cold", "recall@10/pes"), 5)})
        # a setting seen on more seeds wins ties of the mean; single-seed settings rank after the rerun ones
        rows.sort(key=lambda r: (len(r["seeds"]) < 2, -r["valid_ndcg10"]))
        out["ranking"][model] = rows[:10]
        if rows:
            best = rows[0]
            seed_runs = sorted(by_key[best["key"]], key=lambda r: -r["valid"]["ndcg@10/pes"])
            out["selected"][model] = {**best, "checkpoint": seed_runs[0].get("checkpoint")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    b = sub.add_parser("bundle", help="prepare the data + float16 encoder bundle to carry to the device")
    b.add_argument("--raw", default=str(DEFAULT_RAW))
    b.add_argument("--out", default=str(ROOT / "runs" / "device_bundle"))
    s = sub.add_parser("sweep", help="run the random search on this machine's accelerator")
    s.add_argument("--bundle", default=str(ROOT / "runs" / "device_bundle"))
    s.add_argument("--out", required=True)
    s.add_argument("--workdir", default="/tmp/seqrec_sweep")
    s.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole sweep")
    s.add_argument("--phase1-share", type=float, default=0.6, help="share of the budget for new settings")
    s.add_argument("--trials", type=int, default=40, help="shared settings (each run as Bert4Rec and as Flare)")
    s.add_argument("--workers", type=int, default=14, help="trials training at once on the one device")
    s.add_argument("--top", type=int, default=3, help="settings per model rerun on more seeds")
    s.add_argument("--more-seeds", type=int, nargs="*", default=[2, 3])
    s.add_argument("--seeds", type=int, nargs="+", default=[1], help="seeds of every phase-1 trial")
    s.add_argument("--seed", type=int, default=0, help="seed of the random search")
    s.add_argument("--set", action="append", default=[],
                   help="key=value override applied to every trial last (e.g. train.steps=4 for a smoke run)")
    args = parser.parse_args()
    {"bundle": make_bundle, "sweep": sweep}[args.kind](args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
