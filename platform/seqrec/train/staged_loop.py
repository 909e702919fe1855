"""Staged training on Ray Train for the text models: CALRec's two-stage finetuning (CALRec 3.4) and Recformer's
pretraining + two-stage finetuning (Recformer 3.3-3.4), with the same DDP / DeepSpeed strategies as the ID
models (`seqrec.train.loop`, whose optimizer, schedule, DeepSpeed and checkpoint helpers are reused).

    every stage  examples drawn from one or more prepared datasets, a dataset with |U| training users being
                 picked with probability |U|^p / sum_d |U_d|^p (CALRec: p = 0.3, flattens the category mix)
    stage k > 1  starts from stage k-1's best checkpoint (weights only: fresh optimizer, schedule and step
                 count); `model_params` changes the model's config for that stage (Recformer: its objective)
    at the end   the last stage's best checkpoint is evaluated on a seeded subset of test users, beside
                 `test_baselines` (`seqrec.eval.cli.run_evaluation`, the shared evaluator)

CALRec: stage 1 multi-category, stage 2 category-specific. Recformer: a pretraining stage (MLM + item-item
contrastive) on other datasets, validated on the target dataset (`validation`), then finetuning stage 1 (item
matrix re-encoded as it trains) and stage 2 (item matrix frozen).

Where this departs from `train.loop`: examples are sampled, not packed. Every rank reads the (small) prepared
datasets itself and draws example i of step s from an RNG seeded by (seed, rank, step), so a resumed run
replays the same examples without any stream state; the model sees one user per row (padding is cheap next to
a language model's cost, and the contrastive terms need one user per row anyway).

The model supplies the model-specific parts through these methods (CALRec and Recformer have them):
    prepare_corpus(dataset) -> corpus            once per dataset and rank (tokenised item texts)
    sample_batch([(corpus, sequences, n, d)], rng) -> batch dict with an attention_mask
    before_step(step)                            optional, every rank (Recformer: refresh its item matrix)
    before_validation(distributed)               optional, every rank (CALRec: drop cached samples)

A config has the experiment sections of `train.config` except `data`/`train`, which move into `stages`:

    name: calrec_tiny
    model: {name: calrec, params: {...CALRecConfig}}
    stages:
      - {name: stage1, datasets: [{unisrec_dir: ...}, {lcrec_dir: ...}], train: {...TrainConfig}}
      - {name: stage2, datasets: [{unisrec_dir: ...}], train: {...}, model_params: {...}}
    scaling: {...}; run: {...}; eval_max_users: 64; test_baselines: [lir_bm25]
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqrec.config import from_dict, parse_overrides, read_yaml, resolve_config_path
from seqrec.train.config import ModelSection, RunSection, ScalingSection, TrainConfig

log = logging.getLogger(__name__)
SCORE_KEY = "val_score"


@dataclass
class StageData:
    """One dataset: a prepared directory, or raw files prepared into cache_dir on first use."""

    path: str | None = None
    unisrec_dir: str | None = None
    lcrec_dir: str | None = None  # LC-Rec JSON, prepared with CALRec's word truncation
    amazon2018_dir: str | None = None  # raw Amazon 2018 reviews + meta (default pipeline options)
    demo: dict[str, Any] | None = None  # seqrec.data.demo.DemoOptions fields
    name: str | None = None  # the cache sub-directory (default: the raw directory's name)
    cache_dir: str = "runs/data"


@dataclass
class Stage:
    name: str = "stage"
    enabled: bool = True  # false skips the stage (ablations: no pretraining, no stage 2)
    datasets: list[StageData] = field(default_factory=list)
    eval_dataset: int = 0  # index in `datasets` used for validation (and test after the last stage)
    validation: StageData | None = None  # validate on this dataset instead (not trained on: Recformer pretraining)
    sampling_power: float = 0.3  # dataset d sampled with probability |U_d|^power (CALRec: 0.3)
    model_params: dict[str, Any] = field(default_factory=dict)  # this stage's changes to model.params
    train: TrainConfig = field(default_factory=TrainConfig)  # packing fields are unused here


@dataclass
class StagedExperimentConfig:
    name: str = "staged"
    model: ModelSection = field(default_factory=lambda: ModelSection(name="calrec"))
    stages: list[Stage] = field(default_factory=list)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    eval_max_users: int | None = 64  # test users evaluated after the last stage (None: all; generation is slow)
    eval_seed: int = 0
    test_baselines: list[str] = field(default_factory=lambda: ["lir_bm25"])  # evaluated beside the model

    def stage_params(self, index: int) -> dict[str, Any]:
        return {**self.model.params, **self.stages[index].model_params}


# ------------------------------------------------------------------------------------------------ config
def is_staged_config(name_or_path: str) -> bool:
    return "stages" in read_yaml(resolve_config_path(name_or_path, "train"))


def load_staged_config(name_or_path: str, overrides: dict[str, Any] | None = None) -> StagedExperimentConfig:
    """Like `seqrec.config.load_config`, and a numeric key indexes a list: `stages.1.train.steps=50`."""
    data = read_yaml(resolve_config_path(name_or_path, "train"))
    for dotted, value in (overrides or {}).items():
        node: Any = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value
    cfg = from_dict(StagedExperimentConfig, data)
    if not cfg.stages:
        raise ValueError(f"{name_or_path}: a staged config needs at least one stage")
    from seqrec.models.registry import MODELS

    if cfg.model.name not in MODELS or not hasattr(MODELS[cfg.model.name][0], "sample_batch"):
        staged = sorted(n for n, (cls, _) in MODELS.items() if hasattr(cls, "sample_batch"))
        raise ValueError(f"{name_or_path}: model.name {cfg.model.name!r} does not train in stages; one of {staged}")
    for i, st in enumerate(cfg.stages):
        if not st.datasets:
            raise ValueError(f"stages[{i}] has no datasets")
        if not 0 <= st.eval_dataset < len(st.datasets):
            raise ValueError(f"stages[{i}].eval_dataset {st.eval_dataset} out of range")
        if st.train.ema_decay is not None:  # the staged loop keeps no weight average: refuse rather than ignore
            raise ValueError(f"stages[{i}].train.ema_decay: weight averaging is implemented for the ID/Flare loop only")
        if st.train.refit or st.train.stop_step is not None:  # likewise for the refit protocol
            raise ValueError(f"stages[{i}].train: fit_on / stop_step are implemented for the ID/Flare loop only")
        if st.train.length_buckets > 1 and not hasattr(MODELS[cfg.model.name][0], "sample_bucketed"):
            raise ValueError(f"stages[{i}].train.length_buckets: {cfg.model.name} draws no length-bucketed batches")
    return cfg


def resolve_data(d: StageData) -> str:
    """The prepared directory of a dataset entry, preparing it (once) if needed."""
    kinds = ("path", "unisrec_dir", "lcrec_dir", "amazon2018_dir", "demo")
    given = [k for k in kinds if getattr(d, k) is not None]
    if len(given) != 1:
        raise ValueError(f"a dataset entry needs exactly one of {', '.join(kinds)}; got {given or 'none'}")
    if d.path:
        return str(Path(d.path).resolve())
    raw = Path(d.unisrec_dir or d.lcrec_dir or d.amazon2018_dir or "demo")
    name = d.name or (f"{raw.name}_lcrec_calrec" if d.lcrec_dir else raw.name)
    out = Path(d.cache_dir).resolve() / name
    if not (out / "meta.json").exists():
        if d.unisrec_dir:
            from seqrec.data.unisrec import prepare_unisrec

            prepare_unisrec(raw, out)
        elif d.lcrec_dir:
            from seqrec.data.lcrec import LCRecOptions, prepare_lcrec

            prepare_lcrec(raw, out, LCRecOptions(calrec_truncation=True))
        elif d.amazon2018_dir:
            from seqrec.data.amazon2018 import find_raw_files, prepare_amazon2018

            reviews, meta = find_raw_files(raw)
            prepare_amazon2018(reviews, meta, out)
        else:
            from seqrec.data.demo import DemoOptions, generate_demo

            generate_demo(out, from_dict(DemoOptions, dict(d.demo), where="demo"))
    return str(out)


def sampling_weights(n_users: list[int], power: float) -> np.ndarray:
    """CALRec's category sampling rate: p_d proportional to |U_d|^power."""
    w = np.asarray(n_users, dtype=np.float64) ** power
    if not (w.sum() > 0):
        raise ValueError(f"no training users in {n_users}")
    return w / w.sum()


