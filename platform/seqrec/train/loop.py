"""The one training loop: a Ray Train worker function (DDP or DeepSpeed) and the driver that runs it.

Per worker: read its Ray Data shard of training sequences once, then stream packed batches forever (epoch e
of rank r is packed with seed (seed, r, e), so a resumed run replays exactly the same batches). Every
`eval_every` steps rank 0 validates with the shared evaluator, all ranks write their part of a checkpoint
and call ray.train.report; early stopping on the validation metric; the driver finally loads the best
checkpoint and evaluates it on valid and test.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from seqrec.config import from_dict
from seqrec.train.checkpoint import (
    TRAIN_STATE,
    atomic_torch_save,
    load_state,
    load_weights_into,
    rank_state_file,
    save_model_files,
)
from seqrec.train.config import ExperimentConfig

log = logging.getLogger(__name__)
PG_RECORD = ".placement_groups"  # placement group ids of the run's worker groups (record_placement_group)
SCORE_KEY = "val_score"  # the validation metric chosen by train.eval_metric, for Ray's checkpoint ranking


# --------------------------------------------------------------------------------------------- helpers
def lr_lambda(cfg) -> Any:
    """Linear warm-up, then cosine/linear decay to min_lr_ratio at train.steps (constant after)."""
    warm, total, floor = max(cfg.warmup_steps, 0), max(cfg.steps, 1), cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if cfg.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        if cfg.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule {cfg.schedule!r}")

    return f


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, LayerNorm and position embeddings' 1-d params."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class BatchStream:
    """Endless packed batches of one worker's sequences; its position (epoch, batch) is checkpointed."""

    def __init__(self, seqs: list[np.ndarray], model: torch.nn.Module, cfg, rank: int):
        self.seqs, self.cfg, self.rank = seqs, cfg, rank
        self.max_seq_len, self.causal = model.packed_seq_len, model.causal
        self.epoch, self.batch = 0, 0
        self._packed = None

    def _pack(self):
        from seqrec.models.packing import pack_sequences, pad_sequences

        rng = np.random.default_rng([self.cfg.seed, self.rank, self.epoch])
        if self.cfg.packing:
            return pack_sequences(self.seqs, self.cfg.pack_len, self.max_seq_len, self.causal, rng)
        return pad_sequences(self.seqs, self.max_seq_len, self.causal, rng)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if self._packed is None:
                self._packed = self._pack()
                if len(self._packed) < self.cfg.batch_size:
                    raise ValueError(f"rank {self.rank}: {len(self._packed)} packed rows < batch_size {self.cfg.batch_size}")
            n_batches = len(self._packed) // self.cfg.batch_size
            if self.batch >= n_batches:
                self.epoch, self.batch, self._packed = self.epoch + 1, 0, None
                continue
            idx = np.arange(self.batch * self.cfg.batch_size, (self.batch + 1) * self.cfg.batch_size)
            self.batch += 1
            yield self._packed.batch(idx)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.batch, self._packed = int(state["epoch"]), int(state["batch"]), None


def read_shard_sequences(shard) -> list[np.ndarray]:
    """All training sequences in this worker's Ray Data shard, ordered by user (deterministic packing)."""
    users, seqs = [], []
    for batch in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
        col = batch.column("items").combine_chunks()
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
        seqs.extend(values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1))
        users.extend(batch.column("user_idx").to_numpy().tolist())
    order = np.argsort(np.asarray(users), kind="stable")
    return [seqs[i] for i in order]


def broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def experiment_meta(cfg: ExperimentConfig, model: torch.nn.Module, n_items: int) -> dict[str, Any]:
    from seqrec.models.registry import model_config_dict

    return {
        "model_name": cfg.model.name,
        "model": model_config_dict(model),
        "n_items": int(n_items),
        "experiment": asdict(cfg),
    }


