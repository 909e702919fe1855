"""Ray Tune sweeps: the FLARE grid files, and one smoke sweep on the demo catalog that is interrupted, restored
(finished trials are not re-run) and whose best record `seqrec evaluate` reproduces exactly."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import yaml

from seqrec.config import read_yaml, resolve_config_path
from seqrec.tune.config import (
    base_data,
    check_grid_points,
    experiment_dict,
    fixed_overrides,
    load_grid,
    parse_grid,
    swept_space,
)

DATASETS = ("games", "office", "scientific", "music", "arts", "pets")
# FLARE Table 2 (Flare ID): layers, heads, dim, hidden, lr, batch, steps
TABLE2 = {"games": (2, 2, 64, 256, 1e-3, 1, 50000), "office": (2, 2, 64, 256, 1e-3, 1, 50000),
          "scientific": (4, 16, 512, 2048, 1e-4, 16, 50000), "music": (8, 8, 256, 1024, 1e-5, 16, 50000),
          "arts": (2, 8, 768, 3072, 1e-4, 16, 50000), "pets": (2, 16, 1024, 4096, 1e-4, 32, 10000)}
# FLARE Table 3 (Flare T+ID): + Perceiver heads, layers, latents, weight decay (Scientific's "5" steps read as 5K)
TABLE3 = {"games": (8, 16, 1024, 4096, 1e-4, 2, 5000, 16, 8, 2, 1e-3),
          "office": (2, 4, 768, 3072, 1e-4, 16, 5000, 16, 2, 8, 1e-2),
          "scientific": (2, 8, 256, 1024, 1e-4, 8, 5000, 8, 2, 2, 1e-3),
          "music": (2, 2, 1024, 4096, 1e-5, 2, 25000, 8, 8, 4, 1e-3),
          "arts": (4, 4, 512, 2048, 1e-4, 8, 10000, 2, 2, 2, 1e-3),
          "pets": (2, 8, 256, 1024, 1e-4, 16, 25000, 8, 2, 2, 1e-3)}


def _preset_config(name: str) -> dict:
    grid = load_grid(name)
    base, fixed, space = base_data(grid), fixed_overrides(grid), swept_space(grid)
    check_grid_points(grid, base, fixed, space)  # the preset and every space extreme make valid model configs
    return experiment_dict(base, fixed, derived=grid.derived)


@pytest.mark.parametrize("dataset", DATASETS)
def test_flare_grids_hold_the_paper_presets(dataset):
    cfg = _preset_config(f"flare_id/{dataset}")
    m, t = cfg["model"]["params"], cfg["train"]
    assert cfg["model"]["name"] == "flare_id"
    assert (m["layers"], m["heads"], m["dim"], m["hidden"], t["lr"], t["batch_size"], t["steps"]) == TABLE2[dataset]
    assert t["eval_metric"] == "recall@10/pes"

    cfg = _preset_config(f"flare_tid/{dataset}")
    m, t = cfg["model"]["params"], cfg["train"]
    assert cfg["model"]["name"] == "flare"
    got = (m["layers"], m["heads"], m["dim"], m["hidden"], t["lr"], t["batch_size"], t["steps"],
           m["perceiver_heads"], m["perceiver_layers"], m["perceiver_latents"], t["weight_decay"])
    assert got == TABLE3[dataset]
    assert m["perceiver_dim"] == m["dim"] and m["contrastive"] is True

    # the preset is the centre of the swept space
    for family in ("flare_id", "flare_tid"):
        grid = load_grid(f"{family}/{dataset}")
        for key, value in grid.preset.items():
            if key in grid.space:
                assert grid.space[key].contains(value), (family, key, value)


def test_grid_files_reject_unknown_and_bad_entries(tmp_path):
    good = read_yaml(resolve_config_path("smoke_demo", "grids"))
    parse_grid(good)
    with pytest.raises(ValueError, match="unknown keys"):
        parse_grid({**good, "spaces": {}})
    with pytest.raises(ValueError, match="unknown keys"):
        parse_grid({**good, "tune": {**good["tune"], "metrik": "x"}})
    with pytest.raises(ValueError, match="exactly one"):
        parse_grid({**good, "space": {"train.lr": {"choice": [1], "loguniform": [1e-4, 1e-3]}}})
    with pytest.raises(ValueError, match="low must be > 0"):
        parse_grid({**good, "space": {"train.lr": {"loguniform": [0, 1e-3]}}})
    with pytest.raises(ValueError, match="low < high"):
        parse_grid({**good, "space": {"train.lr": {"uniform": [1e-3, 1e-4]}}})
    with pytest.raises(ValueError, match="must map dotted keys"):
        parse_grid({**good, "space": {"train.lr": [1e-3, 1e-4]}})
    # a dotted key that does not exist in the training config fails before any trial starts
    bad = parse_grid({**good, "space": {"train.learning_rate": {"choice": [1e-3]}}})
    with pytest.raises(ValueError, match="learning_rate"):
        check_grid_points(bad, base_data(bad), fixed_overrides(bad), swept_space(bad))
    bad = parse_grid({**good, "space": {"model.params.depth": {"choice": [1, 2]}}})
    with pytest.raises(ValueError, match="depth"):
        check_grid_points(bad, base_data(bad), fixed_overrides(bad), swept_space(bad))
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({**good, "tune": {**good["tune"], "mode": "best"}}))
    with pytest.raises(ValueError, match="mode"):
        load_grid(str(path))
    # --set fixes a key: it is no longer swept
    grid = parse_grid(good)
    assert "train.lr" not in swept_space(grid, {"train.lr": 1e-3}) and "train.lr" in swept_space(grid)


def interrupt_once(after: int, marker: str):
    """A Tune callback that interrupts the sweep like Ctrl+C (Tune treats SIGUSR1 as SIGINT) once `after`
    trials have completed; the marker file keeps the restored sweep (which unpickles it) from firing again."""
    from ray.tune import Callback

    class InterruptOnce(Callback):
        def __init__(self):
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            if self.done >= after and not os.path.exists(marker):
                Path(marker).write_text(trial.trial_id)
                os.kill(os.getpid(), signal.SIGUSR1)

    return InterruptOnce()


def _trial_files(sweep_dir: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sweep_dir.glob("run_trial_*/result.json")}


def test_smoke_sweep_interrupt_resume_and_best_record(ray_session, demo_dataset, tmp_path):
    from seqrec.cli import main
    from seqrec.tune.runner import run_sweep

    storage = tmp_path / "tune"
    sweep_dir = storage / "smoke_demo"
    overrides = {"data.path": str(demo_dataset.path), "train.steps": 8}
    marker = tmp_path / "interrupted"
    # 3 trials, 2 at a time (2 CPUs, one Train worker each): the first to finish interrupts the sweep (like Ctrl+C)
    first = run_sweep("smoke_demo", overrides, storage_path=str(storage), num_samples=3,
                      callbacks=[interrupt_once(1, str(marker))])
    assert marker.exists(), "the sweep was interrupted"
    done_id = marker.read_text()  # the trial whose completion triggered the interruption
    assert first["n_trials"] <= 3  # outputs are written for what ran so far
    before = _trial_files(sweep_dir)
    finished = next(name for name in before if name.startswith(f"run_trial_{done_id}_"))
    ckpts = sorted(x.name for x in (sweep_dir / "trials" / f"trial_{done_id}").glob("checkpoint_*"))
    assert ckpts

    # resume through the CLI (Tuner.restore with resume_unfinished=True)
    rc = main(["tune", "--grid", "smoke_demo", "--storage-path", str(storage), "--resume"])
    assert rc == 0
    after = _trial_files(sweep_dir)
    assert len(after) == 3 and set(before) <= set(after)
    # the finished trial was not re-run: not a byte of its results changed, no new checkpoint
    assert after[finished] == before[finished]
    assert sorted(x.name for x in (sweep_dir / "trials" / f"trial_{done_id}").glob("checkpoint_*")) == ckpts

    # the table: every trial, its swept values and metrics; CSV and Parquet agree
    table = pd.read_parquet(sweep_dir / "trials.parquet")
    csv = pd.read_csv(sweep_dir / "trials.csv")
    assert len(table) == len(csv) == 3 and list(table.columns) == list(csv.columns)
    assert table["error"].isna().all() and set(table["stop"]) <= {"completed", "scheduler"}
    for col in ("param:train.lr", "param:model.params.dim", "param:model.params.layers", "best_val/recall@10/pes"):
        assert table[col].notna().all(), col
    assert table["is_preset"].sum() == 1  # the paper-preset point ran as one of the trials
    preset = table[table["is_preset"]].iloc[0]
    assert preset["param:train.lr"] == pytest.approx(3e-3) and preset["param:model.params.dim"] == 16
    assert (table["final_step"] <= 8).all() and (table["final_step"] == 8).any()
    # plot and TensorBoard logs
    png = (sweep_dir / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert len({p.parent for p in sweep_dir.glob("run_trial_*/events.out.tfevents.*")}) == 3  # a resumed trial adds a file

    # the best record: the best validation report of the sweep, and `seqrec evaluate` reproduces its numbers
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["selection"]["reported_valid"] == pytest.approx(table["best_val/recall@10/pes"].max(), abs=1e-12)
    assert best["metrics"]["valid"]["recall@10/pes"] == pytest.approx(best["selection"]["reported_valid"], abs=1e-12)
    assert Path(best["checkpoint"], "model.safetensors").is_file()
    assert best["config"]["model"]["name"] == "flare_id" and best["config"]["train"]["steps"] == 8
    out = tmp_path / "eval.json"
    rc = main(["evaluate", "--dataset", str(demo_dataset.path), "--checkpoint", best["checkpoint"], "--out", str(out)])
    assert rc == 0
    evaluated = next(iter(json.loads(out.read_text())["results"].values()))["metrics"]
    assert evaluated == best["metrics"]["test"]  # exactly equal

    # a finished sweep cannot be started again under the same name
    with pytest.raises(ValueError, match="already holds a sweep"):
        run_sweep("smoke_demo", overrides, storage_path=str(storage))


def test_time_budget_stops_the_sweep(ray_session, demo_dataset, tmp_path):
    """tune.time_budget_s (here run_sweep's argument, the CLI's --time-budget-s) ends a sweep on time: trials
    still training are stopped and labelled time_budget, trials not yet started never run; the outputs cover
    what ran. FIFO scheduling, so no stop can come from ASHA."""
    import time

    from seqrec.tune.runner import run_sweep

    grid = read_yaml(resolve_config_path("smoke_demo", "grids"))
    grid["tune"]["scheduler"] = {"type": "fifo"}
    path = tmp_path / "budget_demo.yaml"
    path.write_text(yaml.safe_dump({**grid, "name": "budget_demo"}))
    storage = tmp_path / "tune"
    overrides = {"data.path": str(demo_dataset.path), "train.steps": 20000, "train.eval_every": 50,
                 "train.log_every": 50}
    budget = 75.0  # the first two trials report within ~30 s of starting, well before it ends
    t0 = time.monotonic()
    best = run_sweep(str(path), overrides, storage_path=str(storage), num_samples=6, time_budget_s=budget)
    wall = time.monotonic() - t0
    assert wall < budget + 120, wall  # stopping and writing the outputs take a little longer than the budget
    table = pd.read_csv(storage / "budget_demo" / "trials.csv")
    assert set(table["stop"]) <= {"time_budget"} and (table["final_step"] < 20000).all(), table
    assert best["n_trials"] == len(table) and best["metrics"]["test"]
    sweep = json.loads((storage / "budget_demo" / "sweep.json").read_text())
    assert sweep["grid"]["tune"]["time_budget_s"] == budget

    # --report-only: the same outputs again from the saved results, no trial run
    from seqrec.cli import main

    (storage / "budget_demo" / "trials.csv").unlink()
    assert main(["tune", "--grid", str(path), "--storage-path", str(storage), "--report-only"]) == 0
    again = pd.read_csv(storage / "budget_demo" / "trials.csv")
    pd.testing.assert_frame_equal(again, table)
    assert json.loads((storage / "budget_demo" / "best.json").read_text())["metrics"] == best["metrics"]


def test_asha_stop_labels(demo_dataset, tmp_path):
    """A trial is 'scheduler'-stopped when its last report is the first at or past an ASHA rung."""
    from seqrec.tune.config import load_grid
    from seqrec.tune.report import asha_rungs, stop_reason
    from seqrec.tune.runner import build_sweep

    sweep = build_sweep(load_grid("smoke_demo"), {"data.path": str(demo_dataset.path)}, tmp_path / "x")
    assert asha_rungs(sweep) == {4, 8}  # grace 4, reduction factor 2, 12 steps
    assert stop_reason([4, 8], 12, rungs={4, 8}, budget=None) == "scheduler"
    assert stop_reason([3, 6], 12, rungs={4, 8}, budget=60.0) == "scheduler"  # 6 is the first report past rung 4
    assert stop_reason([3, 6, 7], 12, rungs={4, 8}, budget=60.0) == "time_budget"
    assert stop_reason([4, 8, 12], 12, rungs={4, 8}, budget=60.0) == "completed"


def test_sweep_refuses_the_refit_protocol(demo_dataset, tmp_path):
    """A sweep selects on validation: training on the validation targets (train.fit_on train+valid) is refused."""
    from seqrec.tune.config import load_grid
    from seqrec.tune.runner import build_sweep

    with pytest.raises(ValueError, match="fit_on"):
        build_sweep(load_grid("smoke_demo"), {"data.path": str(demo_dataset.path), "train.fit_on": "train+valid"},
                    tmp_path / "x")


def test_best_row_prefers_a_tied_report_whose_checkpoint_remains(tmp_path):
    """Ray may evict the earliest of several equal-scored checkpoints: the report must pick a tied one that is
    still on disk (the earliest such), and the plain best when there is no tie."""
    import pandas as pd

    from seqrec.tune.report import _best_row

    kept = []
    for step in (850, 1200):
        d = tmp_path / f"checkpoint_{step:08d}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
        kept.append(str(d))
    df = pd.DataFrame({"step": [100, 750, 850, 1200, 1350], "m": [0.5, 0.9, 0.9, 0.9, 0.88],
                       "checkpoint_path": [str(tmp_path / "gone_100"), str(tmp_path / "gone_750"), *kept, "x"]})
    assert df.loc[_best_row(df, "m", "max"), "step"] == 850
    assert df.loc[_best_row(df, "m", "min"), "step"] == 100  # no tie: the best, on disk or not
    assert df.loc[_best_row(df.drop(columns="checkpoint_path"), "m", "max"), "step"] == 750
