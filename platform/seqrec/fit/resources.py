"""Peak memory of a fit: the driver and every process it started (the local Ray instance's raylet, Tune trials,
Train workers), sampled in a background thread.

Ray's workers are not waited-for children of the driver, so getrusage cannot see them; summing the memory of the
process tree every second does. The sum is of PSS (each shared page split between the processes that map it:
Ray's ~20 processes share the object store and libraries, whose RSS summed would count them ~20 times), RSS where
the kernel does not give PSS. Joining a cluster (--address) only the driver's own tree is visible: the report
says which.
"""
from __future__ import annotations

import threading

import psutil


class PeakRSS:
    """Context manager: .peak_mb (PSS summed over the process tree) and .peak_driver_mb after exit."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.peak_driver_mb = 0.0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        me = psutil.Process()
        total = driver = proportional_bytes(me)
        procs = me.children(recursive=True)
        for p in procs:
            try:
                total += proportional_bytes(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # a trial that ended between listing and reading
        self.peak_mb = max(self.peak_mb, total / 2**20)
        self.peak_driver_mb = max(self.peak_driver_mb, driver / 2**20)
        self.max_processes = max(self.max_processes, 1 + len(procs))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "PeakRSS":
        self.sample()
        self._thread = threading.Thread(target=self._run, name="seqrec-fit-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample()

    def as_dict(self) -> dict[str, float]:
        return {"peak_pss_mb": round(self.peak_mb, 1), "peak_driver_pss_mb": round(self.peak_driver_mb, 1),
                "max_processes": self.max_processes}


def proportional_bytes(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_full_info().pss)
    except (AttributeError, psutil.AccessDenied):
        return int(proc.memory_info().rss)