# ------------------------------------------------------------------------------------- worker function
def staged_worker(config: dict[str, Any]) -> None:
    import ray.train

    from seqrec.data.dataset import PreparedDataset
    from seqrec.eval.evaluator import EvalSettings, evaluate
    from seqrec.models.registry import bind_dataset, build_model
    from seqrec.train.checkpoint import load_weights_into
    from seqrec.train.deepspeed_utils import full_parameters
    from seqrec.train.loop import broadcast, checkpoint_and_report, optimizer_step, setup_training

    cfg = from_dict(StagedExperimentConfig, config["experiment"])
    stage = cfg.stages[config["stage_index"]]
    tc, sc, model_name = stage.train, cfg.scaling, cfg.model.name
    params = cfg.stage_params(config["stage_index"])
    tag = f"[{model_name}:{stage.name}]"
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tc.threads_per_worker or max(1, int(sc.cpus_per_worker)))
    device = ray.train.torch.get_device() if sc.use_gpu else torch.device("cpu")
    use_ds = sc.strategy == "deepspeed"
    if sc.strategy not in ("ddp", "deepspeed"):
        raise ValueError(f"unknown strategy {sc.strategy!r}")

    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    datasets = [PreparedDataset.load(p) for p in config["dataset_paths"]]
    eval_ds = PreparedDataset.load(config["validation_path"])
    model = build_model(model_name, params, eval_ds.n_items)
    torch.manual_seed(tc.seed + 1000 * (rank + 1))
    corpora = [model.prepare_corpus(ds) for ds in datasets]
    sequences = [ds.train_sequences() for ds in datasets]
    weights = sampling_weights([sum(len(s) >= 2 for s in seqs) for seqs in sequences], stage.sampling_power)
    if rank == 0:
        print(f"{tag} datasets {[ds.name for ds in datasets]} sampling rates {np.round(weights, 4).tolist()}, "
              f"validation on {eval_ds.name}", flush=True)

    state = {"step": 0, "best_score": -math.inf, "best_step": 0, "evals_since_best": 0, "elapsed_s": 0.0}
    resume = ray.train.get_checkpoint()
    resume_dir = resume.to_directory() if resume is not None else None
    if resume_dir is not None:
        load_weights_into(model, resume_dir)
    elif config.get("init_from"):  # a later stage starts from the previous stage's weights only
        load_weights_into(model, config["init_from"])
        if rank == 0:
            print(f"{tag} initialised from {config['init_from']}", flush=True)
    bind_dataset(model, eval_ds, use_ray=False)  # the validation catalog (CALRec: texts; Recformer: attributes)
    model.to(device)
    optimizer, scheduler, engine, train_module = setup_training(model, tc, sc, world, device, resume_dir, state)

    valid_rows = eval_ds.eval_rows("valid")
    if tc.valid_max_rows and len(valid_rows) > tc.valid_max_rows:  # the same users in every stage (eval_seed)
        valid_rows = valid_rows.subset(np.sort(np.random.default_rng(cfg.eval_seed).permutation(len(valid_rows))[: tc.valid_max_rows]))
    meta = {"model_name": model_name, "model": asdict(model.config), "n_items": int(eval_ds.n_items),
            "experiment": asdict(cfg), "stage": stage.name, "dataset_path": config["validation_path"]}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (sc.use_gpu and not use_ds) else None

    from seqrec.train.deepspeed_utils import zero_stage

    shadow = None  # ZeRO-3: rank 0 validates a plain copy (see below)

    def validate_and_checkpoint(report: dict[str, float]) -> bool:
        nonlocal shadow
        metrics = None
        if zero_stage(engine) == 3:
            # Generation runs forwards in an order ZeRO-3's parameter prefetcher did not trace, and its hooks
            # issue collectives that the other ranks never join (a hang). So rank 0 copies the gathered
            # weights into a hook-free model and scores with that while the others wait at the broadcast.
            with full_parameters(engine, model):
                if rank == 0:
                    if shadow is None:
                        shadow = bind_dataset(build_model(model_name, asdict(model.config), eval_ds.n_items),
                                              eval_ds, use_ray=False).to(device)
                    shadow.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
                    if hasattr(shadow, "before_validation"):
                        shadow.before_validation(distributed=False)
            scorer = shadow
        else:
            if hasattr(model, "before_validation"):  # every rank: it may encode the catalog together
                model.before_validation(distributed=True)
            scorer = model
        if rank == 0:
            metrics = evaluate(scorer, valid_rows, eval_ds.n_items, EvalSettings(), device).metrics
            model.train()
        metrics = broadcast(metrics, world)
        score = float(metrics[tc.eval_metric])
        checkpoint_and_report({**report, **{f"val/{k}": v for k, v in metrics.items()}}, score, state, model=model,
                              engine=engine, optimizer=optimizer, scheduler=scheduler, meta=meta, rank=rank,
                              prefix="seqrec_staged_ckpt_")
        if rank == 0:
            history.add({"kind": "valid", "step": state["step"], "metrics": metrics})
            print(f"{tag} valid step {state['step']} ({len(valid_rows)} users) {tc.eval_metric}={score:.4f} "
                  f"best={state['best_score']:.4f}@{state['best_step']}", flush=True)
        return bool(tc.patience) and state["evals_since_best"] >= tc.patience

    from seqrec.console import NoBar, progress
    from seqrec.plots import RunHistory

    history = RunHistory(config.get("history_path") if rank == 0 else None, fresh=resume_dir is None)  # curves.png
    bar = progress(total=tc.steps, initial=state["step"], desc=tag, unit="step", workers=True) if rank == 0 else NoBar()
    train_module.train()
    win = {"loss": 0.0, "n": 0, "tokens": 0}
    win_t0, run_t0 = time.perf_counter(), time.perf_counter() - state["elapsed_s"]
    report: dict[str, float] = {}
    evaluated_at = state["step"] if resume_dir is not None else -1
    buckets, drawn_pool, pool = tc.length_buckets, None, []
    while state["step"] < tc.steps:
        if hasattr(model, "before_step"):
            model.before_step(state["step"])
        # the step's batch is one of a pool of `buckets` batches drawn together (length buckets; 1 = one batch),
        # the pool a function of (seed, rank, step // buckets), so a resumed run draws the same batches
        pool_key = state["step"] // buckets
        if pool_key != drawn_pool:
            rng = np.random.default_rng([tc.seed, rank, pool_key])
            which = rng.choice(len(datasets), size=tc.batch_size, p=weights)
            parts = [(corpora[d], sequences[d], int((which == d).sum()), d) for d in range(len(datasets))]
            parts = [p for p in parts if p[2]]
            pool = model.sample_bucketed(parts, rng, buckets) if buckets > 1 else [model.sample_batch(parts, rng)]
            drawn_pool = pool_key
        batch = pool[state["step"] % buckets]
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = optimizer_step(batch, model, train_module, optimizer, scheduler, engine, tc.grad_clip, autocast)
        state["step"] += 1
        bar.update(1)
        win["loss"] += float(loss.detach())
        win["n"] += 1
        win["tokens"] += int(batch["attention_mask"].sum()) * world
        if state["step"] % tc.log_every == 0 or state["step"] == tc.steps:
            dt = time.perf_counter() - win_t0
            report = {"loss": win["loss"] / win["n"], "tokens_per_s": win["tokens"] / max(dt, 1e-9),
                      "s_per_step": dt / win["n"], "lr": scheduler.get_last_lr()[0]}
            if rank == 0:
                print(f"{tag} step {state['step']}/{tc.steps} loss {report['loss']:.4f} "
                      f"lr {report['lr']:.2e} {report['s_per_step']:.2f}s/step {report['tokens_per_s']:.0f} tok/s "
                      f"elapsed {time.perf_counter() - run_t0:.0f}s", flush=True)
                history.add({"kind": "train", "step": state["step"], **report})
                bar.set_description(f"{tag} loss {report['loss']:.3f}")
            win = {"loss": 0.0, "n": 0, "tokens": 0}
            win_t0 = time.perf_counter()
        if state["step"] % tc.eval_every == 0 or state["step"] == tc.steps:
            state["elapsed_s"] = time.perf_counter() - run_t0
            evaluated_at = state["step"]
            if validate_and_checkpoint(report):
                if rank == 0:
                    print(f"{tag} early stop at step {state['step']}", flush=True)
                break
            win_t0 = time.perf_counter()
    bar.close()
    if evaluated_at != state["step"]:
        validate_and_checkpoint(report)