def record_placement_group(path: str | os.PathLike) -> None:
    """Append this worker group's placement group id to `path`.

    A Train run started inside a Tune trial that Tune stops (ASHA) dies with the trial, but its placement group
    is scoped to the job and outlives it; Ray Train V2's own cleaner needs the State API (dashboard). With the
    id on record, the sweep driver frees it (seqrec.tune.runner.free_placement_groups).
    """
    from ray.util.placement_group import get_current_placement_group

    pg = get_current_placement_group()
    if pg is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(pg.id.hex() + "\n")


def setup_training(model: torch.nn.Module, tc, sc, world: int, device: torch.device, resume_dir: str | None,
                   state: dict[str, Any]):
    """(optimizer, scheduler, DeepSpeed engine or None, the module to call for the loss) for a worker, with the
    step count, scheduler, optimizer (or ZeRO shards) restored from `resume_dir` when given. Shared by the ID/Flare
    loop and the CALRec loop."""
    use_ds = sc.strategy == "deepspeed"
    optimizer = make_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))

    engine = None
    if use_ds:
        from seqrec.train import deepspeed_utils

        deepspeed_utils.ensure_env(sc.use_gpu)
        ds_cfg = deepspeed_utils.build_config(sc.deepspeed_config, batch_size=tc.batch_size, grad_clip=tc.grad_clip,
                                              use_gpu=sc.use_gpu, zero_stage=sc.zero_stage)
        engine, _ = deepspeed_utils.initialize(model, optimizer, ds_cfg)
        train_module = engine
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        train_module = model

    if resume_dir is not None:
        ts = load_state(Path(resume_dir) / TRAIN_STATE)
        state.update(ts["state"])
        scheduler.load_state_dict(ts["scheduler"])
        if use_ds:
            engine.load_checkpoint(str(Path(resume_dir) / "deepspeed"), tag="state", load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
        else:
            optimizer.load_state_dict(ts["optimizer"])
    return optimizer, scheduler, engine, train_module


def start_ema(model: torch.nn.Module, decay: float | None, resume_dir: str | None):
    """The run's WeightEMA (None when train.ema_decay is unset). On resume the model holds the checkpoint's
    model.safetensors = the average: that becomes the shadow, and the live weights come from the train state."""
    if decay is None:
        return None
    from seqrec.train.ema import WeightEMA

    if resume_dir is None:
        return WeightEMA(model, decay)
    ts = load_state(Path(resume_dir) / TRAIN_STATE)
    if "live_weights" not in ts:  # a checkpoint of a run without EMA: its weights are live, start averaging them
        return WeightEMA(model, decay)
    ema = WeightEMA(model, decay, updates=int(ts.get("ema_updates", 0)))
    ema.load_live(model, ts["live_weights"])
    return ema


def averaged(ema, model: torch.nn.Module):
    """A context with the EMA weights in the model, or a no-op without an EMA."""
    from contextlib import nullcontext

    return nullcontext(model) if ema is None else ema.applied(model)


def optimizer_step(batch: dict[str, torch.Tensor], model: torch.nn.Module, train_module, optimizer, scheduler, engine,
                   grad_clip: float, autocast=None) -> torch.Tensor:
    """One training step on a batch (the DeepSpeed engine's, or forward/backward/clip/step); returns the loss."""
    if engine is not None:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
    else:
        if autocast is not None:
            with autocast:
                loss = train_module(batch)
        else:
            loss = train_module(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    scheduler.step()
    return loss


def checkpoint_and_report(report: dict[str, Any], score: float, state: dict[str, Any], *, model, engine, optimizer,
                          scheduler, meta: dict[str, Any], rank: int, rank_state: dict[str, Any] | None = None,
                          prefix: str = "seqrec_ckpt_", ema=None) -> dict[str, Any]:
    """Record a validation score in `state` (best score / step, evaluations since the best), then save a full
    checkpoint and hand it to Ray Train with the report. Every rank calls this (ZeRO-3 gathers collectively).

    The checkpoint: model.safetensors + config (rank 0, full unpartitioned weights), the train state with the
    optimizer (rank 0; DeepSpeed keeps its own under deepspeed/), and `rank_state` per rank (RNG, data stream)
    when given. It is written to a temporary directory that Ray copies into the run, so a crash while writing
    leaves no half checkpoint behind. With `ema` (train/ema.py) model.safetensors holds the averaged weights and
    the train state the live ones. Returns the full report sent."""
    import ray.train
    from ray.train import Checkpoint

    from seqrec.storage import write_manifest
    from seqrec.train.deepspeed_utils import full_parameters

    if score > state["best_score"]:
        state.update(best_score=score, best_step=state["step"], evals_since_best=0)
    else:
        state["evals_since_best"] += 1
    full = {**report, "step": state["step"], SCORE_KEY: score, "best_score": state["best_score"],
            "best_step": state["best_step"]}
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        with full_parameters(engine, model):
            if rank == 0:
                if ema is None:
                    save_model_files(model, tmp, meta)
                else:
                    with ema.applied(model):
                        save_model_files(model, tmp, meta)
        if rank == 0:
            train_state = {"state": dict(state), "scheduler": scheduler.state_dict(),
                           "optimizer": None if engine is not None else optimizer.state_dict()}
            if ema is not None:
                train_state.update(live_weights=ema.live_weights(model), ema_updates=ema.updates)
            atomic_torch_save(train_state, Path(tmp) / TRAIN_STATE)
        if rank_state is not None:
            atomic_torch_save(rank_state, Path(tmp) / rank_state_file(rank))
        if engine is not None:
            ds_dir = Path(tmp) / "deepspeed"
            ds_dir.mkdir(exist_ok=True)
            engine.save_checkpoint(str(ds_dir), tag="state", save_latest=False)
        if rank == 0:  # last: what a complete copy holds (seqrec.storage.local_copy refuses a partial upload)
            world = ray.train.get_context().get_world_size()
            write_manifest(tmp, expect=[rank_state_file(r) for r in range(world)] if rank_state is not None else [])
        ray.train.report(full, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{state['step']:08d}")
    return full


# ------------------------------------------------------------------------------------- worker function
def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from seqrec.data.dataset import PreparedDataset
    from seqrec.eval.evaluator import EvalSettings, evaluate
    from seqrec.models.registry import bind_dataset, build_model

    cfg = from_dict(ExperimentConfig, config["experiment"])
    tc, sc = cfg.train, cfg.scaling
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0 and config.get("pg_record"):
        record_placement_group(config["pg_record"])
    torch.set_num_threads(tc.threads_per_worker or max(1, int(sc.cpus_per_worker)))
    device = ray.train.torch.get_device() if sc.use_gpu else torch.device("cpu")
    use_ds = sc.strategy == "deepspeed"
    if sc.strategy not in ("ddp", "deepspeed"):
        raise ValueError(f"unknown strategy {sc.strategy!r}")

    # identical initial weights on every rank; rank-specific RNG for dropout / masking afterwards
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    dataset = PreparedDataset.load(config["dataset_path"])
    model = build_model(cfg.model.name, cfg.model.params, dataset.n_items)
    bind_dataset(model, dataset, use_ray=False)  # Flare T+ID: catalog text features (cache filled by the driver)
    torch.manual_seed(tc.seed + 1000 * (rank + 1))

    seqs = read_shard_sequences(ray.train.get_dataset_shard("train"))
    stream = BatchStream(seqs, model, tc, rank)
    state = {"step": 0, "best_score": -math.inf, "best_step": 0, "evals_since_best": 0, "elapsed_s": 0.0}

    resume = ray.train.get_checkpoint()
    resume_dir = None
    if resume is not None:
        resume_dir = resume.to_directory()  # a local copy every rank can read
    elif config.get("resume_from"):
        from seqrec.storage import local_copy

        resume_dir = str(local_copy(config["resume_from"], "checkpoints"))  # a URI: copied once to this node
    if resume_dir is not None:
        load_weights_into(model, resume_dir)
    model.to(device)
    ema = start_ema(model, tc.ema_decay, resume_dir)
    optimizer, scheduler, engine, train_module = setup_training(model, tc, sc, world, device, resume_dir, state)
    if ema is not None:
        from seqrec.train.deepspeed_utils import zero_stage

        if zero_stage(engine) == 3:  # each rank holds a slice of every parameter: nothing whole to average
            raise ValueError("train.ema_decay is not supported with ZeRO-3; use zero1/zero2 or ddp")
    if resume_dir is not None:
        rs_path = Path(resume_dir) / rank_state_file(rank)
        if rs_path.exists():  # absent if the world size changed: keep fresh per-rank streams
            rs = load_state(rs_path)
            torch.set_rng_state(rs["torch_rng"])
            if torch.cuda.is_available() and "cuda_rng" in rs:
                torch.cuda.set_rng_state(rs["cuda_rng"])
            stream.load(rs["stream"])
        if rank == 0:
            print(f"[train] resumed from step {state['step']} (best {tc.eval_metric}={state['best_score']:.4f})", flush=True)

    valid_rows = dataset.eval_rows("valid")
    if tc.valid_max_rows and len(valid_rows) > tc.valid_max_rows:
        valid_rows = valid_rows.subset(np.random.default_rng(tc.seed).permutation(len(valid_rows))[: tc.valid_max_rows])
    meta = experiment_meta(cfg, model, dataset.n_items)
    from seqrec.train.deepspeed_utils import select_precision

    autocast = select_precision(sc.use_gpu, sc.strategy).autocast()  # bf16 on GPU (DeepSpeed's own under deepspeed)

    shadow: list[torch.nn.Module] = []  # ZeRO-3 only: rank 0's plain copy of the model for validation

    def validation_model() -> torch.nn.Module:
        """The model rank 0 validates. Under ZeRO-3 the engine's forward hooks re-partition parameters as
        submodules finish, so scoring the live module mid-gather sees empty tensors: copy the gathered weights
        into a plain model instead (called inside full_parameters)."""
        from seqrec.train.deepspeed_utils import zero_stage

        if zero_stage(engine) != 3:
            return model
        if not shadow:
            shadow.append(bind_dataset(build_model(cfg.model.name, cfg.model.params, dataset.n_items), dataset,
                                       use_ray=False).to(device))
        shadow[0].load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
        return shadow[0]

    def validate_and_checkpoint(last_loss: float, seq_per_s: float) -> bool:
        """Rank 0 validates; everyone saves its part and reports. Returns True to stop early."""
        from seqrec.train.deepspeed_utils import full_parameters  # cheap: deepspeed is imported lazily

        metrics = None
        if tc.refit:  # the validation targets are training data: checkpoint only; the latest ranks highest
            metrics, score = {}, float(state["step"])
        else:
            with full_parameters(engine, model):  # ZeRO-3: all ranks gather, rank 0 evaluates
                if rank == 0:
                    with averaged(ema, model):
                        metrics = evaluate(validation_model(), valid_rows, dataset.n_items, EvalSettings(),
                                           device).metrics
                        model.train()  # drops eval-time caches (Flare's text table) built from the averaged weights
            metrics = broadcast(metrics, world)
            score = float(metrics[tc.eval_metric])
        # node_id: where this rank ran (a multi-node run's placement, read back from the checkpoint)
        rs = {"torch_rng": torch.get_rng_state(), "stream": stream.state(),
              "node_id": ray.get_runtime_context().get_node_id()}
        if torch.cuda.is_available():
            rs["cuda_rng"] = torch.cuda.get_rng_state()
        checkpoint_and_report({"loss": last_loss, "seq_per_s": seq_per_s, "lr": scheduler.get_last_lr()[0],
                               **{f"val/{k}": v for k, v in metrics.items()}}, score, state, model=model, engine=engine,
                              optimizer=optimizer, scheduler=scheduler, meta=meta, rank=rank, rank_state=rs,
                              ema=ema)
        if rank == 0 and tc.refit:
            print(f"[refit] step {state['step']} checkpointed (no validation: fit_on {tc.fit_on})", flush=True)
        elif rank == 0:
            history.add({"kind": "valid", "step": state["step"], "metrics": metrics})
            print(f"[valid] step {state['step']} {tc.eval_metric}={score:.4f} best={state['best_score']:.4f}"
                  f"@{state['best_step']} ndcg@10/opt={metrics.get('ndcg@10/opt', float('nan')):.4f}", flush=True)
        return bool(tc.patience) and not tc.refit and state["evals_since_best"] >= tc.patience

    # ---------------------------------------------------------------------------------------- the loop
    from seqrec.console import NoBar, progress
    from seqrec.plots import RunHistory

    history = RunHistory(config.get("history_path") if rank == 0 else None, fresh=resume_dir is None)  # curves.png
    bar = progress(total=tc.last_step, initial=state["step"], desc=cfg.run.name or cfg.name, unit="step",
                   workers=True) if rank == 0 else NoBar()
    train_module.train()
    it = iter(stream)
    window_loss, window_n, window_seqs, window_t0 = 0.0, 0, 0, time.perf_counter()
    last_loss, seq_per_s = float("nan"), 0.0
    run_t0 = time.perf_counter() - state["elapsed_s"]
    evaluated_at = state["step"] if resume_dir is not None else -1
    while state["step"] < tc.last_step:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(it).items()}
        n_seqs = int((batch["positions"] == 0).logical_and(batch["segments"] > 0).sum())  # segments in the batch
        if tc.fail_at_step is not None and rank == 0 and state["step"] == tc.fail_at_step:
            marker = Path(config["fail_marker"])
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text("killed once")
                print(f"[train] fault injection: killing rank 0 (pid {os.getpid()}) at step {state['step']}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        loss = optimizer_step(batch, model, train_module, optimizer, scheduler, engine, tc.grad_clip, autocast)
        if ema is not None:
            ema.update(model)
        state["step"] += 1
        bar.update(1)
        window_loss += float(loss.detach())
        window_n += 1
        window_seqs += n_seqs * world
        if state["step"] % tc.log_every == 0 or state["step"] == tc.last_step:
            dt = time.perf_counter() - window_t0
            last_loss, seq_per_s = window_loss / window_n, window_seqs / max(dt, 1e-9)
            if rank == 0:
                print(f"[train] step {state['step']}/{tc.steps} loss {last_loss:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                      f"{seq_per_s:.0f} seq/s elapsed {time.perf_counter() - run_t0:.0f}s", flush=True)
                history.add({"kind": "train", "step": state["step"], "loss": last_loss,
                                "lr": scheduler.get_last_lr()[0], "seq_per_s": seq_per_s})
                bar.set_description(f"{cfg.run.name or cfg.name} loss {last_loss:.3f}")
            window_loss, window_n, window_seqs, window_t0 = 0.0, 0, 0, time.perf_counter()
        if state["step"] % tc.eval_every == 0 or state["step"] == tc.last_step:
            state["elapsed_s"] = time.perf_counter() - run_t0
            evaluated_at = state["step"]
            if validate_and_checkpoint(last_loss, seq_per_s):
                if rank == 0:
                    print(f"[train] early stop at step {state['step']}: no improvement in {tc.patience} evaluations", flush=True)
                break
            window_t0 = time.perf_counter()  # validation time is not training throughput
    bar.close()
    if evaluated_at != state["step"]:
        validate_and_checkpoint(last_loss, seq_per_s)


# --------------------------------------------------------------------------------------------- driver
def resolve_dataset(cfg: ExperimentConfig) -> str:
    """The prepared dataset the run trains on; with train.fit_on "train+valid" its refit copy (written once,
    beside it: <dataset>+valid)."""
    from seqrec import storage

    if cfg.data.path and storage.is_remote(cfg.data.path):
        if cfg.train.refit:
            raise ValueError("train.fit_on train+valid writes its refit copy beside the dataset: give a local data.path")
        return storage.normalize(cfg.data.path)  # every worker copies it to its node (PreparedDataset.load)
    if cfg.data.path:
        path = Path(storage.normalize(cfg.data.path))
    elif cfg.data.unisrec_dir:
        from seqrec.data.unisrec import prepare_unisrec

        raw = Path(cfg.data.unisrec_dir)
        path = Path(cfg.data.cache_dir).resolve() / raw.name
        if not (path / "meta.json").exists():
            prepare_unisrec(raw, path)
    else:
        raise ValueError("config needs data.path (prepared dataset) or data.unisrec_dir (raw UniSRec files)")
    if cfg.train.refit:
        from seqrec.data.dataset import PreparedDataset, refit_dataset

        path = refit_dataset(PreparedDataset.load(path), path.parent / f"{path.name}+valid").path
    return str(path)


def run_experiment(cfg: ExperimentConfig, datasets_blocks: int | None = None, callbacks: list | None = None,
                   evaluate_best: bool = True) -> dict[str, Any]:
    """Train with Ray Train, then evaluate the best checkpoint. Returns a summary dict (also saved as JSON).

    `callbacks`: Ray Train callbacks (a Tune trial passes TuneReportCallback to forward every report);
    `evaluate_best=False` skips the final evaluation (a sweep evaluates only its winner).
    """
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from seqrec.data.dataset import PreparedDataset, atomic_write_json
    from seqrec.eval.evaluator import EvalSettings, evaluate, format_table
    from seqrec.models.registry import load_model
    from seqrec.console import quiet_ray_data, train_logging_config, worker_env
    from seqrec.plots import HISTORY_FILE, run_curves
    from seqrec.ray_utils import init_ray
    from seqrec import storage as st

    sc = cfg.scaling
    storage = st.normalize(cfg.run.storage_path)  # a local path, or a URI Ray Train writes through pyarrow
    st.check_bucket(storage)  # a missing bucket: one line now, not a traceback from Ray's first upload
    storage_path, storage_fs = st.ray_storage(storage)
    resume_from = st.normalize(cfg.run.resume_from) if cfg.run.resume_from else None
    if resume_from:
        check_checkpoint(resume_from)
    init_ray(address=cfg.run.address)
    dataset_path = resolve_dataset(cfg)
    dataset = PreparedDataset.load(dataset_path)
    from seqrec.models.registry import MODELS

    model_cls = MODELS[cfg.model.name][0] if cfg.model.name in MODELS else None
    if hasattr(model_cls, "prepare_params"):  # Flare / a text prior: fill the feature cache once, before the workers
        cfg.model.params = model_cls.prepare_params(cfg.model.params, dataset)
    table = dataset.split("train")
    # several blocks so streaming_split can hand each worker a part without running any Ray Data task
    n_blocks = datasets_blocks or max(4 * sc.num_workers, 1)
    step = max(1, math.ceil(table.num_rows / n_blocks))
    train_ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
    quiet_ray_data(train_ds)  # its split to the workers runs no task: a progress bar would say nothing

    name = cfg.run.name or cfg.name
    run_dir = local_run_dir(storage, name)
    # AWS_* / GOOGLE_* / SEQREC_CACHE_DIR: workers read remote datasets and resume_from checkpoints themselves
    env = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": _pythonpath(), **st.worker_env(), **worker_env()}
    if sc.strategy == "deepspeed" and not sc.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": asdict(cfg), "dataset_path": dataset_path,
                           "fail_marker": str(run_dir / ".fault_injected"),
                           "history_path": str(run_dir / HISTORY_FILE),  # curves.png is drawn from it
                           "pg_record": str(run_dir / PG_RECORD),
                           # Train V2 dropped resume_from_checkpoint: the worker falls back to this directory
                           # when Ray has no checkpoint of this run yet (a restart after a failure has one)
                           "resume_from": resume_from},
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker=sc.resources_per_worker(),
                                     placement_strategy=sc.placement_strategy),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute=SCORE_KEY, checkpoint_score_order="max"),
            worker_runtime_env={"env_vars": env},
            callbacks=list(callbacks or []),
            logging_config=train_logging_config(),
        ),
        datasets={"train": train_ds},
        # the split ignores where the workers run: the blocks all sit in this driver's object store, so locality
        # saves no transfer, and with it the users a rank trains on (hence the weights) would depend on the
        # placement: a 2-node run would not reproduce a 1-node one
        dataset_config=DataConfig(enable_shard_locality=False),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    train_seconds = time.perf_counter() - t0
    if result.error:
        raise result.error
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][SCORE_KEY])
    best_dir = st.uri_of(best_ckpt.filesystem, best_ckpt.path)  # s3://... when the storage is remote
    summary: dict[str, Any] = {
        "name": name, "model": cfg.model.name, "train_seconds": round(train_seconds, 1),
        "final_step": result.metrics.get("step"), "best_step": best_metrics.get("step"),
        "best_checkpoint": best_dir,
        "latest_checkpoint": st.uri_of(result.checkpoint.filesystem, result.checkpoint.path) if result.checkpoint else None,
        "seq_per_s_last": result.metrics.get("seq_per_s"),
    }
    if not evaluate_best:
        return summary
    model, _ = load_model(best_dir, dataset=dataset)  # a URI: copied once into the cache
    table_rows = {}
    splits = ("valid", "test") if cfg.run.test else ("valid",)
    if cfg.train.refit:  # validation targets were trained on: their metrics would mean nothing
        splits = ("test",)
        summary["fit_on"] = cfg.train.fit_on
    for split in splits:
        res = evaluate(model, dataset.eval_rows(split), dataset.n_items, EvalSettings())
        summary[split] = res.metrics
        table_rows[f"{cfg.model.name}/{split}"] = res.metrics
    summary["table"] = format_table(table_rows)
    print(f"\n[{name}] best checkpoint {best_dir} (step {summary['best_step']}), training wall time "
          f"{train_seconds:.0f}s\n{summary['table']}\n", flush=True)
    curves = run_curves({name: run_dir}, cfg.train.eval_metric, run_dir, f"{name} ({cfg.model.name})")
    summary["curves"] = str(curves) if curves else None
    atomic_write_json(summary, run_dir / "summary.json")
    if st.is_remote(storage):  # beside the checkpoints, for whoever reads the run from its storage
        st.upload_dir(run_dir, st.join(storage, name))
    return summary


