"""The fit's budgeted search: a GridConfig built in code around the sized centre, run by seqrec.tune (ASHA on
validation NDCG@10 pes, one CPU per trial, as many trials at once as the cluster has CPUs).

Budget arithmetic (all estimates come from the probe, seqrec.fit.probe):
    trial_s   = start-up + steps x step_s x contention + validations x eval_s x contention
    reserve_s = what follows the search: the prior grid and the final test pass, plus writing
    search_s  = budget - time already spent - reserve_s            (Tune's time_budget_s: a hard stop)
The first round of trials (one per CPU) should end within 60% of search_s, leaving the rest to trials that
ASHA mostly stops at their first rung; when the sized schedule does not fit, its steps are capped (the width is
kept: see seqrec.fit.runner.plan_fit). num_samples follows from what fits: ASHA (grace 1/4 of the schedule,
factor 3) costs about 0.45 of a full trial per trial on average.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from seqrec.fit.families import CLOZE, Family
from seqrec.fit.probe import Probe
from seqrec.fit.sizing import MIN_DIM, MIN_STEPS, N_VALIDATIONS, Sizing, schedule_decisions

log = logging.getLogger(__name__)
METRIC = "ndcg@10/pes"
TRIAL_START_S = 20.0  # a Tune trial starting its Ray Train run (placement group, worker, data shard)
CONTENTION = 1.25  # a trial beside others on shared cores runs slower than the probe alone
FIRST_ROUND_SHARE = 0.6  # of the search: the first round of full-length trials
EVAL_SHARE = 0.3  # at most this share of a capped trial validates
MIN_VALIDATIONS = 6
ASHA_MEAN_SHARE = 0.45
MAX_TRIALS = 12
POST_FIXED_S = 45.0  # Tune stopping its trials and writing its outputs, loading, copying the checkpoint


@dataclass
class BudgetPlan:
    budget_s: float
    spent_s: float  # before the search (Ray start, feature cache, probe)
    reserve_s: float
    search_s: float
    concurrency: int
    steps: int
    validations: int  # per trial
    trial_s: float  # estimated seconds of one full trial
    num_samples: int
    capped: bool  # the sized schedule did not fit and was cut
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def trial_seconds(steps: int, eval_every: int, probe: Probe) -> float:
    evals = math.ceil(steps / max(1, eval_every))
    return TRIAL_START_S + CONTENTION * (steps * probe.step_s + evals * probe.eval_s)


def reserve_seconds(probe: Probe, n_prior_evals: int) -> float:
    """After the search, at a margin of 2 on the passes: Tune's re-evaluation of the winner, the final validation
    and two test passes (with and without the priors), and the prior grid (seqrec.fit.prior: two passes of the
    model whatever the grid size, plus loading; its grid points cost about one more)."""
    return POST_FIXED_S + 2.0 * (4 + n_prior_evals) * probe.eval_s


def plan_budget(budget_s: float, spent_s: float, steps: int, eval_every: int, probe: Probe, concurrency: int,
                n_prior_evals: int, fixed_steps: bool = False) -> BudgetPlan:
    """How many trials of how many steps fit the budget (see the module docstring). `fixed_steps` (--set
    train.steps): the steps are kept as given and only the number of trials follows the budget."""
    reserve = reserve_seconds(probe, n_prior_evals)
    search = budget_s - spent_s - reserve
    if search < TRIAL_START_S + 10:
        raise ValueError(f"--budget-s {budget_s:.0f} leaves {search:.0f} s for the search after {spent_s:.0f} s of "
                         f"set-up and {reserve:.0f} s reserved for the text prior and the test pass; give more")
    notes = []
    validations = math.ceil(steps / max(1, eval_every))
    full = trial_seconds(steps, eval_every, probe)
    capped = False
    if full > FIRST_ROUND_SHARE * search and not fixed_steps:
        sized_steps = steps
        steps, validations = capped_schedule(FIRST_ROUND_SHARE * search, probe)
        if steps < MIN_STEPS:  # too few for a culling round: give the whole search to one round of trials
            steps, validations = capped_schedule(0.9 * search, probe)
            notes.append("budget fits one round of trials only: no ASHA culling round")
        notes.append(f"schedule capped by the budget: {sized_steps} -> {steps} steps, {validations} validations")
        capped = True
        full = trial_seconds(steps, max(1, steps // validations), probe)
    rounds = search / max(ASHA_MEAN_SHARE * full, 1e-9)
    num_samples = int(min(MAX_TRIALS, max(concurrency, concurrency * math.floor(rounds))))
    return BudgetPlan(budget_s=budget_s, spent_s=round(spent_s, 1), reserve_s=round(reserve, 1),
                      search_s=round(search, 1), concurrency=concurrency, steps=int(steps),
                      validations=int(validations), trial_s=round(full, 1), num_samples=num_samples, capped=capped,
                      notes=notes)


def capped_schedule(trial_s: float, probe: Probe) -> tuple[int, int]:
    """(steps, validations) of a trial taking `trial_s`: N_VALIDATIONS, fewer (not below MIN_VALIDATIONS) where
    validating would take more than EVAL_SHARE of the trial (Flare rebuilds its catalog text table each time)."""
    work = max(0.0, (trial_s - TRIAL_START_S) / CONTENTION)
    validations = N_VALIDATIONS
    if validations * probe.eval_s > EVAL_SHARE * work:
        validations = max(MIN_VALIDATIONS, int(EVAL_SHARE * work / max(probe.eval_s, 1e-9)))
    steps = int(max(0.0, work - validations * probe.eval_s) / probe.step_s)
    return max(steps, 10), validations


def rescheduled(sizing: Sizing, steps: int, why: str, validations: int = N_VALIDATIONS) -> Sizing:
    """The sizing with train.steps (and what follows from it) replaced."""
    decisions = [d for d in sizing.decisions if d.setting not in
                 ("train.steps", "train.eval_every", "train.warmup_steps", "train.patience", "train.log_every")]
    new = schedule_decisions(steps, f"{steps} steps", why, validations)
    train = dict(sizing.train)
    for d in new:
        train[d.setting.split(".", 1)[1]] = d.value
    return Sizing(model=dict(sizing.model), train=train, decisions=decisions + new)


def search_space(family: Family, sizing: Sizing, capped: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(space as SpaceSpec dicts, the centre's values of the swept keys). Around the centre: lr x/3..x3, weight
    decay x/4..x4, width /2 (and x2 when the budget is not already binding), dropout a step either side; cloze
    models also their masking."""
    m, t = sizing.model, sizing.train
    dims = sorted({max(MIN_DIM, m["dim"] // 2), m["dim"], *([] if capped else [min(256, 2 * m["dim"])])})
    dropouts = sorted({0.05, 0.1, 0.2, 0.3} & {round(m["dropout"] / 2, 2), m["dropout"], round(m["dropout"] * 2, 2)}
                      | {m["dropout"]})
    space: dict[str, Any] = {
        "train.lr": {"loguniform": [t["lr"] / 3, t["lr"] * 3]},
        "train.weight_decay": {"loguniform": [t["weight_decay"] / 4, t["weight_decay"] * 4]},
        "model.params.dim": {"choice": dims},
        "model.params.dropout": {"choice": dropouts},
    }
    if family.objective == CLOZE:
        space["model.params.mask_prob"] = {"choice": sorted({0.2, 0.3, 0.4} | {m["mask_prob"]})}
        space["model.params.last_only_prob"] = {"choice": sorted({0.1, 0.3, 0.5} | {m["last_only_prob"]})}
    centre = {k: (m[k.split(".")[-1]] if k.startswith("model.") else t[k.split(".")[-1]]) for k in space}
    return space, centre


def build_grid(family: Family, sizing: Sizing, plan: BudgetPlan, base_path: Path, out_dir: Path, seed: int):
    """The GridConfig of the search (seqrec.tune.config), its base the fit's written centre config."""
    from seqrec.config import from_dict
    from seqrec.tune.config import DerivedSpec, GridConfig, SchedulerSpec, SpaceSpec, TuneSection, validate_grid

    space, centre = search_space(family, sizing, plan.capped)
    steps, eval_every = sizing.train["steps"], sizing.train["eval_every"]
    grid = GridConfig(
        name="search", base=str(base_path),
        description=f"seqrec fit: {family.name} around the sized centre",
        set={}, preset=centre,
        space={k: from_dict(SpaceSpec, v) for k, v in space.items()},
        derived={"model.params.hidden": DerivedSpec("model.params.dim", 4.0),
                 "model.params.attn_dropout": DerivedSpec("model.params.dropout", 1.0, integer=False)},
        tune=TuneSection(metric=METRIC, mode="max", num_samples=plan.num_samples, include_preset=True,
                         max_concurrent_trials=plan.concurrency, seed=seed, time_budget_s=plan.search_s,
                         scheduler=SchedulerSpec(type="asha", grace_period=max(eval_every, steps // 4),
                                                 reduction_factor=3.0, max_t=steps)),
        storage_path=str(out_dir),
    )
    validate_grid(grid)
    return grid


def experiment_base(family: Family, sizing: Sizing, dataset_path: str, name: str) -> dict[str, Any]:
    """The centre configuration as an experiment dict (the grid's base YAML)."""
    return {
        "name": name,
        "data": {"path": str(dataset_path)},
        "model": {"name": family.model, "params": dict(sizing.model)},
        "train": dict(sizing.train),
        "scaling": {"num_workers": 1, "cpus_per_worker": 1.0, "strategy": "ddp"},
        "run": {"test": False},
    }


def run_search(grid, out_dir: Path, overrides: dict[str, Any], address: str | None) -> dict[str, Any]:
    """Run the sweep (Tune's best record, validation only: the fit tests its own final choice once)."""
    from seqrec.tune.runner import run_sweep

    return run_sweep(grid, overrides, name=grid.name, storage_path=str(out_dir), address=address,
                     evaluate_test=False)