# --------------------------------------------------------------------------------------------- driver
def run_stage(cfg: StagedExperimentConfig, index: int, dataset_paths: list[str], validation_path: str,
              init_from: str | None) -> dict[str, Any]:
    """One stage on Ray Train; returns {'best_checkpoint', 'best_metrics', 'train_seconds', ...}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from seqrec.console import train_logging_config, worker_env
    from seqrec.plots import HISTORY_FILE
    from seqrec.train.loop import _pythonpath

    sc, stage = cfg.scaling, cfg.stages[index]
    name = f"{cfg.run.name or cfg.name}_{stage.name}"
    env = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": _pythonpath(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           **worker_env()}
    if sc.strategy == "deepspeed" and not sc.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    trainer = TorchTrainer(
        staged_worker,
        train_loop_config={"experiment": asdict(cfg), "stage_index": index, "dataset_paths": dataset_paths,
                           "validation_path": validation_path, "init_from": init_from,
                           "history_path": str(Path(cfg.run.storage_path).resolve() / name / HISTORY_FILE)},
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker={"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {})}),
        run_config=RunConfig(
            name=name, storage_path=str(Path(cfg.run.storage_path).resolve()),
            failure_config=FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=stage.train.keep_checkpoints,
                                               checkpoint_score_attribute=SCORE_KEY, checkpoint_score_order="max"),
            worker_runtime_env={"env_vars": env},
            logging_config=train_logging_config(),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.error:
        raise result.error
    # best validation score; among equal scores the latest (more training)
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: (cm[1][SCORE_KEY], cm[1]["step"]))
    return {"stage": stage.name, "datasets": dataset_paths, "validation": validation_path, "train_seconds": round(seconds, 1),
            "run_dir": str(Path(cfg.run.storage_path).resolve() / name), "eval_metric": stage.train.eval_metric,
            "best_checkpoint": best_ckpt.path, "best_step": best_metrics.get("step"),
            "final_step": result.metrics.get("step"), "s_per_step_last": result.metrics.get("s_per_step"),
            "val": {k[4:]: v for k, v in best_metrics.items() if k.startswith("val/")}}


def run_staged(cfg: StagedExperimentConfig) -> dict[str, Any]:
    """All enabled stages (each from the previous stage's best checkpoint), then the test evaluation."""
    from seqrec.data.dataset import atomic_write_json
    from seqrec.eval.cli import run_evaluation
    from seqrec.eval.evaluator import format_table
    from seqrec.ray_utils import init_ray

    init_ray(address=cfg.run.address)
    name = cfg.run.name or cfg.name
    summary: dict[str, Any] = {"name": name, "model": cfg.model.name, "stages": []}
    init_from = str(Path(cfg.run.resume_from).resolve()) if cfg.run.resume_from else None
    for i, stage in enumerate(cfg.stages):
        if not stage.enabled:
            print(f"[{cfg.model.name}] {stage.name}: disabled, skipped", flush=True)
            continue
        paths = [resolve_data(d) for d in stage.datasets]
        validation = resolve_data(stage.validation) if stage.validation else paths[stage.eval_dataset]
        res = run_stage(cfg, i, paths, validation, init_from)
        print(f"[{cfg.model.name}] {stage.name}: best checkpoint {res['best_checkpoint']} (step {res['best_step']}), "
              f"{res['train_seconds']:.0f}s", flush=True)
        summary["stages"].append(res)
        init_from = res["best_checkpoint"]
    summary["best_checkpoint"] = init_from
    if cfg.run.test:
        if init_from is None:
            raise ValueError("no stage ran and no run.resume_from: nothing to evaluate")
        if summary["stages"]:
            dataset_path = summary["stages"][-1]["validation"]
        else:  # only run.resume_from: the dataset its checkpoint was validated on
            dataset_path = json.loads((Path(init_from) / "config.json").read_text())["dataset_path"]
        _, results = run_evaluation(dataset_path, [init_from, *cfg.test_baselines], "test", cfg.eval_max_users,
                                    cfg.eval_seed)
        summary["test"] = results
        summary["table"] = format_table({k: r["metrics"] for k, r in results.items()})
        print(f"\n[{name}] test ({next(iter(results.values()))['n_rows']} users)\n{summary['table']}\n", flush=True)
    if summary["stages"]:
        from seqrec.plots import run_curves

        curves = run_curves({s["stage"]: s["run_dir"] for s in summary["stages"]}, summary["stages"][-1]["eval_metric"],
                            Path(cfg.run.storage_path).resolve() / name, f"{name} ({cfg.model.name}), stage by stage")
        summary["curves"] = str(curves) if curves else None
    atomic_write_json(summary, Path(cfg.run.storage_path).resolve() / name / "summary.json")
    return summary


def run_from_cli(config: str, overrides: list[str], address: str | None = None, resume_from: str | None = None) -> dict:
    parsed = parse_overrides(overrides)
    if address:
        parsed["run.address"] = address
    if resume_from:
        parsed["run.resume_from"] = resume_from
    return run_staged(load_staged_config(config, parsed))
