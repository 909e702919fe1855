"""`ray job submit` end to end against a local `ray start --head` cluster (loopback, private ports and temp dir):
prepare, train, evaluate and deploy jobs succeed and leave their outputs; the deployed service answers.

Ray 2.60 turns on token auth for `ray start` clusters: the head and the CLI get the same RAY_AUTH_MODE=token
and a private RAY_AUTH_TOKEN. The head runs as `ray start --block` in a child process, so stopping that
process (by PID) stops the cluster; leftovers under the private temp dir are killed by PID.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from seqrec.ray_utils import free_ports, pids_with_marker, ray_executable

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def head(tmp_path_factory):
    temp = Path(f"/tmp/seqrec_jobs_{os.getpid()}")  # short: Ray's socket paths must stay < 108 chars
    temp.mkdir(exist_ok=True)
    gcs, dash, agent, agent_grpc, client, metrics, rt_env, serve_port = free_ports(8)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [ray_executable(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--ray-client-server-port={client}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}", f"--temp-dir={temp}",
           "--num-cpus=2", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if requests.get(url + "/api/version", timeout=2).status_code in (200, 401):
                break
        except requests.RequestException:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("ray head did not come up")
    yield {"url": url, "env": env, "serve_port": serve_port}
    proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    time.sleep(2)
    for pid in pids_with_marker(str(temp)):  # anything of this cluster that outlived the head process
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["rm", "-rf", str(temp)], check=False)


def submit(head, *args: str, timeout: float = 240) -> str:
    cmd = [ray_executable(), "job", "submit", "--address", head["url"], "--working-dir", str(REPO), "--", sys.executable, *args]
    done = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=timeout)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in out, out[-3000:]
    return out


@pytest.mark.slow
def test_prepare_train_evaluate_deploy_jobs(head, tmp_path, demo_dataset, shared_data):
    # prepare: the real Scientific files in the prepared layout
    prepared = tmp_path / "scientific"
    submit(head, "jobs/prepare.py", "--format", "unisrec", "--input", str(shared_data / "Scientific"), "--out", str(prepared))
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["counts"]["items"] == 4385

    # train: the tiny config on the demo catalog, checkpoints and summary under our storage path
    storage = tmp_path / "runs"
    submit(head, "jobs/train.py", "--config", "tiny_demo", "--set", f"data.path={demo_dataset.path}",
           "--set", f"run.storage_path={storage}", "--set", "train.steps=6", "--set", "train.eval_every=3")
    summary = json.loads((storage / "tiny_demo" / "summary.json").read_text())
    best = Path(summary["best_checkpoint"])
    assert (best / "model.safetensors").exists() and summary["final_step"] == 6

    # evaluate: reference recommenders on the prepared Scientific data
    out = tmp_path / "eval.json"
    submit(head, "jobs/evaluate.py", "--dataset", str(demo_dataset.path), "--model", "mostpop", "--out", str(out))
    assert "mostpop" in out.read_text()

    # deploy: the Serve app from the training run's record; it outlives the job and answers on loopback
    port = head["serve_port"]
    submit(head, "jobs/deploy.py", "--best-record", str(storage / "tiny_demo" / "summary.json"), "--port", str(port))
    r = requests.post(f"http://127.0.0.1:{port}/recommend", json={"history": [1, 2, 3], "k": 5}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 5 and body["model"]["checkpoint"] == str(best)

    # model swap the documented way: a config file, `seqrec serve swap`, `serve deploy` through the dashboard;
    # only the Recommender's user_config changes, so the running replica reconfigures in place
    config = tmp_path / "serve.yaml"
    seqrec = [sys.executable, "-m", "seqrec.cli"]
    subprocess.run([*seqrec, "serve", "config", "--best-record", str(storage / "tiny_demo" / "summary.json"),
                    "--port", str(port), "--out", str(config)], env=head["env"], check=True, timeout=120)
    other = next(p for p in sorted((storage / "tiny_demo").glob("checkpoint_0*")) if p != best)
    before = requests.get(f"http://127.0.0.1:{port}/version", timeout=30).json()["model"]
    done = subprocess.run([*seqrec, "serve", "swap", "--config", str(config), "--checkpoint", str(other),
                           "--deploy", head["url"]], env=head["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.time() + 60
    while time.time() < deadline:
        after = requests.get(f"http://127.0.0.1:{port}/version", timeout=30).json()["model"]
        if after["checkpoint"] == str(other):
            break
        time.sleep(0.5)
    assert after["checkpoint"] == str(other) and after["pid"] == before["pid"], (before, after)
