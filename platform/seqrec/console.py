"""What a seqrec command prints: our logging, progress bars, and Ray's known-harmless noise kept out of it.

Set up in one place: `configure` (seqrec.cli.main), `ray_env_defaults` / `ray_init_options` (seqrec.ray_utils.init_ray)
and `setup_ray_worker`, the worker_process_setup_hook of every worker of a local instance seqrec starts.

    SEQREC_PROGRESS=0|1   progress bars off / on (default: on when stderr is a terminal; `seqrec --quiet` sets 0)

Each Ray switch below names the message it silences and why the message is harmless here.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

PROGRESS_ENV = "SEQREC_PROGRESS"
WORKER_HOOK = "seqrec.console.setup_ray_worker"

# Ray's own switches, set unless the user set them (setdefault), for every command
RAY_ENV = {
    # Ray Train patches `print` in its workers to log to the root logger and also tees to the real stdout:
    # every [train]/[valid] line came out twice. Without the patch a print is printed once.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# ... and for a local instance seqrec starts (not when joining someone's cluster)
LOCAL_RAY_ENV = {
    # watches node draining (spot preemption): a single local node is never drained. Its actor also makes the
    # controller log a C++ error about constructor arguments in the object store.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
# the environment of Ray workers (runtime_env env_vars): a worker's output is never a terminal
WORKER_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar, garbled through log_to_driver
}

# (logger, message start) of records that tell nobody anything they can act on. "ray:" + a path inside the ray
# package names a logger that Ray creates with getLogger(__file__).
HARMLESS_RECORDS = (
    # every ray.train.report as a repr of the whole report (metrics dict, checkpoint): our [valid] line says it
    ("ray:train/v2/_internal/execution/context.py", "Reporting training result"),
    # Train V2's placement group cleaner polls the State API every second; a local instance runs without the
    # dashboard that serves it. (seqrec frees stopped runs' placement groups itself: tune/runner.py.)
    ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
     "Failed to query Ray Train Controller actor state"),
    # the controller's autoscaler request times out while the 2-core machine is busy; no autoscaler runs locally
    ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client", "Failed to send resource request"),
    # Ray turns token authentication on for every new local instance and says so on each start; nothing to do.
    # (Setting RAY_AUTH_MODE=token instead would silence it, but only before `import ray` reads the mode.)
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled"),
    # seqrec turns Ray Data's bars off on purpose (non-terminal output, --quiet): no need to say how to turn them on
    ("ray.data._internal.progress", "Progress bars disabled"),
)
# message regexes of Python warnings that Ray's own code raises about its own calls
HARMLESS_WARNINGS = (
    r".*ExecutionOptions\.exclude_resources.* is deprecated",  # RayDeprecationWarning from Ray Train's DatasetManager
)


class DropRecords(logging.Filter):
    """Drops records whose message starts with one of `starts` (a filter on the named logger that logs them)."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def install_filters() -> None:
    """Attach the harmless-record filters to their loggers and ignore Ray's own deprecation warnings (idempotent)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, start in HARMLESS_RECORDS:
        by_logger[name] = by_logger.get(name, ()) + (start,)
    for name, starts in by_logger.items():
        if name.startswith("ray:"):
            if "ray" not in sys.modules:  # only Ray's processes log these
                continue
            name = os.path.join(os.path.dirname(sys.modules["ray"].__file__), name[4:])
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropRecords) for f in logger.filters):
            logger.addFilter(DropRecords(starts))
    for message in HARMLESS_WARNINGS:  # by message: the category class lives in Ray, maybe not imported yet
        warnings.filterwarnings("ignore", message=message)


def seqrec_debug() -> bool:
    return logging.getLogger("seqrec").getEffectiveLevel() <= logging.DEBUG


def configure(level: str | int = "INFO", quiet: bool = False) -> None:
    """Logging for a seqrec command: one handler on the root logger, our format, Ray's noise filtered."""
    if quiet:
        os.environ[PROGRESS_ENV] = "0"
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level > logging.DEBUG:
        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager" on first use
    install_filters()


