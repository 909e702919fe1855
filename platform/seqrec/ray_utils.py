"""Starting or joining Ray: a fresh local instance by default, any cluster by address."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs):
    """Join `address` (e.g. 'auto' or 'ray://host:10001'), or start a private local instance.

    address=None never silently attaches to some other cluster left on the machine: it passes 'local'.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    init_kwargs = dict(address=address, log_to_driver=True, **kwargs)
    if address == "local":
        if num_cpus is not None:
            init_kwargs["num_cpus"] = num_cpus
        init_kwargs.setdefault("include_dashboard", False)
    ray.init(**init_kwargs)
    log.info("ray initialised at %s with resources %s", address, ray.cluster_resources())
    return ray


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
