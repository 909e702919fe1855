"""The console of seqrec commands: each line once, none of Ray's known noise, and two commands at once on one
machine (issue #32 items 4-5). The end-to-end test runs two real `seqrec train --config tiny_demo` subprocesses
at the same time (~50 s on 2 cores); the others take about a second."""
from __future__ import annotations

import collections
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from seqrec import console

# messages that Ray printed on every run before the console work; none of them is something a user can act on
RAY_SPAM = (
    "Failed to query Ray Train Controller actor state",
    "Found multiple active Ray instances",
    "Token authentication is enabled",
    "Reporting training result",
    "Checkpoint successfully created",
    "has constructor arguments in the object store",
    "RayDeprecationWarning",
    "Progress bars disabled",
    "A new progress UI is available",
    "Starting execution of Dataset",
    "Failed to send resource request",
    "Loading weights",
    "Traceback",
)
TIMESTAMP = re.compile(r"^\[?\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+\]?\s*")


def repeated_lines(text: str, limit: int = 2) -> dict[str, int]:
    """Non-blank lines (timestamps stripped) printed more than `limit` times."""
    counts = collections.Counter(TIMESTAMP.sub("", line).strip() for line in text.splitlines())
    counts.pop("", None)
    return {line: n for line, n in counts.items() if n > limit}


def is_png(path: Path, min_bytes: int = 10_000) -> bool:
    data = Path(path).read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= min_bytes


def test_repeated_lines_ignores_timestamps():
    text = "2026-01-01 10:00:00,001 INFO a: x\n2026-01-01 10:00:01,002 INFO a: x\n\n\nINFO a: x\ny\n"
    assert repeated_lines(text) == {"INFO a: x": 3}


def test_two_tiny_trainings_at_once_each_print_every_line_once(demo_dataset, tmp_path):
    """Two `seqrec train` commands started together: each starts its own local Ray instance (the test session
    may hold a third), both finish with correct results, and their consoles are clean."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", console.PROGRESS_ENV)}
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "seqrec.cli", "train", "--config", "tiny_demo", "--set",
               f"data.path={demo_dataset.path}", "--set", f"run.storage_path={tmp_path / f'runs{i}'}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      cwd=tmp_path))
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=240)
        outputs.append(out)
        assert p.returncode == 0, out[-3000:]
    summaries = []
    for i, out in enumerate(outputs):
        for spam in RAY_SPAM:
            assert spam not in out, f"run {i} printed Ray noise {spam!r}:\n{out[-3000:]}"
        assert not repeated_lines(out), repeated_lines(out)
        # every training and validation line exactly once: steps 4, 8, 12 and validations at 6 and 12
        assert [int(m) for m in re.findall(r"\[train\] step (\d+)/12", out)] == [4, 8, 12], out[-3000:]
        assert [int(m) for m in re.findall(r"\[valid\] step (\d+) ", out)] == [6, 12], out[-3000:]
        run = tmp_path / f"runs{i}" / "tiny_demo"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["final_step"] == 12 and summary["test"]["ndcg@10/opt"] >= summary["test"]["ndcg@10/pes"] > 0
        assert summary["curves"] == str(run / "curves.png") and is_png(run / "curves.png")
        summaries.append(summary)
    # the same seed and data on two isolated instances: the same model
    assert summaries[0]["test"] == summaries[1]["test"]


def test_local_workers_are_pinned_to_their_own_cluster(ray_session):
    """The worker setup hook pins RAY_ADDRESS to the worker's own GCS, so nothing in a worker auto-discovers
    another instance on the machine (or /tmp/ray/ray_current_cluster); Train's print patch is off."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    def worker_env():
        return os.environ.get("RAY_ADDRESS"), os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH")

    address, patch = ray.get(worker_env.remote())
    assert address == ray.get_runtime_context().gcs_address
    assert patch == "0"


def test_harmless_records_are_dropped_on_their_logger_only(caplog):
    console.install_filters()
    name, start = next((n, m) for n, m in console.HARMLESS_RECORDS if "placement_group_cleaner" in n)
    with caplog.at_level(logging.WARNING):
        logging.getLogger(name).warning(start + ". State API may be temporarily unavailable.")
        logging.getLogger(name).warning("something else went wrong")
        logging.getLogger("seqrec.test").warning(start)  # the same words elsewhere still print
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong", start]


def test_progress_bars_follow_the_switch(monkeypatch):
    monkeypatch.setenv(console.PROGRESS_ENV, "0")
    bar = console.progress(total=3, desc="x")
    assert isinstance(bar, console.NoBar)
    with bar:
        bar.update(2)
    assert bar.n == 2
    monkeypatch.setenv(console.PROGRESS_ENV, "1")
    bar = console.progress(total=3, desc="x")
    assert not isinstance(bar, console.NoBar)  # tqdm on the driver
    bar.close()
    assert console.worker_env()[console.PROGRESS_ENV] == "1"


def test_quiet_flag_turns_bars_off(monkeypatch, tmp_path):
    from seqrec.cli import main

    monkeypatch.setenv(console.PROGRESS_ENV, "1")
    with pytest.raises(SystemExit):  # evaluate without models: stops after the console was configured
        main(["--quiet", "evaluate"])
    assert os.environ[console.PROGRESS_ENV] == "0"
