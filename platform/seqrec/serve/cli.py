"""`seqrec serve {run,config,swap}`: start the service, write a Serve config file, swap the model.

    seqrec serve run --best-record sasrec_scientific --records-dir runs/train      # foreground, Ctrl-C / SIGTERM stops
    seqrec serve run --checkpoint runs/train/x/checkpoint_00000700 --port 8000
    seqrec serve config --checkpoint ... --out serve_config.yaml                   # for `serve deploy` / `serve run`
    seqrec serve swap --config serve_config.yaml --checkpoint NEW [--deploy http://127.0.0.1:8265]

`swap` rewrites only the Recommender's `user_config` in the config file, so `serve deploy` reconfigures the
running replicas in place (no restart, no dropped requests); redeploying from Python instead does a rolling
replacement, which also drops nothing but starts new replicas.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from seqrec.config import parse_overrides

log = logging.getLogger(__name__)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if getattr(args, "settings", None):
        with open(args.settings) as f:
            settings = yaml.safe_load(f) or {}
    model = dict(settings.get("model") or {})
    for key in ("checkpoint", "best_record", "records_dir", "dataset"):
        value = getattr(args, key, None)
        if value:
            model[key] = value
    if getattr(args, "checkpoint", None):
        model.pop("best_record", None)
    if getattr(args, "best_record", None):
        model.pop("checkpoint", None)
    settings["model"] = model
    for dotted, value in parse_overrides(getattr(args, "overrides", [])).items():
        node = settings
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return settings


def curl_line(host: str, port: int, history: list[Any] | None = None) -> str:
    body = json.dumps({"history": history or [0, 1, 2], "k": 5})
    return f"curl -s -X POST http://{host}:{port}/recommend -H 'content-type: application/json' -d '{body}'"


def start(settings: dict[str, Any], host: str, port: int, address: str | None = None,
          on_ray_up: Callable[[], None] | None = None) -> str:
    """Deploy the app on a local Ray instance or `address` (returns once RUNNING); returns the base URL.
    `on_ray_up` runs once Ray is initialised, before the deploy."""
    from seqrec.ray_utils import init_ray
    from seqrec.serve.deploy import deploy_config, serve_config

    config = serve_config(settings, host, port)  # resolves and validates paths before anything starts
    init_ray(address=address)
    if on_ray_up is not None:
        on_ray_up()
    deploy_config(config)
    return f"http://{host}:{port}"


def cmd_run(args: argparse.Namespace) -> int:
    def announce(url: str) -> None:
        print(f"seqrec serving at {url} (OpenAPI docs: {url}/docs)")
        print(curl_line(args.host, args.port))

    return serve_until_stopped(_settings(args), args.host, args.port, announce, args.address, detach=args.detach)


def serve_until_stopped(settings: dict[str, Any], host: str, port: int, announce: Callable[[str], None],
                        address: str | None = None, detach: bool = False) -> int:
    """`start` the service, announce its URL, then block until Ctrl-C or SIGTERM and shut Serve down (and the
    local Ray instance we started with it), so a server stopped by its PID leaves no proxy, replica or raylet
    behind.

    SIGTERM is trapped before `start` and again once Ray is up (ray.init installs its core worker's own
    SIGTERM handler, which would exit on the spot): a SIGTERM that lands while the replicas deploy (a
    supervisor giving up on a slow start) stops what was started so far instead of killing the driver
    mid-deploy. `detach` returns once deployed, leaving the service up. Returns the exit status: 0, or 143
    when stopped before the service was up."""
    import signal

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    def trap() -> Any:
        return signal.signal(signal.SIGTERM, _terminate)

    previous = trap()
    up = False
    try:
        url = start(settings, host, port, address, on_ray_up=trap)
        up = True
        announce(url)
        if detach:
            return 0
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        if not up:
            log.warning("stopped before the service was up; shutting down what was started")
        _shutdown_serve()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if up else 143


def _shutdown_serve() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        log.info("stopping: serve.shutdown()")
        try:
            serve.shutdown()
        except Exception as exc:  # stopped half-way through the deploy: Serve may not be fully up
            log.warning("serve.shutdown() failed (%s); shutting Ray down anyway", exc)
    # Also when ray.init was interrupted before it connected: the node processes it had started go too. A
    # driver-started local instance goes with it; a cluster we joined keeps running.
    ray.shutdown()


def serve_quickstart(workdir: str, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Serve the quickstart's trained model (its training summary is the best record), print a curl line
    and keep the service up until Ctrl-C (or SIGTERM)."""
    records = sorted(Path(workdir, "checkpoints").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not records:
        raise FileNotFoundError(f"no trained model under {workdir}/checkpoints to serve")
    def announce(url: str) -> None:
        print(f"\nseqrec serving {records[-1].parent.name} at {url} (OpenAPI docs: {url}/docs); Ctrl-C stops it")
        print(curl_line(host, port))

    serve_until_stopped({"model": {"best_record": str(records[-1])}}, host, port, announce)


def write_yaml(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(obj, sort_keys=False))
    os.replace(tmp, path)


def cmd_config(args: argparse.Namespace) -> int:
    from seqrec.serve.deploy import serve_config

    write_yaml(serve_config(_settings(args), args.host, args.port), Path(args.out))
    print(f"wrote {args.out}; start with `serve run {args.out}` or `serve deploy {args.out} --address <dashboard>`")
    return 0


def cmd_swap(args: argparse.Namespace) -> int:
    from seqrec.serve.deploy import deploy_config, served_model, with_model

    path = Path(args.config)
    config = with_model(yaml.safe_load(path.read_text()), args.checkpoint, args.best_record, args.records_dir,
                        args.dataset)
    write_yaml(config, path)
    name, model = served_model(config)
    print(f"{path}: {name} now serves {model['checkpoint']}")
    if args.deploy:  # the dashboard's REST API, like `serve deploy`
        from seqrec.ray_utils import ray_executable

        cmd = [ray_executable("serve"), "deploy", str(path), "--address", args.deploy]
        print(" ".join(cmd))
        return subprocess.call(cmd)
    if args.address:
        from seqrec.ray_utils import init_ray

        init_ray(address=args.address)
        deploy_config(config)
        print("swapped")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="checkpoint directory written by training")
    p.add_argument("--best-record", help="best.json / summary.json path, or a sweep/run name under --records-dir")
    p.add_argument("--records-dir", default="runs/tune", help="where best-record names are looked up")
    p.add_argument("--dataset", help="prepared dataset for the catalog (default: the checkpoint's training data)")


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="serve recommendations over HTTP with Ray Serve")
    sub = parser.add_subparsers(dest="serve_command", required=True)

    run = sub.add_parser("run", help="deploy the service and keep it up until Ctrl-C or SIGTERM")
    _model_args(run)
    run.add_argument("--settings", help="YAML with serve settings (limits, replicas, ...; see seqrec.serve.config)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting, e.g. --set recommender.max_replicas=4")
    run.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    run.add_argument("--detach", action="store_true", help="return once deployed (needs --address: a cluster outlives us)")
    run.set_defaults(func=cmd_run)

    cfg = sub.add_parser("config", help="write a Serve config file for `serve deploy` / `serve run`")
    _model_args(cfg)
    cfg.add_argument("--settings")
    cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cfg.add_argument("--host", default="127.0.0.1")
    cfg.add_argument("--port", type=int, default=8000)
    cfg.add_argument("--out", default="serve_config.yaml")
    cfg.set_defaults(func=cmd_config)

    swap = sub.add_parser("swap", help="point a Serve config's Recommender at another checkpoint (in-place reconfigure)")
    _model_args(swap)
    swap.add_argument("--config", required=True)
    swap.add_argument("--deploy", metavar="DASHBOARD_URL", help="run `serve deploy` against this address afterwards")
    swap.add_argument("--address", help="or apply it directly on this Ray cluster (e.g. auto)")
    swap.set_defaults(func=cmd_swap)
    return parser


if __name__ == "__main__":  # pragma: no cover
    from seqrec.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
