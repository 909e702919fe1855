"""Typed grid files for `seqrec tune` (YAML in configs/grids/, unknown keys rejected).

A grid names a base training config (configs/train/*.yaml) and changes it with dotted keys, the same syntax
as `seqrec train --set` (seqrec.config.apply_overrides), in this order:

    base YAML  <-  set (fixed for every trial)  <-  preset (the paper's chosen values)  <-  CLI --set
               <-  the trial's sampled values from `space`  <-  `derived` keys (hidden = 4 x dim, ...)

The preset is also evaluated as the sweep's first trial (the centre of the grid), so a sweep never does
worse on validation than the paper's configuration it started from.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from seqrec.config import apply_overrides, from_dict, read_yaml, resolve_config_path

log = logging.getLogger(__name__)
DISTRIBUTIONS = ("choice", "grid", "loguniform", "uniform", "randint")


@dataclass
class SpaceSpec:
    """Exactly one distribution for one dotted key."""

    choice: list[Any] | None = None  # sampled uniformly from the list
    grid: list[Any] | None = None  # every value (multiplies num_samples, like tune.grid_search)
    loguniform: list[float] | None = None  # [low, high], log-uniform; low > 0
    uniform: list[float] | None = None  # [low, high]
    randint: list[int] | None = None  # [low, high), integers

    def kind(self) -> str:
        set_ = [d for d in DISTRIBUTIONS if getattr(self, d) is not None]
        if len(set_) != 1:
            raise ValueError(f"a space entry needs exactly one of {DISTRIBUTIONS}, got {set_ or 'none'}")
        return set_[0]

    def values(self) -> list[Any]:
        return list(getattr(self, self.kind()))

    def validate(self, key: str) -> None:
        kind = self.kind()
        vals = self.values()
        if kind in ("choice", "grid"):
            if not vals:
                raise ValueError(f"space.{key}.{kind}: empty list")
            return
        if len(vals) != 2 or not vals[0] < vals[1]:
            raise ValueError(f"space.{key}.{kind}: expected [low, high] with low < high, got {vals}")
        if kind == "loguniform" and vals[0] <= 0:
            raise ValueError(f"space.{key}.loguniform: low must be > 0, got {vals[0]}")

    def contains(self, value: Any) -> bool:
        kind, vals = self.kind(), self.values()
        if kind in ("choice", "grid"):
            return value in vals
        if kind == "randint":
            return isinstance(value, int) and vals[0] <= value < vals[1]
        return isinstance(value, (int, float)) and vals[0] <= value <= vals[1]

    def upper(self) -> Any:
        """The largest value this entry can produce (for ASHA's max_t when steps are swept)."""
        kind, vals = self.kind(), self.values()
        return vals[1] - 1 if kind == "randint" else max(vals)

    def to_tune(self):
        from ray import tune

        kind, vals = self.kind(), self.values()
        if kind == "choice":
            return tune.choice(vals)
        if kind == "grid":
            return tune.grid_search(vals)
        if kind == "loguniform":
            return tune.loguniform(float(vals[0]), float(vals[1]))
        if kind == "uniform":
            return tune.uniform(float(vals[0]), float(vals[1]))
        return tune.randint(int(vals[0]), int(vals[1]))


@dataclass
class DerivedSpec:
    """key = times x source, after sampling (FLARE keeps hidden = 4 x dim and the Perceiver's dim = dim)."""

    source: str  # a dotted key
    times: float = 1.0
    integer: bool = True


@dataclass
class SchedulerSpec:
    type: str = "asha"  # asha (early stopping of poor trials) | fifo (every trial runs to its end)
    grace_period: int = 1000  # training steps before ASHA may stop a trial (its time attribute is `step`)
    reduction_factor: float = 3.0
    max_t: int | None = None  # default: the largest train.steps a trial can get


@dataclass
class TuneSection:
    metric: str = "recall@10/pes"  # evaluator key; the trainer reports it as val/<metric> (also its eval_metric)
    mode: str = "max"
    num_samples: int = 8  # trials (with `grid` entries: samples per grid point); the preset is one of them
    include_preset: bool = True  # evaluate the preset as the first trial
    max_concurrent_trials: int | None = None  # default: what the cluster's CPUs (GPUs) fit at once
    trial_cpus: float = 0.0  # the Tune trial itself only drives a Ray Train run; its workers hold the CPUs
    trial_memory_mb: float = 256.0  # what the trial asks for instead (Ray needs a non-empty resource request)
    seed: int | None = 0  # random search seed (reproducible samples)
    max_failures: int = 0  # Tune-level restarts of a crashed trial (Ray Train restarts workers itself)
    time_budget_s: float | None = None  # wall-clock cap of the whole sweep (TuneConfig.time_budget_s): running
    # trials are stopped there and trials not yet started never run; the table marks them (stop: time_budget)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)


@dataclass
class GridConfig:
    name: str
    base: str  # a configs/train name or YAML path
    description: str = ""
    set: dict[str, Any] = field(default_factory=dict)  # dotted keys fixed for every trial
    preset: dict[str, Any] = field(default_factory=dict)  # the paper's chosen values (dotted keys)
    space: dict[str, SpaceSpec] = field(default_factory=dict)  # dotted key -> distribution
    derived: dict[str, DerivedSpec] = field(default_factory=dict)  # dotted key -> times x another key
    tune: TuneSection = field(default_factory=TuneSection)
    storage_path: str = "runs/tune"  # the sweep writes <storage_path>/<name>/ (a local path or file://, not s3://)


def parse_grid(data: dict[str, Any], where: str = "grid") -> GridConfig:
    data = copy.deepcopy(data)
    space_raw = data.pop("space", None) or {}
    derived_raw = data.pop("derived", None) or {}
    for section, raw in (("space", space_raw), ("derived", derived_raw)):
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            raise ValueError(f"{where}.{section} must map dotted keys to mappings, e.g. train.lr: {{loguniform: [1e-5, 1e-3]}}")
    grid = from_dict(GridConfig, data, where)
    grid.space = {str(k): from_dict(SpaceSpec, v, f"{where}.space.{k}") for k, v in space_raw.items()}
    grid.derived = {str(k): from_dict(DerivedSpec, v, f"{where}.derived.{k}") for k, v in derived_raw.items()}
    validate_grid(grid)
    return grid


def load_grid(name_or_path: str) -> GridConfig:
    """A grid YAML path, or a shipped grid by name (e.g. 'flare_id/scientific', 'smoke_demo')."""
    path = resolve_config_path(name_or_path, subdir="grids")
    return parse_grid(read_yaml(path), where=str(path))


def validate_grid(grid: GridConfig) -> None:
    t = grid.tune
    if t.mode not in ("max", "min"):
        raise ValueError(f"tune.mode must be max or min, got {t.mode!r}")
    if t.num_samples < 1:
        raise ValueError(f"tune.num_samples must be >= 1, got {t.num_samples}")
    if t.scheduler.type not in ("asha", "fifo"):
        raise ValueError(f"tune.scheduler.type must be asha or fifo, got {t.scheduler.type!r}")
    if t.scheduler.grace_period < 1 or t.scheduler.reduction_factor <= 1:
        raise ValueError("tune.scheduler: grace_period >= 1 and reduction_factor > 1 required")
    if t.time_budget_s is not None and t.time_budget_s <= 0:
        raise ValueError(f"tune.time_budget_s must be > 0 seconds, got {t.time_budget_s}")
    if t.max_concurrent_trials is not None and t.max_concurrent_trials < 1:
        raise ValueError(f"tune.max_concurrent_trials must be >= 1, got {t.max_concurrent_trials}")
    if "/" not in t.metric:
        raise ValueError(f"tune.metric {t.metric!r}: use the evaluator's key, e.g. recall@10/pes")
    for key, spec in grid.space.items():
        spec.validate(key)
        if key in grid.preset and not spec.contains(grid.preset[key]):
            # allowed (the preset is just the first point), but usually a typo in the grid file
            log.warning("grid %s: preset %s=%r lies outside its space %s", grid.name, key, grid.preset[key], spec)
    for key, d in grid.derived.items():
        if key in grid.space:
            raise ValueError(f"derived.{key}: a derived key cannot also be swept")
        if d.source in grid.derived:
            raise ValueError(f"derived.{key}: source {d.source!r} is itself derived")
    for section in ("set", "preset"):
        for key in getattr(grid, section):
            if not isinstance(key, str) or not key or key.startswith(".") or key.endswith("."):
                raise ValueError(f"{section}: bad dotted key {key!r}")


def base_data(grid: GridConfig) -> dict[str, Any]:
    return read_yaml(resolve_config_path(grid.base, subdir="train"))


def fixed_overrides(grid: GridConfig, cli_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """set <- preset <- CLI, plus what the sweep itself decides (the selection metric)."""
    fixed = {**grid.set, **grid.preset, **(cli_overrides or {})}
    fixed["train.eval_metric"] = grid.tune.metric  # Train's checkpoint ranking and patience follow the sweep metric
    return fixed


def swept_space(grid: GridConfig, cli_overrides: dict[str, Any] | None = None) -> dict[str, SpaceSpec]:
    """The space minus the keys fixed on the command line (`--set train.steps=200` stops sweeping steps)."""
    fixed = set(cli_overrides or {})
    for key in sorted(fixed & set(grid.space)):
        log.info("grid %s: %s fixed by --set, not swept", grid.name, key)
    return {k: v for k, v in grid.space.items() if k not in fixed}


def preset_point(grid: GridConfig, space: dict[str, SpaceSpec]) -> dict[str, Any]:
    """The preset restricted to the swept keys: Tune's first point to evaluate."""
    return {k: grid.preset[k] for k in space if k in grid.preset}


def experiment_dict(base: dict[str, Any], *override_maps: dict[str, Any], derived: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """base <- each override map in order <- derived keys (DerivedSpec or its dict form) computed last."""
    data = copy.deepcopy(base)
    for overrides in override_maps:
        apply_overrides(data, overrides)
    for key, d in (derived or {}).items():
        d = d if isinstance(d, DerivedSpec) else from_dict(DerivedSpec, d, f"derived.{key}")
        value = get_dotted(data, d.source) * d.times
        apply_overrides(data, {key: int(round(value)) if d.integer else float(value)})
    return data


def get_dotted(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"derived: source key {dotted!r} is not set in the experiment config")
        node = node[part]
    return node


def check_experiment(data: dict[str, Any], where: str):
    """The ExperimentConfig these keys make, with the model's own params checked when the model is registered."""
    from seqrec.models.registry import MODELS
    from seqrec.train.config import ExperimentConfig

    try:
        cfg = from_dict(ExperimentConfig, data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e
    if cfg.model.name in MODELS:
        try:
            from_dict(MODELS[cfg.model.name][1], dict(cfg.model.params), where=f"{where}: model[{cfg.model.name}]")
        except (TypeError, ValueError) as e:
            raise ValueError(str(e)) from e
    else:
        log.warning("%s: model %r is not registered here; its params are checked when a trial builds it",
                    where, cfg.model.name)
    return cfg


def check_grid_points(grid: GridConfig, base: dict[str, Any], fixed: dict[str, Any],
                      space: dict[str, SpaceSpec]) -> None:
    """Fail before any trial starts: the preset and each space's extreme values must make a valid config."""
    check_experiment(experiment_dict(base, fixed, derived=grid.derived), f"grid {grid.name} (preset)")
    for key, spec in space.items():
        kind, vals = spec.kind(), spec.values()
        candidates = vals if kind in ("choice", "grid") else [vals[0], spec.upper()]
        for v in candidates:
            if kind in ("loguniform", "uniform") and isinstance(v, int):
                v = float(v)
            check_experiment(experiment_dict(base, fixed, {key: v}, derived=grid.derived),
                             f"grid {grid.name}: space {key}={v!r}")


def max_steps(cfg_steps: int, space: dict[str, SpaceSpec]) -> int:
    spec = space.get("train.steps")
    return int(max(cfg_steps, spec.upper())) if spec is not None else int(cfg_steps)


def asha_schedule(sweep: dict[str, Any]) -> tuple[int, int, float]:
    """ASHA's (max_t, grace_period, reduction_factor) in training steps for a resolved sweep (runner.build_sweep):
    max_t defaults to the largest train.steps a trial can get; the grace period never exceeds it."""
    s = sweep["grid"]["tune"]["scheduler"]
    space = {k: from_dict(SpaceSpec, v) for k, v in sweep["space"].items()}
    max_t = int(s.get("max_t") or max_steps(int(sweep["base_steps"]), space))
    return max_t, int(min(s["grace_period"], max_t)), float(s["reduction_factor"])


def is_log_scale(spec: SpaceSpec) -> bool:
    kind, vals = spec.kind(), spec.values()
    if kind == "loguniform":
        return True
    numeric = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return kind in ("choice", "grid") and len(numeric) == len(vals) and min(numeric) > 0 and \
        math.log10(max(numeric) / min(numeric)) >= 2
