"""Autoscaling on one machine: Ray's fake multi-node provider, a `ray job submit` sweep, Serve replica autoscaling.

    python benchmarks/bench_autoscaling.py [--idle-timeout-s 15] [--load-s 20] [--concurrency 12]

Starts a private head (`ray start --head --block`, loopback, free ports, its own temp dir, token auth) whose
autoscaler uses Ray's fake multi-node provider (the provider behind ray.cluster_utils.AutoscalingCluster, which
itself is not used: its start() runs `ray stop --force`, which would kill every other Ray instance on the
machine). The head offers {CPU: 1}; the worker type `cpu_tune` offers {CPU: 1, tune: 1} (cluster.yaml's CPU worker
type, scaled down to this machine's cores), up to 2 nodes, each a real raylet on this machine.

1. sweep: `ray job submit -- python jobs/tune.py --grid autoscale_demo`: two trials whose Train workers ask for
   `tune`, which only worker nodes have, so the autoscaler adds nodes; after the sweep they idle and are removed.
2. serve: `ray job submit -- python jobs/deploy.py --best-record <the sweep's best.json>` with recommender
   autoscaling (min 1, max 3, target 0.2 ongoing requests, short delays: the proxy and ingress hold most of a
   request's time, so the recommender sees well under one request at a time); a bounded load (a thread pool of
   --concurrency clients for --load-s seconds) makes Serve add replicas, and they are removed once it stops.

Node counts (dashboard state API) and Recommender replica counts (Serve REST API) are polled every second
throughout. Prints the figures and writes benchmarks/results/autoscaling_<time>.json: scale-up and scale-down
seconds and both timelines. tests/test_autoscaling.py runs the same scenario with assertions.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
from seqrec.ray_utils import free_ports, pids_with_marker  # noqa: E402
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench_autoscaling")

HEAD_RESOURCES = {"CPU": 1}
# the same resource names as cluster.yaml's CPU worker type and the autoscale_demo grid's Train workers
WORKER_TYPE = "cpu_tune"
WORKER_RESOURCES = {"CPU": 1, "tune": 1}
MAX_WORKERS = 2
SWEEP_GRID = "autoscale_demo"
# Serve: tiny fractional CPUs so three recommender replicas, the ingress and BM25 fit beside the sweep's nodes
SERVE_SETTINGS = {
    "recommender.num_cpus": 0.1, "recommender.min_replicas": 1, "recommender.max_replicas": 3,
    "recommender.target_ongoing_requests": 0.2, "recommender.upscale_delay_s": 1, "recommender.downscale_delay_s": 4,
    "ingress.num_cpus": 0.1, "ingress.min_replicas": 1, "ingress.max_replicas": 1,
    "bm25.num_cpus": 0.1, "bm25.min_replicas": 1, "bm25.max_replicas": 1,
}




def autoscaler_config(gcs_address: str, idle_timeout_s: float) -> dict[str, Any]:
    """A fake multi-node cluster config (the shape of Ray's fake_multi_node/example.yaml, which the pip wheel
    does not ship). gcs_address points the provider's extra raylets at our private GCS instead of port 6379."""
    return {
        "cluster_name": "seqrec-fake",
        "max_workers": MAX_WORKERS,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": dict(WORKER_RESOURCES), "node_config": {}, "min_workers": 0,
                          "max_workers": MAX_WORKERS},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeCluster:
    """A private autoscaling head on loopback; stop() ends it and every raylet it started, by PID."""

    def __init__(self, idle_timeout_s: float = 15.0):
        from seqrec.ray_utils import ray_executable

        self.temp = Path(f"/tmp/seqrec_as_{os.getpid()}")  # short: Ray's socket paths must stay < 108 chars
        self.temp.mkdir(exist_ok=True)
        gcs, dash, agent, agent_grpc, client, metrics, rt_env, self.serve_port = free_ports(8)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.url = f"http://127.0.0.1:{dash}"
        token = secrets.token_hex(32)
        self.headers = {"Authorization": f"Bearer {token}"}
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
                    "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                    # what AutoscalingCluster.start sets: the fake provider, a 1 s autoscaler loop
                    "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        self.env.pop("RAY_ADDRESS", None)
        config = self.temp / "autoscaling.json"
        config.write_text(json.dumps(autoscaler_config(self.gcs_address, idle_timeout_s)))
        cmd = [ray_executable(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--ray-client-server-port={client}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}", f"--temp-dir={self.temp}",
               f"--num-cpus={HEAD_RESOURCES['CPU']}", f"--autoscaling-config={config}", "--disable-usage-stats"]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, cwd=REPO)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/api/version", timeout=2).status_code in (200, 401):
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            self.stop()
            raise RuntimeError("the autoscaling head did not come up")

    def alive_nodes(self) -> list[dict[str, Any]]:
        r = requests.get(self.url + "/api/v0/nodes", params={"limit": 100, "detail": 1}, headers=self.headers,
                         timeout=10)
        r.raise_for_status()
        rows = r.json()["data"]["result"]["result"]
        return [n for n in rows if n.get("state") == "ALIVE"]

    def worker_count(self) -> int:
        return sum(1 for n in self.alive_nodes() if "tune" in (n.get("resources_total") or {}))

    def replica_count(self, deployment: str = "Recommender") -> int | None:
        """RUNNING replicas of a deployment of the seqrec app (None before Serve runs)."""
        r = requests.get(self.url + "/api/serve/applications/", headers=self.headers, timeout=10)
        if r.status_code != 200:
            return None
        for app in (r.json().get("applications") or {}).values():
            dep = (app.get("deployments") or {}).get(deployment)
            if dep is not None:
                return sum(1 for rep in dep.get("replicas", []) if rep.get("state") == "RUNNING")
        return None

    def submit(self, script: str, *args: str, timeout: float = 300) -> str:
        """`ray job submit -- python REPO/<script> ARGS`, waiting for the job to end.

        No --working-dir here, unlike a real cluster (docs/cluster.md): the fake provider's nodes share the head's
        session directory, and a node the autoscaler removes takes the session's runtime_resources/ with it, the
        uploaded working directory included, which is the running job driver's cwd (Tune then fails on
        os.getcwd()). The job runs the checkout's script by absolute path instead; the package is installed."""
        from seqrec.ray_utils import ray_executable

        cmd = [ray_executable(), "job", "submit", "--address", self.url, "--", sys.executable, str(REPO / script),
               *args]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        out = done.stdout + done.stderr
        if done.returncode != 0 or "succeeded" not in out:
            # the job's own output (stdout) holds the traceback; stderr is the CLI's packaging chatter
            raise RuntimeError(f"job {script} failed:\n{done.stdout[-5000:]}\n{done.stderr[-1000:]}")
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        time.sleep(2)
        # the fake provider's raylets and their workers run under our temp dir too
        for pid in pids_with_marker(str(self.temp)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["rm", "-rf", str(self.temp)], check=False)


