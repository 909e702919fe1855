"""Ray Tune sweeps over the Ray Train trainer, the pattern Ray 2.60 documents for Train V2 + Tune:

    Tuner(function trainable) -> each trial runs `run_trial`, which builds the trial's ExperimentConfig and
    launches the usual TorchTrainer (seqrec.train.loop.run_experiment) with TuneReportCallback, so every
    validation report of the Train run (step, loss, val/<metric>..., checkpoint_path) reaches Tune.

ASHA stops poor trials on validation `val/<metric>` with the training step as its time attribute. The trial
itself only drives its Train run, so it asks Tune for `trial_cpus` (0 by default) and concurrency is capped by
what the Train workers need (max_concurrent_trials, as the Ray docs advise). Each trial's Train run is named
after the trial id under <sweep>/trials/, so a restored trial's Train run resumes from its own latest
checkpoint. Restore (`resume=True`) uses Tuner.restore(resume_unfinished=True): finished trials are kept as
they are, unfinished ones continue.

Sweep directory (<storage_path>/<name>/):
    sweep.json            the sweep's resolved definition (grid, overrides, base config, dataset); a resume reads it
    <trial dirs>          Ray Tune's own files per trial: result.json, progress.csv, TensorBoard events
    trials/trial_<id>/    the trial's Ray Train run and checkpoints
    trials.csv/.parquet   one row per trial: swept values + final/best metrics     (seqrec.tune.report)
    sweep.png             metric vs each swept hyperparameter, and learning curves
    best.json             config + checkpoint + validation and test metrics of the winner
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from seqrec.config import from_dict
from seqrec.train.loop import PG_RECORD
from seqrec.tune.config import (
    GridConfig,
    base_data,
    check_grid_points,
    experiment_dict,
    fixed_overrides,
    parse_grid,
    preset_point,
    swept_space,
)

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"
TRIALS_DIR = "trials"
TUNER_STATE = "tuner.pkl"


def metric_key(metric: str) -> str:
    """The name the trainer reports a validation metric under (seqrec.train.loop: val/<evaluator key>)."""
    return f"val/{metric}"


def _plain(value: Any) -> Any:
    """numpy scalars from Tune's samplers -> Python values (the typed config accepts only those)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


# ------------------------------------------------------------------------------------------ the trial
def run_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One Tune trial: the trial's config (dotted key -> value) on top of the sweep's fixed overrides."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from seqrec.train.config import ExperimentConfig
    from seqrec.train.loop import run_experiment

    trial_id = ray.tune.get_context().get_trial_id()
    # Tune starts each trial in a per-trial working directory; relative paths in the configs (a category_source,
    # an encoder folder, ../shared/data) mean the directory the sweep was launched from, as for `seqrec train`.
    # (Trial outputs go to absolute paths, so this changes nothing else.) On another node that directory may not
    # exist: then relative paths resolve against the trial's own directory, as before.
    if sweep.get("cwd") and Path(sweep["cwd"]).is_dir():
        os.chdir(sweep["cwd"])
    params = {k: _plain(v) for k, v in config.items()}
    data = experiment_dict(sweep["base"], sweep["fixed"], params, {
        # stable per trial: a restored trial's Train run finds its own checkpoints and continues from them
        "run.name": f"trial_{trial_id}", "run.storage_path": sweep["trials_dir"],
        "run.resume_from": None, "run.test": False,
    }, derived=sweep["derived"])
    cfg = from_dict(ExperimentConfig, data)
    run_dir = Path(sweep["trials_dir"]) / cfg.run.name
    resumed = any(run_dir.glob("checkpoint_*"))
    log.info("trial %s%s: %s", trial_id, " (resumed)" if resumed else "", params)
    run_experiment(cfg, callbacks=[TuneReportCallback()], evaluate_best=False)
    if resumed:
        # An interrupted sweep can lose the last report in flight; a run that had already finished then resumes
        # with nothing left to do and reports nothing. Re-send its final report (the table keeps one row per step).
        from ray.train import Result

        last = Result.from_path(str(run_dir))
        if last.metrics:
            ray.tune.report({**last.metrics, "checkpoint_path": last.checkpoint.path if last.checkpoint else None})


def make_trainable(sweep: dict[str, Any]):
    from ray import tune

    trainable = tune.with_parameters(run_trial, sweep=sweep)
    t = sweep["grid"]["tune"]
    return tune.with_resources(trainable, {"cpu": float(t["trial_cpus"]), "memory": float(t["trial_memory_mb"]) * 2**20})


