"""Generalisation benchmark: `seqrec fit` for each model on each dataset, with seeds, against mostpop / markov /
lir_text / lir_bm25 on the same test users (issue #34).

    python benchmarks/bench_generalise.py                                 # every default dataset, model, seed
    python benchmarks/bench_generalise.py --datasets sci_lcrec raw_sample --models sasrec --seeds 0 --budget-s 300
    python benchmarks/bench_generalise.py --prepare-only                  # datasets + text features + baselines
    python benchmarks/bench_generalise.py --report-only                   # tables from what has finished
    python benchmarks/bench_generalise.py --report-only --register --seeds 0 1 2   # seeds run apart -> registry

Datasets (prepared under --work/data/, never inside the repository):
    scientific   Amazon Scientific, UniSRec split (../shared/data/Scientific)
    sci_lcrec    Amazon Scientific, LC-Rec JSON (../shared/data/Scientific_LCRec)
    raw_sample   the Amazon 2018 raw sample (Magazine_Subscriptions 5-core, ../shared/data/raw_sample)
    demo_long    synthetic: 1,500 users, 500 items, long sequences (30-120 events)
    demo_wide    synthetic: 8,000 users, 20,000 items, short sequences (5-12 events)

Restartable: each (dataset, model, seed) cell is one `seqrec fit` subprocess whose figures go to
benchmarks/results/generalise/<dataset>/<model>_s<seed>.json; a cell with that file is skipped, a cell whose fit
died half-way is started again from scratch. Cells run seed-major (every dataset and model for the first seed,
then the next seed), so an interrupted run still has complete tables for its first seeds. Baselines are computed
once per dataset (baselines.json beside the cells). Model selection is on validation only, inside `seqrec fit`;
test figures are read from its record. Prints one table per dataset (models: mean over seeds, per-seed test in
brackets) with the budget, per-step throughput and peak memory, and writes benchmarks/results/generalise_<time>.json.
When benchmarks/results_registry.py provides `append_record`, finished (dataset, model) cells over all the seeds
asked for are appended to the results registry (an id that exists already is left alone).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))
SHARED = Path(os.environ.get("SEQREC_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "results"
CELLS = RESULTS / "generalise"
DATASETS = ("scientific", "sci_lcrec", "raw_sample", "demo_long", "demo_wide")
MODELS = ("sasrec", "bert4rec", "flare_tid")
BASELINES = ("mostpop", "markov", "lir_text", "lir_bm25")
SHOWN = ("ndcg@10/pes", "recall@10/pes", "recall@1/pes")
# the two synthetic shapes: long sequences over a small catalog, short ones over a large catalog
DEMOS = {"demo_long": dict(n_users=1500, n_items=500, min_len=30, max_len=120, seed=11),
         "demo_wide": dict(n_users=8000, n_items=20000, min_len=5, max_len=12, seed=12)}
log = logging.getLogger("bench_generalise")


# ------------------------------------------------------------------------------------------- datasets
def prepare_dataset(name: str, work: Path) -> Path:
    """The prepared dataset directory of `name` under work/data (made on first use)."""
    out = work / "data" / name
    if (out / "meta.json").exists():
        return out
    if name in DEMOS:
        from seqrec.data.demo import DemoOptions, generate_demo

        generate_demo(out, DemoOptions(**DEMOS[name]))
        return out
    formats = {"scientific": ("unisrec", SHARED / "Scientific"), "sci_lcrec": ("lcrec", SHARED / "Scientific_LCRec"),
               "raw_sample": ("amazon2018", SHARED / "raw_sample")}
    if name not in formats:
        raise ValueError(f"unknown dataset {name!r}; known: {DATASETS}")
    fmt, source = formats[name]
    if not source.exists():
        raise FileNotFoundError(f"{source} not found (set SEQREC_SHARED_DATA)")
    seqrec(["data", "prepare", "--format", fmt, "--input", str(source), "--out", str(out)])
    return out


def seqrec(args: list[str]) -> None:
    """The seqrec command line in a subprocess (each fit gets its own Ray instance and memory)."""
    cmd = [sys.executable, "-m", "seqrec.cli", *args]
    log.info("$ seqrec %s", " ".join(args))
    paths = [str(ROOT / "platform"), *filter(None, [os.environ.get("PYTHONPATH")])]  # works without pip install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def baselines(name: str, path: Path) -> dict[str, Any]:
    """Valid and test metrics of the reference recommenders (cached in the dataset's cell folder)."""
    from seqrec.eval.cli import run_evaluation

    cache = CELLS / name / "baselines.json"
    result = json.loads(cache.read_text()) if cache.exists() else {}
    if not all(b in result for b in BASELINES):
        for split in ("valid", "test"):
            _, res = run_evaluation(path, list(BASELINES), split=split)
            for model, r in res.items():
                result.setdefault(model, {})[split] = r["metrics"]
                result[model]["n_rows"] = r["n_rows"]
    if PRIORS_ONLY not in result:
        result[PRIORS_ONLY] = priors_only(path)
    write_json(cache, result)
    return result


PRIORS_ONLY = "priors_only"  # markov + lir_text blended, the blend chosen on validation: the fit's priors alone


class PriorBlend:
    """log(1 + count(last -> j)) + ratio x cos(x_last, x_j): the two scoring priors of seqrec fit with no model
    under them (models/transition_prior.py, models/text_prior.py, the same objects), so the benchmark shows what
    a trained model adds beyond its priors."""

    max_len = None

    def __init__(self, dataset, ratio: float):
        from seqrec.eval.baselines import ItemTransition
        from seqrec.models.text_prior import TextPrior, catalog_table
        from seqrec.models.transition_prior import TransitionPrior

        self.text, self.trans, self.ratio = TextPrior(), TransitionPrior(), ratio
        self.text.attach(catalog_table(dataset, "minilm"), dataset.n_items)
        self.trans.attach(ItemTransition.from_dataset(dataset))
        self.n_items = dataset.n_items

    def score_all(self, batch):
        import torch

        scores = torch.zeros(batch["history"].shape[0], self.n_items)
        return self.trans.add(self.text.add(scores, batch, self.ratio), batch, 1.0)


def priors_only(path: Path) -> dict[str, Any]:
    """Valid and test metrics of PriorBlend at the validation-best ratio in 2^-4..2^6 (0: transitions only)."""
    from seqrec.data.dataset import PreparedDataset
    from seqrec.eval.evaluator import evaluate

    dataset = PreparedDataset.load(path)
    valid, test = dataset.eval_rows("valid"), dataset.eval_rows("test")
    blend = PriorBlend(dataset, 0.0)
    grid = {}
    for ratio in [0.0] + [2.0 ** k for k in range(-4, 7)]:
        blend.ratio = ratio
        grid[ratio] = evaluate(blend, valid, dataset.n_items).metrics
    blend.ratio = max(grid, key=lambda r: (grid[r]["ndcg@10/pes"], -r))
    return {"valid": grid[blend.ratio], "test": evaluate(blend, test, dataset.n_items).metrics, "ratio": blend.ratio,
            "n_rows": len(test)}


# ---------------------------------------------------------------------------------------------- cells
def cell_path(dataset: str, model: str, seed: int) -> Path:
    return CELLS / dataset / f"{model}_s{seed}.json"


def run_cell(dataset: str, path: Path, model: str, seed: int, budget_s: float, work: Path) -> dict[str, Any]:
    """One `seqrec fit`; its figures (from the fit report) go to the cell file."""
    out = work / "fit" / dataset / f"{model}_s{seed}"
    if out.exists():  # a fit that died half-way: start it again
        log.info("%s: removing the unfinished fit at %s", cell_path(dataset, model, seed).name, out)
        shutil.rmtree(out)
    t0 = time.monotonic()
    seqrec(["fit", "--dataset", str(path), "--model", model, "--seed", str(seed), "--budget-s", str(budget_s),
            "--out", str(out)])
    report = json.loads((out / "fit_report.json").read_text())
    cell = {
        "dataset": dataset, "model": model, "seed": seed, "budget_s": budget_s,
        "wall_s": round(time.monotonic() - t0, 1), "metrics": report["metrics"],
        "prior_weights": report["priors"]["weights"], "prior_reason": report["priors"]["reason"],
        "time_s": report["time_s"], "throughput": report["throughput"], "memory": report["memory"],
        "plan": report["plan"], "n_trials": len(report["trials"]), "winner": report["winner"],
        "sized": {d["setting"]: d["value"] for d in report["sizing"]["decisions"]},
        "profile": report["profile"], "fit_dir": str(out),
    }
    write_json(cell_path(dataset, model, seed), cell)
    return cell


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def load_cells(datasets, models, seeds) -> dict[tuple[str, str], list[dict[str, Any]]]:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for d in datasets:
        for m in models:
            for s in seeds:
                p = cell_path(d, m, s)
                if p.exists():
                    cells.setdefault((d, m), []).append(json.loads(p.read_text()))
    return cells


# --------------------------------------------------------------------------------------------- tables
def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def dataset_table(dataset: str, cells: dict, base: dict[str, Any], models) -> str:
    head = f"{'model':<22s}{'seeds':>6s}{'valid ndcg':>12s}" + "".join(f"{'test ' + k.split('/')[0]:>16s}" for k in SHOWN)
    lines = [head, "-" * len(head)]
    for name, r in base.items():
        lines.append(f"{name:<22s}{'-':>6s}{r['valid']['ndcg@10/pes']:>12.4f}"
                     + "".join(f"{r['test'][k]:>16.4f}" for k in SHOWN))
    speed = []
    for m in models:
        runs = cells.get((dataset, m), [])
        if not runs:
            lines.append(f"{m:<22s}{0:>6d}  (not run yet)")
            continue
        row = f"{m:<22s}{len(runs):>6d}{mean([c['metrics']['valid']['ndcg@10/pes'] for c in runs]):>12.4f}"
        row += "".join(f"{mean([c['metrics']['test'][k] for c in runs]):>16.4f}" for k in SHOWN)
        per_seed = ", ".join(f"s{c['seed']} {c['metrics']['test']['ndcg@10/pes']:.4f} ({prior_text(c)})" for c in runs)
        lines.append(row + f"   [{per_seed}]")
        alone = [c["metrics"].get("test_without_priors", c["metrics"]["test"])["ndcg@10/pes"] for c in runs]
        lines.append(f"{'  without its priors':<28s}{'':>12s}{mean(alone):>16.4f}")
        c = runs[0]
        speed.append(f"  {m}: budget {c['budget_s']:.0f} s (used {mean([r['time_s']['budgeted'] for r in runs]):.0f} s, "
                     f"{mean([r['n_trials'] for r in runs]):.1f} trials), {c['throughput']['probe_s_per_step']:.3f} s/step "
                     f"= {c['throughput']['probe_tokens_per_s']:.0f} tokens/s (probe, one core), peak memory "
                     f"{max(r['memory']['peak_pss_mb'] for r in runs):.0f} MB (PSS, fit + Ray), sized "
                     f"dim {c['sized'].get('model.params.dim')} steps {c['sized'].get('train.steps')}")
    beats = beat_lines(dataset, cells, base, models)
    return "\n".join(lines + speed + beats)


def prior_text(cell: dict) -> str:
    """The chosen prior weights of a cell, short: text=8.6 trans=0.5 (or 'no priors')."""
    weights = {k.split("_")[0]: v for k, v in cell.get("prior_weights", {}).items() if v > 0}
    return " ".join(f"{k}={v:g}" for k, v in weights.items()) or "no priors"


def beat_lines(dataset: str, cells: dict, base: dict[str, Any], models) -> list[str]:
    """Whether each model's mean test NDCG@10 (pes) beats markov and lir_text on this dataset."""
    out = []
    for m in models:
        runs = cells.get((dataset, m), [])
        if not runs:
            continue
        got = mean([c["metrics"]["test"]["ndcg@10/pes"] for c in runs])
        verdicts = [f"{b} {'beaten' if got > base[b]['test']['ndcg@10/pes'] else 'NOT beaten'}"
                    for b in ("markov", "lir_text") if b in base]
        out.append(f"  {m} test NDCG@10 {got:.4f}: " + ", ".join(verdicts))
    return out


# ------------------------------------------------------------------------------------------- registry
def append_to_registry(cells: dict, base_by_dataset: dict, seeds: list[int], budget_s: float) -> None:
    """Finished (dataset, model) cells over all `seeds` -> results registry records, where the registry exists."""
    try:
        from results_registry import append_record, load_records, repeated
    except ImportError:
        return
    existing = set(load_records())
    for (dataset, model), runs in sorted(cells.items()):
        runs = [c for c in runs if c["seed"] in seeds and c["budget_s"] == budget_s]
        if sorted(c["seed"] for c in runs) != sorted(seeds):
            continue
        rid = f"fit_{dataset}_{model}_{int(budget_s)}s_{len(seeds)}seeds"
        if rid in existing:
            continue
        metrics = {f"test/{k}": repeated({str(c["seed"]): c["metrics"]["test"][k] for c in runs}) for k in SHOWN}
        metrics["valid/ndcg@10/pes"] = repeated({str(c["seed"]): c["metrics"]["valid"]["ndcg@10/pes"] for c in runs})
        metrics["test_without_priors/ndcg@10/pes"] = repeated({str(c["seed"]): c["metrics"].get(
            "test_without_priors", c["metrics"]["test"])["ndcg@10/pes"] for c in runs})
        for b in ("markov", "lir_text", PRIORS_ONLY):
            if b in base_by_dataset.get(dataset, {}):
                metrics[f"test/{b}/ndcg@10/pes"] = base_by_dataset[dataset][b]["test"]["ndcg@10/pes"]
        append_record(id=rid, kind="generalisation", title=f"seqrec fit {model} on {dataset} ({int(budget_s)} s budget)",
                      command=f"python benchmarks/bench_generalise.py --datasets {dataset} --models {model} "
                              f"--seeds {' '.join(map(str, seeds))} --budget-s {budget_s:g}",
                      dataset=dataset, split="test", users=runs[0]["profile"]["n_test"], model=model,
                      seeds=sorted(seeds), metrics=metrics,
                      source=[str(cell_path(dataset, model, c["seed"]).relative_to(ROOT)) for c in runs],
                      note="selected on validation by seqrec fit (search + scoring priors); CPU, one core per trial")
        log.info("registry: appended %s", rid)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget-s", type=float, default=600.0, help="seqrec fit --budget-s of every cell")
    p.add_argument("--work", default=str(ROOT / "runs" / "generalise"), help="prepared datasets and fit outputs")
    p.add_argument("--prepare-only", action="store_true", help="datasets, text features and baselines only")
    p.add_argument("--report-only", action="store_true", help="print the tables of the finished cells, run nothing")
    p.add_argument("--register", action="store_true",
                   help="with --report-only: append the cells finished over all --seeds to the registry (e.g. seeds "
                        "run in separate sessions); a run does this by itself")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()

    paths = {d: prepare_dataset(d, work) for d in args.datasets}
    base = {d: baselines(d, paths[d]) for d in args.datasets}  # lir_text encodes the catalog's texts once here
    if not (args.prepare_only or args.report_only):
        for seed in args.seeds:  # seed-major: complete tables for the first seeds even if interrupted
            for d in args.datasets:
                for m in args.models:
                    if cell_path(d, m, seed).exists():
                        continue
                    try:
                        run_cell(d, paths[d], m, seed, args.budget_s, work)
                    except subprocess.CalledProcessError as e:  # keep going; the table says what is missing
                        log.error("%s %s seed %d failed (exit %s); rerun to retry", d, m, seed, e.returncode)
    cells = load_cells(args.datasets, args.models, args.seeds)
    text = []
    for d in args.datasets:
        from seqrec.data.dataset import PreparedDataset

        counts = PreparedDataset.load(paths[d]).meta["counts"]
        text.append(f"\n== {d}: {counts['users']} users, {counts['items']} items, {counts['test_rows']} test users "
                    f"(full ranking; models selected on validation by seqrec fit, scoring priors included)\n"
                    + dataset_table(d, cells, base[d], args.models))
    print("\n".join(text))
    if args.prepare_only:
        return 0
    out = RESULTS / f"generalise_{time.strftime('%Y%m%d_%H%M%S')}.json"
    write_json(out, {"budget_s": args.budget_s, "seeds": args.seeds, "datasets": args.datasets, "models": args.models,
                     "baselines": base, "cells": [c for runs in cells.values() for c in runs]})
    print(f"wrote {out}")
    if args.register or not args.report_only:
        append_to_registry(cells, base, args.seeds, args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