class Poller:
    """Samples fn() every `every` seconds in a thread: [(seconds since start, value), ...]."""

    def __init__(self, fn: Callable[[], Any], every: float = 1.0):
        self.fn, self.every, self.t0 = fn, every, time.time()
        self.samples: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((round(time.time() - self.t0, 1), self.fn()))
            except requests.RequestException as e:
                log.debug("poll failed: %s", e)
            self._stop.wait(self.every)

    def now(self) -> float:
        return time.time() - self.t0

    def stop(self) -> list[tuple[float, Any]]:
        self._stop.set()
        self._thread.join(30)
        return self.samples


def first_time(samples: list[tuple[float, Any]], pred: Callable[[Any], bool], after: float = 0.0) -> float | None:
    return next((t for t, v in samples if t >= after and v is not None and pred(v)), None)


def wait_for(fn: Callable[[], Any], pred: Callable[[Any], bool], timeout: float, every: float = 1.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pred(fn()):
                return True
        except requests.RequestException:
            pass
        time.sleep(every)
    return False


def run_sweep(cluster: FakeCluster, data_path: Path, out_dir: Path, idle_timeout_s: float) -> dict[str, Any]:
    """Submit the sweep, then wait for the idle worker nodes to go; scale-up / scale-down seconds + timeline."""
    nodes = Poller(cluster.worker_count)
    submitted = nodes.now()
    cluster.submit("jobs/tune.py", "--grid", SWEEP_GRID, "--set", f"data.path={data_path}",
                   "--storage-path", str(out_dir), "--name", SWEEP_GRID, timeout=420)
    finished = nodes.now()
    # idle timeout + the autoscaler's loop + raylet shutdown; generous on a shared 2-core machine
    removed = wait_for(cluster.worker_count, lambda n: n == 0, timeout=idle_timeout_s + 90)
    down = round(nodes.now(), 1) if removed else None  # the poller may not have sampled the 0 yet
    samples = nodes.stop()
    if removed:
        samples.append((down, 0))
    up = first_time(samples, lambda n: n >= 1, submitted)
    peak = max((v for _, v in samples), default=0)
    # the nodes go idle when the last trial ends, which is before the job does (the driver then re-evaluates the
    # winner on the head): the trials' last history records say when
    ends = [f.stat().st_mtime - nodes.t0 for f in (out_dir / SWEEP_GRID / "trials").glob("trial_*/history.jsonl")]
    idle_from = round(max(ends), 1) if ends else finished
    if down is not None and up is not None:  # the first sample without workers after they came up, if any
        down = first_time(samples, lambda n: n == 0, up) or down
    return {
        "job_submitted_s": round(submitted, 1), "job_finished_s": round(finished, 1),
        "first_worker_node_s": up, "scale_up_s": None if up is None else round(up - submitted, 1),
        "peak_worker_nodes": peak, "last_trial_ended_s": idle_from, "all_workers_removed_s": down,
        # from the last trial's end (nodes idle) to no worker node left: idle timeout + the autoscaler's loop
        "scale_down_s": None if down is None else round(down - idle_from, 1),
        "idle_timeout_s": idle_timeout_s, "node_timeline": samples,
        "best_record": str(out_dir / SWEEP_GRID / "best.json"),
    }


def bounded_load(port: int, histories: list[list[int]], concurrency: int, seconds: float) -> dict[str, int]:
    """`concurrency` clients POSTing /recommend back to back for `seconds` seconds."""
    stop_at = time.time() + seconds
    url = f"http://127.0.0.1:{port}/recommend"

    def client(i: int) -> tuple[int, int]:
        ok = bad = 0
        with requests.Session() as s:
            while time.time() < stop_at:
                try:
                    r = s.post(url, json={"history": histories[(ok + bad + i) % len(histories)], "k": 10}, timeout=30)
                    ok, bad = (ok + 1, bad) if r.status_code == 200 else (ok, bad + 1)
                except requests.RequestException:
                    bad += 1
        return ok, bad

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(client, range(concurrency)))
    return {"ok": sum(r[0] for r in results), "failed": sum(r[1] for r in results)}


