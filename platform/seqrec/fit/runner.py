"""`seqrec fit`, end to end: a prepared dataset in, a model selected on validation out, within a time budget.

    1. statistics of the dataset -> the sized centre configuration            (seqrec.fit.sizing)
    2. the catalog's text features, once (cached in the dataset directory; not counted in the budget)
    3. a throughput probe -> the budget plan: the steps and trials that fit     (seqrec.fit.probe, .search)
    4. the budgeted ASHA search on validation NDCG@10 pes (seqrec.tune)        (seqrec.fit.search)
    5. the winner's scoring priors (text, transition), on validation          (seqrec.fit.prior)
    6. the scoring checkpoint, best record, fit report; the test split is evaluated once, here at the end
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from seqrec.fit.families import Family, get_family
from seqrec.fit.record import BEST_FILE, REPORT_FILE, best_record, write_scoring_checkpoint
from seqrec.fit.sizing import Decision, Sizing, check_fittable, profile_dataset, size

log = logging.getLogger(__name__)
SEARCH_DIR = "search"
FINAL_PASSES_MARGIN = 6  # the final validation and two test passes, at a margin of 2


@dataclass
class FitOptions:
    dataset: str  # a prepared dataset directory
    model: str  # a family of seqrec.fit.families
    budget_s: float = 600.0  # wall-clock seconds from start to the written record, text encoding excepted
    seed: int = 0
    out: str | None = None  # default runs/fit/<dataset>_<model>_s<seed>
    address: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # --set: fixed for every trial, never swept


def default_out(dataset_path: str | Path, model: str, seed: int) -> Path:
    return Path("runs/fit") / f"{Path(dataset_path).resolve().name}_{model}_s{seed}"


def fit(opts: FitOptions) -> dict[str, Any]:
    """Run a fit; returns the fit report (also written to <out>/fit_report.json)."""
    from seqrec.data.dataset import PreparedDataset, atomic_write_json
    from seqrec.fit.resources import PeakRSS

    t_start = time.monotonic()
    family = get_family(opts.model)
    if opts.budget_s <= 0:
        raise ValueError(f"--budget-s must be > 0, got {opts.budget_s}")
    dataset = PreparedDataset.load(opts.dataset)
    profile = profile_dataset(dataset)
    check_fittable(profile)
    out = Path(opts.out) if opts.out else default_out(opts.dataset, opts.model, opts.seed)
    out = out.resolve()
    if (out / REPORT_FILE).exists() or (out / SEARCH_DIR).exists():
        raise ValueError(f"{out} already holds a fit; choose another --out (or delete it)")
    out.mkdir(parents=True, exist_ok=True)
    sizing = with_overrides(size(profile, family, opts.seed), opts.overrides)
    log.info("fit %s on %s (%d items, %d training events): %s", family.name, profile.name, profile.n_items,
             profile.train_tokens, {d.setting: d.value for d in sizing.decisions})

    with PeakRSS() as rss:
        from seqrec.ray_utils import init_ray

        init_ray(address=opts.address)
        t_prep = time.monotonic()
        sizing.model.update(prepare_text(family, sizing, dataset))
        prep_s = time.monotonic() - t_prep
        sizing, measured, plan = plan_fit(family, sizing, dataset, opts, spent_s=t_prep - t_start)
        base_path = write_base(family, sizing, str(dataset.path.resolve()), out)

        from seqrec.fit.search import build_grid, run_search

        t_search = time.monotonic()
        grid = build_grid(family, sizing, plan, base_path, out, opts.seed)
        sweep_record = run_search(grid, out, opts.overrides, opts.address)
        search_s = time.monotonic() - t_search

        from seqrec.fit.prior import choose_priors

        t_prior = time.monotonic()
        # the refinement is skipped where the budget would not leave time for the final passes
        deadline = t_start + prep_s + opts.budget_s - FINAL_PASSES_MARGIN * measured.eval_s - 10.0
        prior = choose_priors(sweep_record["checkpoint"], family.model, dataset, deadline=deadline)
        prior_s = time.monotonic() - t_prior
        model_dir = write_scoring_checkpoint(sweep_record["checkpoint"], out, prior.weights,
                                             note={"priors": prior.reason})
        # the only test evaluations of the fit: the chosen model, and (reported, never used) the model alone
        metrics = final_metrics(str(dataset.path), model_dir,
                                without_priors={k: 0.0 for k in prior.weights} if any(prior.weights.values()) else None)
        record = best_record(name=out.name, out_dir=out, dataset_path=str(dataset.path.resolve()),
                             sweep_record=sweep_record, checkpoint=model_dir, prior=prior.as_dict(), metrics=metrics)
        atomic_write_json(record, out / BEST_FILE)
    report = {
        "dataset": str(dataset.path.resolve()), "model": family.name, "registry_model": family.model,
        "seed": opts.seed, "overrides": opts.overrides, "profile": asdict(profile),
        "sizing": sizing.as_dict(), "probe": measured.as_dict(), "plan": plan.as_dict(),
        "trials": trial_summaries(out / SEARCH_DIR),
        "winner": {k: sweep_record[k] for k in ("trial_id", "step", "params", "checkpoint")},
        "priors": prior.as_dict(), "metrics": metrics,
        "time_s": {"total": round(time.monotonic() - t_start, 1), "text_features": round(prep_s, 1),
                   "budgeted": round(time.monotonic() - t_start - prep_s, 1), "search": round(search_s, 1),
                   "priors": round(prior_s, 1), "budget": opts.budget_s},
        "memory": {**rss.as_dict(), "scope": "driver only (joined a cluster)" if opts.address else
                   "driver + local Ray instance (PSS summed over the process tree)"},
        "best_record": str(out / BEST_FILE), "checkpoint": str(model_dir),
    }
    report["throughput"] = throughput(measured, report["trials"])
    atomic_write_json(report, out / REPORT_FILE)
    return report


def with_overrides(sizing: Sizing, overrides: dict[str, Any]) -> Sizing:
    """The sizing with --set values in place (so the probe measures what the trials run); a --set train.steps
    recomputes the schedule keys that follow from it unless they are set too."""
    from seqrec.fit.search import rescheduled

    if "train.steps" in overrides:
        sizing = rescheduled(sizing, int(overrides["train.steps"]), "set by --set")
    for key, value in overrides.items():
        section, _, rest = key.partition(".")
        if section == "train" and "." not in rest:
            sizing.train[rest] = value
        elif key.startswith("model.params.") and key.count(".") == 2:
            sizing.model[key.rsplit(".", 1)[1]] = value
        else:
            continue
        sizing.decisions.append(Decision(key, value, "--set", "fixed on the command line: not sized, not swept"))
    return sizing


def prepare_text(family: Family, sizing: Sizing, dataset) -> dict[str, Any]:
    """Fill the frozen encoder's feature cache for the catalog once (Flare's item tokens, the text prior's
    pooled features); returns model params the preparation resolved (Flare: text_dim)."""
    from seqrec.fit.prior import supports_prior
    from seqrec.models.registry import MODELS

    cls = MODELS[family.model][0]
    if not hasattr(cls, "prepare_params"):
        return {}
    params = dict(sizing.model)
    if supports_prior(family.model):
        params["text_prior_weight"] = 1.0  # > 0: the ID models fill the prior's cache only when it is on
    prepared = cls.prepare_params(params, dataset)
    return {k: v for k, v in prepared.items() if k not in sizing.model and k != "text_prior_weight"}


def plan_fit(family: Family, sizing: Sizing, dataset, opts: FitOptions, spent_s: float):
    """(sizing, probe, plan): probe the centre, cap the schedule to what the budget trains. The width is kept:
    a wider model needs proportionally fewer epochs (sizing.epochs_for), so halving it would not buy time, and a
    capped wide model beat a fully trained narrow one on validation (docs/fit.md)."""
    import math

    from seqrec.fit.prior import N_PRIOR_PASSES
    from seqrec.fit.probe import probe
    from seqrec.fit.search import experiment_base, plan_budget, rescheduled
    from seqrec.tune.runner import default_concurrency

    concurrency = default_concurrency({"num_workers": 1, "cpus_per_worker": 1.0})
    t0 = time.monotonic()
    measured = probe(experiment_base(family, sizing, str(dataset.path), "probe"), dataset)
    plan = plan_budget(opts.budget_s, spent_s + time.monotonic() - t0, sizing.train["steps"],
                       sizing.train["eval_every"], measured, concurrency, N_PRIOR_PASSES,
                       fixed_steps="train.steps" in opts.overrides)
    if plan.capped:
        sizing = rescheduled(sizing, plan.steps, f"capped by the budget ({math.floor(plan.search_s)} s of search)",
                             plan.validations)
    log.info("budget plan: %s", plan.as_dict())
    return sizing, measured, plan


def write_base(family: Family, sizing: Sizing, dataset_path: str, out: Path) -> Path:
    """<out>/base.yaml: the centre configuration (the search grid's base, also a valid `seqrec train` config)."""
    import yaml

    from seqrec.fit.search import experiment_base

    path = out / "base.yaml"
    tmp = out / ".base.yaml.tmp"
    tmp.write_text(yaml.safe_dump(experiment_base(family, sizing, dataset_path, f"fit_{family.name}"), sort_keys=False))
    tmp.replace(path)
    return path


def final_metrics(dataset_path: str, model_dir: Path,
                  without_priors: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Validation and test metrics of the scoring checkpoint, by `seqrec evaluate --checkpoint`'s own code; with
    `without_priors` (the prior weights at 0) also "test_without_priors": what the trained model alone scores
    (`seqrec evaluate --model-param transition_prior_weight=0 ...`), reported so the priors' share is visible."""
    from seqrec.eval.cli import run_evaluation

    metrics = {}
    for split in ("valid", "test"):
        _, res = run_evaluation(dataset_path, [str(model_dir)], split=split)
        metrics[split] = next(iter(res.values()))["metrics"]
    if without_priors:
        _, res = run_evaluation(dataset_path, [str(model_dir)], split="test", model_params=without_priors)
        metrics["test_without_priors"] = next(iter(res.values()))["metrics"]
    return metrics


def trial_summaries(sweep_dir: Path) -> list[dict[str, Any]]:
    import pandas as pd

    path = sweep_dir / "trials.csv"
    if not path.is_file():
        return []
    table = pd.read_csv(path)
    keep = [c for c in table.columns if c.startswith("param:") or c in (
        "trial_id", "stop", "final_step", "best_step", "best_val/ndcg@10/pes", "best_val/recall@1/pes",
        "seq_per_s", "time_total_s", "is_preset")]
    return json.loads(table[keep].to_json(orient="records"))


def throughput(probe, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step figures: the probe's (alone, one thread) and the trials' own (sequences/s while sharing the CPUs)."""
    rates = sorted(t["seq_per_s"] for t in trials if isinstance(t.get("seq_per_s"), (int, float)))
    return {"probe_s_per_step": round(probe.step_s, 4), "probe_tokens_per_s": round(probe.tokens_per_s, 1),
            "slots_per_step": probe.slots_per_step, "validation_pass_s": round(probe.eval_s, 2),
            "catalog_table_s": round(probe.table_s, 2),
            "trials_median_seq_per_s": rates[len(rates) // 2] if rates else None}