# ------------------------------------------------------------------------------------------ the driver
def sweep_dir_for(grid: GridConfig, name: str | None = None, storage_path: str | None = None) -> Path:
    """<storage_path>/<name>: a local path or file:// URI (a shared mount on a multi-node cluster). A sweep
    globs, restores and rewrites its own directory as files, so object storage (s3://, gs://) is refused
    here; its trials' checkpoints can still be copied there afterwards."""
    from seqrec.storage import is_remote, normalize

    path = storage_path or grid.storage_path
    if is_remote(path):
        raise ValueError(f"seqrec tune needs a local or shared-mount storage_path, got {path!r} (object storage "
                         f"is supported by seqrec train / evaluate, not by sweeps)")
    return Path(normalize(path)) / (name or grid.name)


def default_concurrency(scaling: dict[str, Any], trial_cpus: float = 0.0) -> int:
    """How many Train runs the cluster fits at once (its CPUs, or GPUs when the runs use them)."""
    import ray

    res = ray.cluster_resources()
    workers = max(1, int(scaling.get("num_workers", 1)))
    if scaling.get("use_gpu"):
        return max(1, int(res.get("GPU", 0) // workers))
    per_trial = workers * float(scaling.get("cpus_per_worker", 1.0)) + trial_cpus
    return max(1, int(math.floor(res.get("CPU", 1) / per_trial)))


def build_sweep(grid: GridConfig, cli_overrides: dict[str, Any] | None, sweep_dir: Path) -> dict[str, Any]:
    """Resolve everything a trial needs into plain JSON (written to sweep.json, passed to every trial)."""
    from dataclasses import asdict

    from seqrec.models.registry import MODELS
    from seqrec.train.config import ExperimentConfig
    from seqrec.train.loop import resolve_dataset

    base = base_data(grid)
    fixed = fixed_overrides(grid, cli_overrides)
    space = swept_space(grid, cli_overrides)
    check_grid_points(grid, base, fixed, space)
    cfg = from_dict(ExperimentConfig, experiment_dict(base, fixed, derived=grid.derived))
    if cfg.train.refit or "train.fit_on" in space:
        raise ValueError("a sweep selects trials on validation; train.fit_on train+valid trains on the validation "
                         "targets (refit the selected trial with seqrec train instead)")
    # prepare raw UniSRec files once here, not concurrently in every trial
    fixed["data.path"] = resolve_dataset(cfg)
    fixed["data.unisrec_dir"] = None
    model_cls = MODELS[cfg.model.name][0] if cfg.model.name in MODELS else None
    if hasattr(model_cls, "prepare_params"):  # e.g. Flare's text feature cache: filled once, before the trials
        from seqrec.data.dataset import PreparedDataset

        model_cls.prepare_params(dict(cfg.model.params), PreparedDataset.load(fixed["data.path"]))
    return {
        "grid": asdict(grid),
        "cli_overrides": dict(cli_overrides or {}),
        "base": base,
        "fixed": fixed,
        "space": {k: asdict(v) for k, v in space.items()},
        "derived": {k: asdict(v) for k, v in grid.derived.items() if k not in (cli_overrides or {})},
        "preset_point": preset_point(grid, space) if grid.tune.include_preset else {},
        "dataset_path": fixed["data.path"],
        "trials_dir": str(sweep_dir / TRIALS_DIR),
        "scaling": asdict(cfg.scaling),
        "base_steps": cfg.train.steps,
        "cwd": os.getcwd(),
    }


def run_sweep(grid: GridConfig | str, cli_overrides: dict[str, Any] | None = None, *, name: str | None = None,
              storage_path: str | None = None, num_samples: int | None = None, resume: bool = False,
              address: str | None = None, callbacks: list | None = None,
              time_budget_s: float | None = None, evaluate_test: bool = True) -> dict[str, Any]:
    """Run (or resume) a sweep and write its table, plot and best record. Returns the best record.
    `evaluate_test=False`: the record holds validation metrics only (a caller that chooses further on validation,
    such as `seqrec fit`, tests its final choice once itself)."""
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from seqrec.data.dataset import atomic_write_json
    from seqrec.ray_utils import init_ray
    from seqrec.tune.report import write_outputs

    if isinstance(grid, str):
        from seqrec.tune.config import load_grid

        grid = load_grid(grid)
    if num_samples is not None:
        grid.tune.num_samples = int(num_samples)
    if time_budget_s is not None:
        grid.tune.time_budget_s = float(time_budget_s)
    sweep_dir = sweep_dir_for(grid, name, storage_path)
    init_ray(address=address)
    _require_train_v2()

    if resume:
        sweep = _read_sweep(sweep_dir)
        if cli_overrides and cli_overrides != sweep["cli_overrides"]:
            log.warning("resume uses the sweep's recorded overrides %s, not %s", sweep["cli_overrides"], cli_overrides)
        if not tune.Tuner.can_restore(str(sweep_dir)):
            raise FileNotFoundError(f"{sweep_dir} holds no restorable Tune experiment ({TUNER_STATE} missing)")
        # tuner.pkl is a pickle: only ever restore sweep directories this tool wrote itself
        tuner = tune.Tuner.restore(str(sweep_dir), make_trainable(sweep), resume_unfinished=True,
                                   resume_errored=True)
    else:
        if (sweep_dir / TUNER_STATE).exists():
            raise ValueError(f"{sweep_dir} already holds a sweep: pass --resume to continue it, or --name")
        sweep = build_sweep(grid, cli_overrides, sweep_dir)
        sweep["evaluate_test"] = bool(evaluate_test)  # kept in sweep.json: a resumed or rewritten sweep agrees
        concurrency = grid.tune.max_concurrent_trials or default_concurrency(sweep["scaling"], grid.tune.trial_cpus)
        sweep["max_concurrent_trials"] = concurrency
        atomic_write_json(sweep, sweep_dir / SWEEP_FILE)
        tuner = tune.Tuner(
            make_trainable(sweep),
            param_space=_param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=metric_key(grid.tune.metric), mode=grid.tune.mode, num_samples=grid.tune.num_samples,
                time_budget_s=grid.tune.time_budget_s,
                scheduler=_scheduler(grid, sweep, ASHAScheduler, FIFOScheduler),
                # the concurrency cap goes to the generator itself (Tune ignores max_concurrent_trials for it)
                search_alg=BasicVariantGenerator(
                    points_to_evaluate=[sweep["preset_point"]] if sweep["preset_point"] else None,
                    max_concurrent=concurrency, random_state=grid.tune.seed),
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=sweep_dir.name, storage_path=str(sweep_dir.parent),
                failure_config=tune.FailureConfig(max_failures=grid.tune.max_failures),
                callbacks=[TBXLoggerCallback(), FreeStoppedTrials(sweep["trials_dir"]),
                           SweepProgress(metric_key(grid.tune.metric), grid.tune.mode, expected_trials(sweep)),
                           *(callbacks or [])],
                # Tune's own reporter prints every trial's config and full result as boxes and a status table
                # every 30 s; SweepProgress says one line per finished trial (and draws a bar in a terminal)
                verbose=0,
            ),
        )
    log.info("sweep %s -> %s", grid.name, sweep_dir)
    try:
        results = tuner.fit()
    finally:
        # an interrupted sweep leaves its running trials' placement groups behind: free them all
        for record in Path(sweep["trials_dir"]).glob(f"*/{PG_RECORD}"):
            free_placement_groups(record)
    return write_outputs(sweep_dir, sweep, results)


def rewrite_outputs(sweep_dir: str | Path, address: str | None = None) -> dict[str, Any]:
    """Write a sweep's table, plot and best record again from its saved Tune results, running no trial (after
    an upgrade of the report code, or to re-evaluate the winner). Returns the best record."""
    from ray import tune

    from seqrec.ray_utils import init_ray
    from seqrec.tune.report import write_outputs

    sweep_dir = Path(sweep_dir).resolve()
    sweep = _read_sweep(sweep_dir)
    init_ray(address=address)
    if not tune.Tuner.can_restore(str(sweep_dir)):
        raise FileNotFoundError(f"{sweep_dir} holds no Tune experiment ({TUNER_STATE} missing)")
    results = tune.Tuner.restore(str(sweep_dir), make_trainable(sweep)).get_results()
    return write_outputs(sweep_dir, sweep, results)


def free_placement_groups(record: Path) -> int:
    """Remove the still-reserved placement groups listed in a Train run's record (see loop.record_placement_group).

    Only call this once the run's Train driver is gone (its Tune trial stopped): the groups then hold
    resources nobody will use, because they are scoped to the job rather than to the dead driver.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        ids = Path(record).read_text().split()
    except OSError:
        return 0
    table = ray.util.placement_group_table()
    freed = 0
    for pg_id in dict.fromkeys(ids):
        if table.get(pg_id, {}).get("state") == "CREATED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            freed += 1
    if freed:
        log.info("freed %d placement group(s) of stopped run %s", freed, Path(record).parent.name)
    return freed


def _tune_callback_base():
    from ray.tune import Callback

    return Callback


class FreeStoppedTrials(_tune_callback_base()):
    """Frees a stopped trial's Train placement group a few seconds after Tune stops the trial (ASHA, errors).

    Ray Train V2 inside Tune leaks it otherwise unless the dashboard's State API is up (ray-project/ray#54305).
    The delay lets Tune finish killing the trial (and with it the Train driver) first; records are re-checked for
    a while in case the dying driver had started another worker group.
    """

    def __init__(self, trials_dir: str, delay_s: float = 3.0, watch_s: float = 60.0):
        self.trials_dir, self.delay_s, self.watch_s = trials_dir, delay_s, watch_s
        self._stopped: dict[str, float] = {}
        self._checked = 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._stopped[trial.trial_id] = time.monotonic()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._stopped[trial.trial_id] = time.monotonic()

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if not self._stopped or now - self._checked < 1.0:  # Tune steps often; one look a second is enough
            return
        self._checked = now
        for trial_id, t0 in list(self._stopped.items()):
            if now - t0 < self.delay_s:
                continue
            free_placement_groups(Path(self.trials_dir) / f"trial_{trial_id}" / PG_RECORD)
            if now - t0 > self.watch_s:
                del self._stopped[trial_id]


def expected_trials(sweep: dict[str, Any]) -> int | None:
    """How many trials Tune will sample: num_samples x the product of the grid axes; None with a preset point
    (Tune's count of points_to_evaluate against num_samples is its own business)."""
    from seqrec.tune.config import SpaceSpec

    if sweep["preset_point"]:
        return None
    n = int(sweep["grid"]["tune"]["num_samples"])
    for spec in sweep["space"].values():
        spec = from_dict(SpaceSpec, spec)
        if spec.kind() == "grid":
            n *= len(spec.values())
    return n


class SweepProgress(_tune_callback_base()):
    """One log line per finished trial (its swept values, best validation metric, why it ended) and, where bars
    are on (seqrec.console), a bar of finished trials. `expected`: trials the sweep samples (None: unknown)."""

    def __init__(self, metric: str, mode: str, expected: int | None = None):
        self.metric, self.mode, self.expected = metric, mode, expected
        self._best: dict[str, tuple[float, int]] = {}
        self._bar = None

    def __getstate__(self):  # Tune pickles its callbacks with the experiment state; a live bar does not pickle
        return {**self.__dict__, "_bar": None}

    def _progress(self):
        if self._bar is None:
            from seqrec.console import progress

            self._bar = progress(total=self.expected, desc="sweep", unit="trial")
        return self._bar

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is None:
            return
        best = self._best.get(trial.trial_id)
        better = best is None or (value > best[0] if self.mode == "max" else value < best[0])
        if better:
            self._best[trial.trial_id] = (float(value), int(result.get("step", 0)))

    def _done(self, trial, how: str) -> None:
        best = self._best.get(trial.trial_id)
        score = f"best {self.metric}={best[0]:.4f} at step {best[1]}" if best else f"no {self.metric} reported"
        params = ", ".join(f"{k}={_plain(v)}" for k, v in sorted((trial.config or {}).items()))
        log.info("trial %s %s: %s (%s)", trial.trial_id, how, score, params)
        self._progress().update(1)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._done(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._done(trial, "failed")

    def on_experiment_end(self, trials, **info):
        if self._bar is not None:
            self._bar.close()


def _param_space(sweep: dict[str, Any]) -> dict[str, Any]:
    from seqrec.tune.config import SpaceSpec

    return {k: from_dict(SpaceSpec, v).to_tune() for k, v in sweep["space"].items()}


def _scheduler(grid: GridConfig, sweep: dict[str, Any], asha_cls, fifo_cls):
    if grid.tune.scheduler.type == "fifo":
        return fifo_cls()
    from seqrec.tune.config import asha_schedule

    max_t, grace, factor = asha_schedule(sweep)
    return asha_cls(time_attr="step", max_t=max_t, grace_period=grace, reduction_factor=factor)


def _read_sweep(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no sweep to resume at {sweep_dir} ({SWEEP_FILE} missing)")
    sweep = json.loads(path.read_text())
    parse_grid(sweep["grid"], where=str(path))  # still a valid grid for this version of the code
    return sweep


def _require_train_v2() -> None:
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():
        raise RuntimeError("seqrec tune launches Ray Train inside Tune trials, which needs RAY_TRAIN_V2_ENABLED=1")
