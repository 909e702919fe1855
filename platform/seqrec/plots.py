"""PNG charts of runs (matplotlib, Agg backend: no display needed) and the run history they are drawn from.

    history.jsonl   one JSON record per line, appended by the training worker (rank 0):
                    {"kind": "train", "step", "loss", "lr", ...} every train.log_every steps,
                    {"kind": "valid", "step", "metrics": {...}} at every validation
    curves.png      training loss and validation metric by step (beside a run's summary.json)
    trial_curves.png  every sweep trial's validation curve (beside a sweep's best.json)
    --bucket-chart  `seqrec evaluate`: metrics by target popularity bucket, grouped bars per model

Every figure is written to a temporary file and renamed, so a reader never sees half a PNG.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)
HISTORY_FILE, CURVES_FILE, TRIAL_CURVES_FILE = "history.jsonl", "curves.png", "trial_curves.png"


# ------------------------------------------------------------------------------------------- history
def append_history(path: str | Path, record: dict[str, Any]) -> None:
    """One record, one line; a line is written whole by a single write, so a crash loses at most that line."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")


class RunHistory:
    """A training worker's history.jsonl: rank 0 passes the path, other ranks None (then `add` does nothing).
    A fresh run (no checkpoint to resume) starts it anew, so no earlier run of the same name shows in its curves."""

    def __init__(self, path: str | Path | None, fresh: bool):
        self.path = Path(path) if path else None
        if self.path is not None and fresh and self.path.exists():
            self.path.unlink()

    def add(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            append_history(self.path, record)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The records by (kind, step), sorted by step; a resumed run repeats steps after its checkpoint: the
    later record wins. A missing file is an empty history; a torn last line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        latest[(rec.get("kind", "train"), int(rec["step"]))] = rec
    return sorted(latest.values(), key=lambda r: (int(r["step"]), r.get("kind", "")))


# ------------------------------------------------------------------------------------------ figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)
    tmp.replace(path)
    return path


def training_curves(histories: dict[str, list[dict[str, Any]]], metric: str, path: str | Path,
                    title: str = "") -> Path | None:
    """Loss (left) and validation `metric` (right) by step, one line per history (a staged run: one per stage,
    drawn one after the other on a shared step axis). Returns the path, or None when nothing was recorded."""
    if not any(histories.values()):
        return None
    plt = _pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for label, records in histories.items():
        train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
        valid = [r for r in records if r.get("kind") == "valid" and metric in r.get("metrics", {})]
        if train:
            ax_loss.plot([offset + r["step"] for r in train], [r["loss"] for r in train], marker=".", label=label)
        if valid:
            xs, ys = [offset + r["step"] for r in valid], [r["metrics"][metric] for r in valid]
            line, = ax_val.plot(xs, ys, marker="o", label=label)
            best = max(range(len(ys)), key=lambda i: ys[i])
            ax_val.scatter([xs[best]], [ys[best]], s=120, facecolors="none", edgecolors=line.get_color(),
                           label=f"{label} best {ys[best]:.4f} @ step {valid[best]['step']}")
        if len(histories) > 1:  # stages follow each other; mark where the next one starts
            last = max([r["step"] for r in records], default=0)
            for ax in (ax_loss, ax_val):
                ax.axvline(offset, color="gray", lw=0.6, ls=":")
            offset += last
    ax_loss.set(title="training loss (mean over the logging window)", xlabel="training step", ylabel="loss")
    ax_val.set(title=f"validation {metric}", xlabel="training step", ylabel=metric)
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or "training curves")
    fig.tight_layout()
    return _save(fig, path)


def run_curves(run_dirs: dict[str, str | Path], metric: str, out_dir: str | Path, title: str = "") -> Path | None:
    """curves.png in `out_dir` from the history.jsonl of each run directory (label -> dir). Plotting is a
    by-product: a failure is logged, never raised, so it cannot cost a finished training its summary."""
    try:
        histories = {label: read_history(Path(d) / HISTORY_FILE) for label, d in run_dirs.items()}
        return training_curves(histories, metric, Path(out_dir) / CURVES_FILE, title)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("could not draw the training curves in %s: %s", out_dir, e)
        return None


def trial_curves(histories: dict[str, Any], metric_column: str, path: str | Path, title: str = "",
                 labels: dict[str, str] | None = None) -> Path | None:
    """Every trial's validation curve (histories: trial id -> DataFrame with `step` and `metric_column`), one
    line each, its best report circled; the legend names the trials (and their swept values, `labels`)."""
    curves = {t: df for t, df in histories.items() if df is not None and len(df) and metric_column in df}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for trial_id, df in curves.items():
        line, = ax.plot(df["step"], df[metric_column], marker=".", alpha=0.85,
                        label=(labels or {}).get(trial_id, trial_id))
        best = df[metric_column].astype(float).idxmax()
        ax.scatter([df.at[best, "step"]], [df.at[best, metric_column]], s=90, facecolors="none",
                   edgecolors=line.get_color())
    ax.set(xlabel="training step", ylabel=metric_column, title=title or f"validation curves of {len(curves)} trials")
    ax.grid(alpha=0.3)
    if len(curves) <= 15:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def bucket_chart(buckets: dict[str, dict[str, dict[str, Any]]], metrics: Iterable[str], path: str | Path,
                 title: str = "") -> Path:
    """Grouped bars: x = target popularity bucket (with its number of rows), one bar per model, one panel per
    metric. `buckets`: model -> bucket label -> {"n": rows, "metrics": {...}} (eval.evaluator.bucket_metrics)."""
    plt = _pyplot()
    metrics = list(metrics)
    models = list(buckets)
    labels = list(next(iter(buckets.values())))
    panel_width = min(8.0, 2.5 + 0.45 * len(labels) * max(1, len(models)))
    fig, axes = plt.subplots(1, len(metrics), figsize=(panel_width * len(metrics), 4.4), squeeze=False)
    width = 0.8 / max(1, len(models))
    counts = next(iter(buckets.values()))
    for ax, metric in zip(axes.flat, metrics):
        for i, model in enumerate(models):
            ys = [buckets[model][b]["metrics"].get(metric, math.nan) if buckets[model][b]["n"] else math.nan
                  for b in labels]
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(labels))]
            bars = ax.bar(xs, ys, width=width, label=model)
            ax.bar_label(bars, fmt="%.3f", fontsize=6, padding=1)  # a 0.000 bar is visible as its label
        for j, b in enumerate(labels):
            if not counts[b]["n"]:
                ax.text(j, 0.03, "no rows", ha="center", va="bottom", fontsize=8, color="gray",
                        transform=ax.get_xaxis_transform())  # x in data units, y as a fraction of the axes
        ax.set_xticks(range(len(labels)), [f"{b}\n({counts[b]['n']} rows)" for b in labels])
        ax.set(xlabel="occurrences of the target item in the training sequences", ylabel=metric, title=metric)
        ax.margins(y=0.12)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "metrics by target popularity")
    fig.tight_layout()
    return _save(fig, path)
