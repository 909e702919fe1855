"""What a finished sweep leaves for people and for Serve: trials table, plot and the best record.

    trials.csv / trials.parquet   one row per trial: swept values, stop reason, final and best validation metrics
    sweep.png                     validation metric vs each swept hyperparameter (best per trial), learning curves
    trial_curves.png              every trial's validation curve, labelled with its swept values
    best.json                     the winner: config, checkpoint, validation and test metrics

The winner is the trial report with the best validation metric over all trials and steps (model selection on
validation only); its checkpoint is re-evaluated on valid and test with the same code path as
`seqrec evaluate --dataset D --checkpoint CKPT` (seqrec.eval.cli.run_evaluation), so the command reproduces
the record's numbers exactly.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
TABLE_CSV, TABLE_PARQUET, PLOT_FILE, BEST_FILE = "trials.csv", "trials.parquet", "sweep.png", "best.json"


def trial_rows(results, sweep: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """(one row per trial, each trial's report history) from a Tune ResultGrid."""
    from seqrec.tune.runner import metric_key

    grid = sweep["grid"]
    mk, mode = metric_key(grid["tune"]["metric"]), grid["tune"]["mode"]
    patience = int(_fixed_or_base(sweep, "train.patience", ("train", "patience"), 0) or 0)
    budget = grid["tune"].get("time_budget_s")
    rungs = asha_rungs(sweep)
    rows, histories = [], {}
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or (Path(result.path).name if result.path else "unknown")
        config = result.config or {}  # a restored trial that never started has no config
        params = {k: config.get(k) for k in sorted(sweep["space"])}  # sorted: the same columns after a restore
        steps = int(params.get("train.steps") or sweep["fixed"].get("train.steps") or sweep["base_steps"])
        df = result.metrics_dataframe
        row: dict[str, Any] = {"trial_id": trial_id, **{f"param:{k}": v for k, v in params.items()},
                               "is_preset": bool(sweep["preset_point"]) and params == sweep["preset_point"],
                               "steps": steps, "error": str(result.error)[:500] if result.error else None}
        if df is None or df.empty or mk not in df.columns:
            row.update(stop="error" if result.error else ("time_budget" if budget else "no_report"), n_reports=0)
            rows.append(row)
            continue
        # one row per step: a resumed trial may repeat its final report (see runner.run_trial)
        df = df.dropna(subset=[mk]).drop_duplicates(subset=["step"], keep="first").sort_values("step")
        histories[trial_id] = df
        best, last = df.loc[_best_row(df, mk, mode)], df.iloc[-1]
        final_step = int(last["step"])
        stop = stop_reason(df["step"].astype(int).tolist(), steps, rungs=rungs, budget=budget, patience=patience,
                           best_step=int(best["step"]), error=bool(result.error))
        row.update(
            stop=stop, n_reports=len(df), final_step=final_step, best_step=int(best["step"]),
            **{f"best_{mk}": float(best[mk]), f"final_{mk}": float(last[mk])},
            **{f"best_{c}": float(best[c]) for c in df.columns
               if c.startswith("val/") and c != mk and pd.api.types.is_numeric_dtype(df[c])},
            final_loss=_float(last.get("loss")), seq_per_s=_float(last.get("seq_per_s")),
            time_total_s=_float(last.get("time_total_s")),
            best_checkpoint=str(best.get("checkpoint_path")) if isinstance(best.get("checkpoint_path"), str) else None,
            trial_dir=str(result.path),
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty and f"best_{mk}" in table:
        table = table.sort_values(f"best_{mk}", ascending=(mode == "min"), na_position="last", kind="stable")
    return table.reset_index(drop=True), histories


def _best_row(df: pd.DataFrame, mk: str, mode: str):
    """Index of a trial's best report: the best value of `mk`; among tied reports the earliest whose checkpoint is
    still on disk. Ray keeps the top checkpoints by score but breaks ties its own way (it may evict the earliest
    of several equal scores, common on small validation sets), so the first tied report's checkpoint can be gone
    while an equal one remains."""
    target = df[mk].max() if mode == "max" else df[mk].min()
    tied = df.index[df[mk] == target]
    if "checkpoint_path" in df.columns:
        for i in tied:
            if _has_weights(df.at[i, "checkpoint_path"]):
                return i
    return tied[0]


def _has_weights(checkpoint: Any) -> bool:
    """A checkpoint directory path whose weights file is (still) on disk."""
    from seqrec.models.registry import WEIGHTS_FILE

    return isinstance(checkpoint, str) and bool(checkpoint) and (Path(checkpoint) / WEIGHTS_FILE).is_file()


def stop_reason(report_steps: list[int], total_steps: int, *, rungs: set[int], budget: float | None,
                patience: int = 0, best_step: int | None = None, error: bool = False) -> str:
    """Why a trial ended, from its (sorted) report steps: error | completed | patience (the trainer's early
    stopping) | scheduler (ASHA: the last report is the first at or past a rung, where ASHA decides) |
    time_budget (stopped mid-way when the sweep's budget ran out)."""
    final = report_steps[-1]
    if error:
        return "error"
    if final >= total_steps:
        return "completed"
    if patience and best_step is not None and sum(s > best_step for s in report_steps) >= patience:
        return "patience"
    previous = report_steps[-2] if len(report_steps) > 1 else 0
    if budget and not any(previous < r <= final for r in rungs):
        return "time_budget"
    return "scheduler"


def asha_rungs(sweep: dict[str, Any]) -> set[int]:
    """The steps at which ASHA may stop a trial (grace_period x reduction_factor^k below max_t)."""
    from seqrec.tune.config import asha_schedule

    if sweep["grid"]["tune"]["scheduler"]["type"] != "asha":
        return set()
    max_t, grace, factor = asha_schedule(sweep)
    rungs, t = set(), float(grace)
    while t < max_t:
        rungs.add(int(t))
        t *= factor
    return rungs


def write_table(table: pd.DataFrame, sweep_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, write in ((TABLE_CSV, lambda p: table.to_csv(p, index=False)),
                        (TABLE_PARQUET, lambda p: pq.write_table(pa.Table.from_pandas(_parquet_safe(table),
                                                                                      preserve_index=False), p))):
        tmp = sweep_dir / f".{name}.tmp"
        write(tmp)
        tmp.replace(sweep_dir / name)


def _parquet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """Swept columns can mix types (choice over [true, 2]): store those as strings rather than fail."""
    out = table.copy()
    for c in out.columns:
        if out[c].dtype == object:
            kinds = {type(v) for v in out[c].dropna()}
            if len(kinds) > 1:
                out[c] = out[c].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return out


# how each stop reason (stop_reason) is drawn in the per-hyperparameter panels
STOP_STYLES = {
    "completed": dict(c="tab:blue", marker="o", label="ran all its steps"),
    "patience": dict(c="tab:green", marker="s", label="early-stopped (patience)"),
    "time_budget": dict(c="tab:orange", marker="^", label="cut by the sweep's time budget"),
    "scheduler": dict(c="tab:gray", marker="x", label="stopped by ASHA"),
    "error": dict(c="tab:red", marker="x", label="error"),
}


def write_plot(table: pd.DataFrame, histories: dict[str, pd.DataFrame], sweep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from seqrec.tune.config import SpaceSpec, is_log_scale
    from seqrec.config import from_dict
    from seqrec.tune.runner import metric_key

    grid = sweep["grid"]
    mk = metric_key(grid["tune"]["metric"])
    space = {k: from_dict(SpaceSpec, v) for k, v in sweep["space"].items()}
    n = len(space) + 1
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    ok = table[table.get(f"best_{mk}", pd.Series(dtype=float)).notna()] if f"best_{mk}" in table else table.iloc[:0]
    for ax, (key, spec) in zip(axes.flat, space.items()):
        col = f"param:{key}"
        ys = ok[f"best_{mk}"].to_numpy(dtype=float) if len(ok) else np.array([])
        vals = ok[col].tolist() if len(ok) else []
        numeric = spec.kind() not in ("choice", "grid") and \
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        if numeric and vals:
            xs = np.asarray(vals, dtype=float)
        else:  # choices (numbers, bools, strings): positions of the choices in grid-file order
            cats = [str(c) for c in spec.values()] if spec.kind() in ("choice", "grid") else sorted({str(v) for v in vals})
            xs = np.asarray([cats.index(str(v)) if str(v) in cats else len(cats) for v in vals], dtype=float)
            ax.set_xticks(range(len(cats)), cats)
            ax.set_xlim(-0.5, len(cats) - 0.5)
        stops = ok["stop"].to_numpy() if len(ok) else np.array([], dtype=object)
        for reason, style in STOP_STYLES.items():
            sel = stops == reason
            if sel.any():
                ax.scatter(xs[sel], ys[sel], **style)
        preset = ok["is_preset"].to_numpy(dtype=bool) if len(ok) else np.array([], dtype=bool)
        if preset.any():
            ax.scatter(xs[preset], ys[preset], s=160, facecolors="none", edgecolors="tab:red", label="paper preset")
        if numeric and is_log_scale(spec) and len(xs) and (xs > 0).all():
            ax.set_xscale("log")
            ax.tick_params(axis="x", which="both", labelrotation=30)  # minor labels crowd within one decade
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {mk}")
        ax.grid(alpha=0.3)
    ax = axes.flat[len(space)]
    for trial_id, df in histories.items():
        ax.plot(df["step"], df[mk], marker=".", alpha=0.8, label=trial_id[-5:])
    ax.set_xlabel("training step")
    ax.set_ylabel(mk)
    ax.set_title("learning curves (validation)")
    ax.grid(alpha=0.3)
    if len(histories) <= 12:
        ax.legend(fontsize=7)
    if space:
        axes.flat[0].legend(fontsize=7)
    for extra in list(axes.flat)[n:]:
        extra.axis("off")
    fig.suptitle(f"sweep {grid['name']}: {len(table)} trials, selection by validation {grid['tune']['metric']}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_trial_curves(table: pd.DataFrame, histories: dict[str, pd.DataFrame], sweep: dict[str, Any],
                       sweep_dir: Path) -> Path | None:
    """trial_curves.png: each trial's validation metric by step (seqrec.plots.trial_curves), the legend giving
    its swept values and why it stopped."""
    from seqrec.plots import TRIAL_CURVES_FILE, trial_curves
    from seqrec.tune.runner import metric_key

    grid = sweep["grid"]
    labels = {}
    for _, row in table.iterrows():
        values = ", ".join(f"{k.split('.')[-1]}={_short(row.get(f'param:{k}'))}" for k in sweep["space"])
        labels[row["trial_id"]] = f"{str(row['trial_id'])[-5:]} {values} ({row.get('stop')})"
    return trial_curves(histories, metric_key(grid["tune"]["metric"]), sweep_dir / TRIAL_CURVES_FILE,
                        f"sweep {grid['name']}: validation {grid['tune']['metric']} of every trial "
                        f"(circle: its best report)", labels)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def best_record(table: pd.DataFrame, sweep: dict[str, Any], sweep_dir: Path) -> dict[str, Any]:
    from seqrec.eval.cli import run_evaluation
    from seqrec.tune.runner import metric_key

    grid = sweep["grid"]
    mk = metric_key(grid["tune"]["metric"])
    col = f"best_{mk}"
    if col not in table or table[col].notna().sum() == 0:
        raise RuntimeError(f"sweep {grid['name']}: no trial reported {mk}; see the trial errors in {sweep_dir}")
    win = table.loc[table[col].notna()].iloc[0]  # the table is sorted best first
    ckpt = win["best_checkpoint"]
    if not _has_weights(ckpt):
        raise RuntimeError(f"the best checkpoint {ckpt!r} of trial {win['trial_id']} is gone")
    params = {k: _py(win[f"param:{k}"]) for k in sweep["space"]}
    from seqrec.tune.config import experiment_dict

    config = experiment_dict(sweep["base"], sweep["fixed"], params, derived=sweep["derived"])
    metrics = {}
    for split in ("valid", "test") if sweep.get("evaluate_test", True) else ("valid",):
        _, res = run_evaluation(sweep["dataset_path"], [ckpt], split=split)
        metrics[split] = next(iter(res.values()))["metrics"]
    return {
        "name": grid["name"], "sweep_dir": str(sweep_dir), "trial_id": win["trial_id"],
        "checkpoint": str(Path(ckpt).resolve()), "dataset": sweep["dataset_path"], "model": config["model"]["name"],
        "step": int(win["best_step"]), "selection": {"metric": grid["tune"]["metric"], "mode": grid["tune"]["mode"],
                                                     "reported_valid": float(win[col])},
        "params": params, "config": config, "metrics": metrics,
        "n_trials": int(len(table)),
        "reproduce": f"seqrec evaluate --dataset {sweep['dataset_path']} --checkpoint {Path(ckpt).resolve()}",
    }


def write_outputs(sweep_dir: Path, sweep: dict[str, Any], results) -> dict[str, Any]:
    from seqrec.data.dataset import atomic_write_json

    table, histories = trial_rows(results, sweep)
    write_table(table, sweep_dir)
    write_plot(table, histories, sweep, sweep_dir / PLOT_FILE)
    write_trial_curves(table, histories, sweep, sweep_dir)
    record = best_record(table, sweep, sweep_dir)
    atomic_write_json(record, sweep_dir / BEST_FILE)
    mk = f"best_val/{sweep['grid']['tune']['metric']}"
    shown = [c for c in ["trial_id", *[f"param:{k}" for k in sweep["space"]], "stop", "final_step", "best_step", mk]
             if c in table]
    print(f"\nsweep {sweep['grid']['name']}: {len(table)} trials -> {sweep_dir}\n"
          f"{table[shown].to_string(index=False)}\n"
          f"best: trial {record['trial_id']} step {record['step']}  valid {sweep['grid']['tune']['metric']}="
          f"{record['metrics']['valid'].get(sweep['grid']['tune']['metric'], float('nan')):.4f}  test "
          f"{sweep['grid']['tune']['metric']}={record['metrics'].get('test', {}).get(sweep['grid']['tune']['metric'], float('nan')):.4f}"
          f"\n  {record['checkpoint']}\n", flush=True)
    return record


def load_best(name_or_path: str, storage_path: str = "runs/tune") -> dict[str, Any]:
    """A sweep's best record by sweep name (<storage_path>/<name>/best.json), sweep dir or file path."""
    import json

    p = Path(name_or_path)
    candidates = [p] if p.suffix == ".json" else [p / BEST_FILE, Path(storage_path) / name_or_path / BEST_FILE]
    for c in candidates:
        if c.is_file():
            return json.loads(c.read_text())
    raise FileNotFoundError(f"no best record {name_or_path!r}; looked for {[str(c) for c in candidates]}")


def _fixed_or_base(sweep: dict[str, Any], dotted: str, path: tuple[str, ...], default: Any) -> Any:
    if dotted in sweep["fixed"]:
        return sweep["fixed"][dotted]
    node: Any = sweep["base"]
    for k in path:
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v