CHECKPOINT_FILES = ("config.json", "model.safetensors", "train_state.pt")


def check_checkpoint(path: str) -> None:
    """run.resume_from must name a whole checkpoint: a missing path or a partial upload (a copy cut short) is
    refused here, before any worker starts."""
    from seqrec import storage as st

    missing = [f for f in CHECKPOINT_FILES if not st.exists(st.join(path, f))]
    if missing:
        raise FileNotFoundError(f"run.resume_from {path} is not a complete checkpoint: {', '.join(missing)} missing")


def local_run_dir(storage: str, name: str) -> Path:
    """Where a run's side files go: the curves' history (appended by rank 0), the placement-group record, the
    fault-injection marker, summary.json and curves.png. For local storage that is the run's own directory. An
    object store (s3://, gs://) cannot append, so a remote run keeps them in a local folder of the cache (keyed
    by the storage URI) and uploads them beside the checkpoints at the end."""
    import hashlib

    from seqrec.storage import cache_root, is_remote

    if not is_remote(storage):
        return Path(storage) / name
    return cache_root() / "runs" / hashlib.sha256(storage.encode()).hexdigest()[:20] / name


def _pythonpath() -> str:
    """Workers must import seqrec even when it is not pip-installed (source checkout + PYTHONPATH)."""
    from seqrec.ray_utils import source_pythonpath

    return source_pythonpath()