def ray_env_defaults(local: bool) -> None:
    """Ray's switches into this process's environment before ray.init (a local instance's processes inherit it)."""
    env = {**RAY_ENV, **(LOCAL_RAY_ENV if local else {})}
    if not seqrec_debug():
        # Ray Data logs every dataset's plan, start and finish at INFO (the console filter of its log file
        # handler is not ours to change); --log-level DEBUG brings them back
        env["RAY_DATA_LOG_LEVEL"] = "WARNING"
    for k, v in env.items():
        os.environ.setdefault(k, v)
    install_filters()


def quiet_ray_data(dataset=None):
    """Ray Data's progress bars off for `dataset` (one whose bar says nothing, or that seqrec draws its own bar
    for), or for every dataset this process creates when bars are off (non-terminal output, --quiet)."""
    if dataset is not None:
        dataset.context.enable_progress_bars = False
        return dataset
    if not progress_enabled():
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    return None


def worker_env() -> dict[str, str]:
    """Environment variables for Ray workers (runtime_env env_vars): whether to draw bars, no third-party bars."""
    env = {**WORKER_ENV, PROGRESS_ENV: "1" if progress_enabled() else "0"}
    if "RAY_DATA_LOG_LEVEL" in os.environ:
        env["RAY_DATA_LOG_LEVEL"] = os.environ["RAY_DATA_LOG_LEVEL"]
    return env


def ray_init_options(local: bool) -> dict[str, Any]:
    """Extra ray.init arguments: Ray's driver logger at WARNING ("Started a local Ray instance." says what our
    own line says), and for a local instance the worker setup hook plus the worker environment."""
    opts: dict[str, Any] = {"logging_level": logging.DEBUG if seqrec_debug() else logging.WARNING}
    if local:
        from seqrec.ray_utils import source_pythonpath

        # PYTHONPATH: the hook imports seqrec in every worker, also from a source checkout that is not installed
        opts["runtime_env"] = {"worker_process_setup_hook": WORKER_HOOK,
                               "env_vars": {**worker_env(), "PYTHONPATH": source_pythonpath()}}
    return opts


def setup_ray_worker() -> None:
    """worker_process_setup_hook of a local instance's workers.

    Pins RAY_ADDRESS to this worker's own cluster: Ray components that find "the" cluster by themselves (Train's
    placement group cleaner through the State API client) otherwise read /tmp/ray/ray_current_cluster or scan the
    machine's GCS processes, and fail with "Found multiple active Ray instances" - or talk to another command's
    cluster - when several seqrec commands run at once. Then installs the harmless-record filters.
    """
    try:
        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception as e:  # never let console set-up keep a worker from starting
        logging.getLogger(__name__).debug("could not pin RAY_ADDRESS: %s", e)
    install_filters()


def train_logging_config():
    """Ray Train's console log level: WARNING (its INFO lines are per-report and per-checkpoint chatter that our
    [train]/[valid] lines already cover); INFO again with --log-level DEBUG."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if seqrec_debug() else "WARNING")


# ------------------------------------------------------------------------------------------ progress bars
def progress_enabled() -> bool:
    """SEQREC_PROGRESS if set, else whether stderr (where bars draw) is a terminal."""
    value = os.environ.get(PROGRESS_ENV)
    if value is not None:
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return sys.stderr.isatty()


def in_ray_worker() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE


class NoBar:
    """Where bars are off: the same calls, doing nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _RayWorkerBar(NoBar):
    """Ray's distributed tqdm from inside a worker: the driver draws it (ray.experimental.tqdm_ray)."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int):
        from ray.experimental.tqdm_ray import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit)
        if initial:
            self.bar.update(initial)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_description(self, desc: str) -> None:
        self.bar.set_description(desc)

    def close(self) -> None:
        self.bar.close()


def progress(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0, workers: bool = False):
    """A progress bar (update / set_description / close, or `with`), or a NoBar where bars are off.

    On the driver: tqdm on stderr, shown only once the loop has run a second. In a Ray worker only if `workers`
    (a loop worth watching, e.g. training steps): Ray's tqdm, drawn by the driver.
    """
    if not progress_enabled():
        return NoBar()
    if in_ray_worker():
        return _RayWorkerBar(total, desc, unit, initial) if workers else NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, delay=1.0, leave=False, dynamic_ncols=True)
