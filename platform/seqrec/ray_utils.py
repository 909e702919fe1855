"""Starting or joining Ray: a fresh local instance by default, any cluster by address."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs):
    """Join `address` (e.g. 'auto' or 'ray://host:10001'), or start a private local instance.

    address=None never silently attaches to some other cluster left on the machine: it passes 'local'. A local
    instance is isolated from other seqrec commands running at the same time: its own session directory and
    ports (Ray's), and its workers pinned to it (seqrec.console.setup_ray_worker). Console settings (Ray's log
    levels and switches) come from seqrec.console.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from seqrec import console

    address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = address == "local"
    console.ray_env_defaults(local)
    import ray

    if ray.is_initialized():
        return ray
    init_kwargs = dict(address=address, log_to_driver=True, **console.ray_init_options(local))
    if "runtime_env" in kwargs and "runtime_env" in init_kwargs:  # the caller's fields win, env vars merged
        ours, theirs = init_kwargs["runtime_env"], dict(kwargs.pop("runtime_env"))
        theirs["env_vars"] = {**ours.get("env_vars", {}), **theirs.get("env_vars", {})}
        init_kwargs["runtime_env"] = {**ours, **theirs}
    init_kwargs.update(kwargs)
    if local:
        if num_cpus is not None:
            init_kwargs["num_cpus"] = num_cpus
        init_kwargs.setdefault("include_dashboard", False)
    ray.init(**init_kwargs)
    console.install_filters()  # again: the filters on Ray's file-named loggers need ray imported
    console.quiet_ray_data()
    log.info("ray initialised at %s with resources %s", address, ray.cluster_resources())
    return ray


def source_pythonpath() -> str:
    """PYTHONPATH for Ray workers: they must import seqrec even when it is not pip-installed (a source checkout)."""
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1])
    current = os.environ.get("PYTHONPATH", "")
    return src if not current else (current if src in current.split(os.pathsep) else f"{src}{os.pathsep}{current}")


def ray_executable(name: str = "ray") -> str:
    """Path of a Ray console script (`ray`, `serve`) of the running interpreter's installation: the one beside
    sys.executable (a virtualenv that is not activated is not on PATH), else whatever PATH finds."""
    import shutil
    import sys
    from pathlib import Path

    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"no {name!r} executable beside {sys.executable} or on PATH (is ray installed?)")
    return found


def free_ports(n: int = 1) -> list[int]:
    """n distinct TCP ports free on 127.0.0.1 right now (all held open together, so none repeats), for a private
    `ray start` head, a Serve proxy or a local S3 server."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pids_with_marker(marker: str) -> list[int]:
    """Processes (other than this one) whose command line contains `marker`, e.g. a private Ray temp dir: what a
    `ray start --block` head left running, found by its own dir and stopped by PID, never by name."""
    from pathlib import Path

    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return [p for p in out if p != os.getpid()]


def process_group_alive(pgid: int) -> bool:
    """Whether any process of the process group `pgid` still exists (a server started with start_new_session,
    and everything it started: checked by its leader's PID, never by name)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
