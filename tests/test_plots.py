"""Charts (seqrec.plots) and the popularity buckets of `seqrec evaluate` (issue #32 item 6). About 5 s: no Ray,
the demo dataset and the baselines only; the training curves of a real run are checked in test_console.py."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from seqrec import plots
from seqrec.eval.evaluator import EvalResult, bucket_labels, bucket_metrics


def assert_png(path, min_bytes: int = 10_000):
    """A real, non-blank PNG image of non-trivial size."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= min_bytes, len(data)
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 0.01


def test_history_keeps_the_latest_record_per_step_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "run" / plots.HISTORY_FILE
    plots.append_history(path, {"kind": "train", "step": 4, "loss": 5.0})
    plots.append_history(path, {"kind": "valid", "step": 4, "metrics": {"ndcg@10/pes": 0.1}})
    plots.append_history(path, {"kind": "train", "step": 8, "loss": 4.0})
    plots.append_history(path, {"kind": "train", "step": 8, "loss": 3.5})  # replayed after a resume
    with open(path, "a") as f:
        f.write('{"kind": "train", "st')  # a crash mid-line
    hist = plots.read_history(path)
    assert [(r["kind"], r["step"]) for r in hist] == [("train", 4), ("valid", 4), ("train", 8)]
    assert hist[-1]["loss"] == 3.5
    assert plots.read_history(tmp_path / "missing.jsonl") == []


def _history(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for step in range(10, 10 * n + 1, 10):
        out.append({"kind": "train", "step": step, "loss": 5.0 / step ** 0.3 + 0.01 * rng.random()})
        if step % 20 == 0:
            out.append({"kind": "valid", "step": step, "metrics": {"ndcg@10/pes": 0.3 - 1.0 / step}})
    return out


def test_training_curves_of_a_run_and_of_stages(tmp_path):
    for name, seed in (("stage1", 0), ("stage2", 1)):
        for rec in _history(12, seed):
            plots.append_history(tmp_path / name / plots.HISTORY_FILE, rec)
    one = plots.run_curves({"stage1": tmp_path / "stage1"}, "ndcg@10/pes", tmp_path / "one", "a run")
    both = plots.run_curves({"stage1": tmp_path / "stage1", "stage2": tmp_path / "stage2"}, "ndcg@10/pes",
                            tmp_path / "both", "two stages")
    assert one == tmp_path / "one" / plots.CURVES_FILE and both == tmp_path / "both" / plots.CURVES_FILE
    assert_png(one)
    assert_png(both)
    assert plots.run_curves({"x": tmp_path / "nothing"}, "ndcg@10/pes", tmp_path / "none") is None  # no history


def test_sweep_report_writes_every_trials_validation_curve(tmp_path):
    from seqrec.tune.report import write_trial_curves

    mk = "val/ndcg@10/pes"
    histories = {f"t{i}": pd.DataFrame({"step": [4, 8, 12], mk: [0.1 + i / 100, 0.15 + i / 50, 0.12 + i / 40]})
                 for i in range(4)}
    table = pd.DataFrame({"trial_id": list(histories), "param:train.lr": [1e-3, 2e-3, 3e-3, 4e-3],
                          "stop": ["completed", "scheduler", "completed", "patience"]})
    sweep = {"grid": {"name": "g", "tune": {"metric": "ndcg@10/pes"}}, "space": {"train.lr": {}}}
    path = write_trial_curves(table, histories, sweep, tmp_path)
    assert path == tmp_path / plots.TRIAL_CURVES_FILE
    assert_png(path)


def test_bucket_metrics_by_hand():
    """Five rows: targets seen 0, 1, 4, 5 and 30 times in training; ranks chosen so every metric is easy."""
    counts = np.array([0, 1, 4, 5, 30])
    opt = np.array([1, 1, 3, 20, 2])
    pes = np.array([1, 2, 3, 20, 2])  # row 1 ties with one other item
    result = EvalResult(metrics={}, n_rows=5, seconds=0.0, opt_ranks=opt, pes_ranks=pes)
    b = bucket_metrics(result, counts, (1, 5, 20))
    assert list(b) == ["0", "1-4", "5-19", "20+"] == bucket_labels((1, 5, 20))
    assert [b[k]["n"] for k in b] == [1, 2, 1, 1]
    assert b["0"]["metrics"]["ndcg@10/pes"] == 1.0 and b["0"]["metrics"]["recall@1/pes"] == 1.0
    # rows 1 and 2: ndcg 1/log2(2)=1 and 1/log2(4)=0.5 optimistic; 1/log2(3) and 0.5 pessimistic
    assert b["1-4"]["metrics"]["ndcg@10/opt"] == pytest.approx(0.75)
    assert b["1-4"]["metrics"]["ndcg@10/pes"] == pytest.approx((1 / math.log2(3) + 0.5) / 2)
    assert b["1-4"]["metrics"]["recall@1/opt"] == 0.5 and b["1-4"]["metrics"]["recall@1/pes"] == 0.0
    assert b["1-4"]["metrics"]["mrr/pes"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert b["5-19"]["metrics"]["recall@10/pes"] == 0.0 and b["5-19"]["metrics"]["mrr/opt"] == pytest.approx(0.05)
    assert b["20+"]["metrics"]["ndcg@10/pes"] == pytest.approx(1 / math.log2(3))
    assert bucket_metrics(result, counts, (1, 100))["100+"] == {"n": 0, "metrics": {}}
    with pytest.raises(ValueError, match="starting at 1"):
        bucket_labels((2, 5))


def test_evaluate_cli_buckets_json_and_chart(demo_dataset, tmp_path, capsys):
    from seqrec.cli import main

    out, chart = tmp_path / "e.json", tmp_path / "buckets.png"
    assert main(["--quiet", "evaluate", "--dataset", str(demo_dataset.path), "--model", "mostpop", "--model", "lir",
                 "--buckets", "1,25,30", "--bucket-chart", str(chart), "--out", str(out)]) == 0
    assert_png(chart)
    printed = capsys.readouterr().out
    assert f"wrote {chart}" in printed and "target seen" in printed
    results = json.loads(out.read_text())["results"]
    rows = demo_dataset.eval_rows("test")
    # the same counts by hand: occurrences of each row's target in the training sequences
    seen = {}
    for seq in demo_dataset.train_sequences():
        for item in seq:
            seen[int(item)] = seen.get(int(item), 0) + 1
    c = np.array([seen.get(int(t), 0) for t in rows.targets])
    expected_n = [int((c == 0).sum()), int(((c >= 1) & (c < 25)).sum()), int(((c >= 25) & (c < 30)).sum()),
                  int((c >= 30).sum())]
    for name in ("mostpop", "lir"):
        buckets = results[name]["buckets"]
        assert list(buckets) == ["0", "1-24", "25-29", "30+"]
        assert [b["n"] for b in buckets.values()] == expected_n
        # the buckets partition the rows: their row-weighted means are the overall metrics
        for metric in ("ndcg@10/pes", "recall@10/opt", "mrr/pes"):
            weighted = sum(b["n"] * b["metrics"][metric] for b in buckets.values() if b["n"]) / len(rows)
            assert weighted == pytest.approx(results[name]["metrics"][metric])
    # bad edges: a clear error, exit code 2
    assert main(["evaluate", "--dataset", str(demo_dataset.path), "--model", "mostpop", "--buckets", "5,20"]) == 2