def run_serve(cluster: FakeCluster, best_record: str, histories: list[list[int]], concurrency: int,
              load_s: float) -> dict[str, Any]:
    """Deploy the sweep's winner with recommender autoscaling; load it; replicas up, then back to min."""
    port = cluster.serve_port
    sets = [a for k, v in SERVE_SETTINGS.items() for a in ("--set", f"{k}={v}")]
    cluster.submit("jobs/deploy.py", "--best-record", best_record, "--port", str(port), *sets, timeout=300)
    replicas = Poller(cluster.replica_count)
    wait_for(cluster.replica_count, lambda n: n == 1, timeout=60)
    load_start = replicas.now()
    load = bounded_load(port, histories, concurrency, load_s)
    load_end = replicas.now()
    low = SERVE_SETTINGS["recommender.min_replicas"]
    back = wait_for(cluster.replica_count, lambda n: n == low, timeout=90)
    down_at = round(replicas.now(), 1) if back else None
    samples = replicas.stop()
    if back:
        samples.append((down_at, low))
    up = first_time(samples, lambda n: n >= 2, load_start)
    down = first_time(samples, lambda n: n <= low, load_end)
    return {
        "load_start_s": round(load_start, 1), "load_end_s": round(load_end, 1), "concurrency": concurrency,
        "requests": load, "scale_up_s": None if up is None else round(up - load_start, 1),
        "peak_replicas": max((v for _, v in samples if v is not None), default=0),
        "scale_down_s": None if down is None else round(down - load_end, 1),
        "replica_timeline": samples, "settings": SERVE_SETTINGS,
    }


def demo_histories(data_path: Path, n: int = 64) -> list[list[int]]:
    from seqrec.data.dataset import PreparedDataset

    seqs = PreparedDataset.load(data_path).train_sequences()[:n]
    return [[int(i) for i in s[-20:]] for s in seqs if len(s) > 1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--idle-timeout-s", type=float, default=15.0, help="autoscaler idle timeout for worker nodes")
    p.add_argument("--load-s", type=float, default=20.0, help="seconds of Serve load")
    p.add_argument("--concurrency", type=int, default=12, help="concurrent Serve clients")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/autoscaling_<time>.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from seqrec.data.demo import DemoOptions, generate_demo

    work = Path(tempfile.mkdtemp(prefix="seqrec_as_bench_"))
    data = work / "demo"
    generate_demo(data, DemoOptions(n_users=300, n_items=120, seed=7))
    t0 = time.time()
    cluster = FakeCluster(idle_timeout_s=args.idle_timeout_s)
    try:
        head_up_s = round(time.time() - t0, 1)
        sweep = run_sweep(cluster, data, work / "tune", args.idle_timeout_s)
        log.info("sweep: worker nodes up %.1fs after submit (peak %d), all removed %.1fs after the last trial",
                 sweep["scale_up_s"] or -1, sweep["peak_worker_nodes"], sweep["scale_down_s"] or -1)
        serve = run_serve(cluster, sweep["best_record"], demo_histories(data), args.concurrency, args.load_s)
        log.info("serve: 2nd replica %.1fs into the load (peak %d), back to 1 %.1fs after it; requests %s",
                 serve["scale_up_s"] or -1, serve["peak_replicas"], serve["scale_down_s"] or -1, serve["requests"])
    finally:
        cluster.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    result = {"bench": "autoscaling", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "head_up_s": head_up_s,
              "head": HEAD_RESOURCES, "worker_type": {WORKER_TYPE: WORKER_RESOURCES, "max_workers": MAX_WORKERS},
              "sweep": sweep, "serve": serve}
    out = Path(args.out) if args.out else RESULTS / f"autoscaling_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("sweep", "serve")}))
    print(json.dumps({k: v for k, v in sweep.items() if k != "node_timeline"}))
    print(json.dumps({k: v for k, v in serve.items() if k != "replica_timeline"}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
