"""Multi-node on one machine: a `ray.cluster_utils.Cluster` of a head (no CPUs: it schedules nothing) and two
worker nodes (one CPU each, custom resources node_a / node_b, and `train` on both), each its own raylet. The
commands join it with `--address`, in subprocesses (each its own Ray driver, as a user would run them), and the
one-node references run the same command on a private local instance (no --address, 2 CPUs).

  - `seqrec data prepare --format amazon2018`: its Ray Data tasks ran on both worker nodes (the report's
    placement), and every output file is identical to the one-node run's;
  - `seqrec train`, 2 workers (STRICT_SPREAD: one per node), DDP over gloo and DeepSpeed ZeRO-2: the same weights
    as a one-node 2-worker run, checkpoints in a storage path every node reaches (each rank's rank_state says
    where it ran);
  - a worker node killed mid-run (scaling.max_failures=1): a fresh node joins, the run resumes from its latest
    checkpoint (not from step 0) and ends with the uninterrupted run's weights;
  - `seqrec tune`: two concurrent one-worker trials land on the two worker nodes.

The helpers are shared with benchmarks/bench_multinode.py (which writes the figures to benchmarks/results/).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from seqrec.ray_utils import free_ports

pytestmark = pytest.mark.slow

RAW_SAMPLE = "raw_sample"  # under the shared data dir: Magazine_Subscriptions reviews + meta (Amazon 2018)
# DDP: the same config for the clean runs and the node-kill run, so the killed run's final weights can be
# compared with the uninterrupted one's. Checkpoints every EVAL_EVERY steps; the kill lands after the first.
DDP_STEPS, DDP_EVAL_EVERY = 60, 10
DS_STEPS = 4
DS_MODEL = {"max_len": 20, "dim": 16, "layers": 1, "heads": 2, "hidden": 32, "tied_output": True}
TRAIN_TIMEOUT_S = 400


# ------------------------------------------------------------------------------------------ the cluster

@dataclass
class LocalCluster:
    """A head + two worker nodes; `nodes` maps node_a / node_b to the Ray node (replaced after a kill)."""

    cluster: object
    temp_root: Path  # RAY_TMPDIR of every process of this module (the session dirs, ray_current_cluster)
    nodes: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self, name: str):
        node = self.cluster.add_node(num_cpus=1, resources={name: 1, "train": 1},
                                     temp_dir=str(self.temp_root / "ray"))
        self.nodes[name] = node
        return node

    def node_ids(self) -> dict[str, str]:
        return {name: node.node_id for name, node in self.nodes.items()}

    def env(self) -> dict[str, str]:
        """The environment of the commands: this module's Ray temp dir, one thread, DeepSpeed on CPU."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=str(self.temp_root), RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        return env

    def shutdown(self) -> None:
        # node by node, not Cluster.shutdown(): that also resets this process's internal KV client, which a Ray
        # instance of another test module in this pytest process may still use
        for node in list(self.cluster.worker_nodes):
            self.cluster.remove_node(node, allow_graceful=False)
        if self.cluster.head_node is not None:
            self.cluster.remove_node(self.cluster.head_node, allow_graceful=False)


def start_cluster() -> LocalCluster:
    """Head with 0 CPUs + node_a + node_b. A private RAY_TMPDIR (short: Unix socket paths are limited to ~107
    bytes): Cluster writes its address to <RAY_TMPDIR>/ray/ray_current_cluster, which must not be /tmp/ray's,
    where other Ray users on the machine would find it."""
    from ray.cluster_utils import Cluster

    temp_root = Path(tempfile.mkdtemp(prefix="seqmn", dir="/tmp"))
    (temp_root / "ray").mkdir()
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(temp_root)
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "temp_dir": str(temp_root / "ray"), "include_dashboard": False,
            "dashboard_agent_listen_port": free_ports()[0]})
        lc = LocalCluster(cluster, temp_root)
        lc.add_worker("node_a")
        lc.add_worker("node_b")
    finally:
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
    return lc


@pytest.fixture(scope="module")
def cluster(request):
    lc = start_cluster()
    request.addfinalizer(lambda: (lc.shutdown(), shutil.rmtree(lc.temp_root, ignore_errors=True)))
    return lc


# ------------------------------------------------------------------------------------------ the commands
def seqrec_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "seqrec"), *args]


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(seqrec_cmd(*args), env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = TRAIN_TIMEOUT_S) -> str:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args[1:3]} timed out; log tail:\n{log.read_text()[-4000:]}")
    text = log.read_text(errors="replace")
    assert rc == 0, f"{proc.args[1:3]} exited {rc}; log tail:\n{text[-4000:]}"
    return text


def run_all(jobs: list[tuple[list[str], dict, Path]], timeout: float = TRAIN_TIMEOUT_S) -> list[str]:
    """Run the commands at the same time (a multi-node run and its one-node reference), wait for all."""
    procs = [(start(args, env, log), log) for args, env, log in jobs]
    try:
        return [finish(p, log, timeout) for p, log in procs]
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def prepare_args(shared_data: Path, out: Path, address: str | None) -> list[str]:
    return ["data", "prepare", "--format", "amazon2018", "--input", str(shared_data / RAW_SAMPLE),
            "--out", str(out), *(["--address", address] if address else [])]


def train_args(dataset: Path, storage: Path, name: str, address: str | None, *, strategy: str = "ddp",
               steps: int = DDP_STEPS, eval_every: int = DDP_EVAL_EVERY, extra: dict | None = None) -> list[str]:
    sets = {"data.path": str(dataset), "run.storage_path": str(storage), "run.name": name, "run.test": "false",
            "scaling.num_workers": 2, "train.threads_per_worker": 1, "train.steps": steps,
            "train.eval_every": eval_every, "train.log_every": eval_every, "train.keep_checkpoints": 50}
    if address:  # one worker per node, and only on nodes that offer `train` (the head does not)
        sets.update({"scaling.placement_strategy": "STRICT_SPREAD", "scaling.custom_resources": "{train: 1}"})
    if strategy == "deepspeed":
        sets.update({"scaling.strategy": "deepspeed", "scaling.deepspeed_config": "zero2",
                     "model.name": "bert4rec", "model.params": json.dumps(DS_MODEL)})
    sets.update(extra or {})
    args = ["train", "--config", "tiny_demo"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args + (["--address", address] if address else [])


# ------------------------------------------------------------------------------------------ reading back
def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, by step: Ray Train copies each rank's files in; rank 0's manifest lists
    what a complete one holds (every rank's state included)."""
    from seqrec.storage import MANIFEST, verify_manifest

    def complete(ckpt: Path) -> bool:
        try:
            verify_manifest(ckpt, str(ckpt))
        except FileNotFoundError:
            return False
        return (ckpt / MANIFEST).exists()

    return sorted((p for p in run_dir.glob("checkpoint_*") if complete(p)), key=lambda p: int(p.name.split("_")[-1]))


def registered_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (its checkpoint_manager_snapshot.json)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):  # not written yet, or mid-write
        return []
    return sorted(int(r["checkpoint_dir_name"].split("_")[-1]) for r in results)


def rank_nodes(ckpt: Path) -> list[str]:
    """Node id of each rank, from its rank state (seqrec.train.loop records where the rank ran)."""
    import torch

    return [torch.load(p, weights_only=True)["node_id"] for p in sorted(ckpt.glob("rank_state_*.pt"))]


def weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def weight_diff(a: Path, b: Path) -> dict:
    """Whether two checkpoints hold identical tensors, and the largest absolute difference."""
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return {"identical": all(torch.equal(wa[k], wb[k]) for k in wa),
            "max_abs_diff": max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa),
            "tensors": len(wa)}


def same_files(a: Path, b: Path) -> dict:
    """Every file of two prepared datasets byte for byte, except meta.json, compared without its run-specific
    parts (timings, placement); the row counts of the split files."""
    import pyarrow.parquet as pq

    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert fa == fb, (fa, fb)
    differing = []
    for rel in fa:
        if rel.name == "meta.json":
            ma, mb = (json.loads((d / rel).read_text()) for d in (a, b))
            for m in (ma, mb):
                for key in ("timings_s", "placement"):
                    m["report"].pop(key, None)
            if ma != mb:
                differing.append(str(rel))
        elif (a / rel).read_bytes() != (b / rel).read_bytes():
            differing.append(str(rel))
    rows = {str(rel): pq.ParquetFile(a / rel).metadata.num_rows for rel in fa if rel.suffix == ".parquet"}
    return {"files": [str(r) for r in fa], "differing": differing, "rows": rows}


# ------------------------------------------------------------------------------------------ the stages
def prepare_stage(lc: LocalCluster, shared_data: Path, work: Path) -> dict:
    t0 = time.perf_counter()
    run_all([(prepare_args(shared_data, work / "prep_multi", lc.address), lc.env(), work / "prep_multi.log"),
             (prepare_args(shared_data, work / "prep_single", None), lc.env(), work / "prep_single.log")])
    placement = json.loads((work / "prep_multi" / "meta.json").read_text())["report"]["placement"]
    single = json.loads((work / "prep_single" / "meta.json").read_text())["report"]["placement"]
    return {"seconds": round(time.perf_counter() - t0, 1), "placement": placement,
            "single_node_placement": single, "compare": same_files(work / "prep_multi", work / "prep_single"),
            "dataset": str(work / "prep_multi")}


def train_stage(lc: LocalCluster, dataset: Path, work: Path, strategy: str) -> dict:
    steps, every = (DDP_STEPS, DDP_EVAL_EVERY) if strategy == "ddp" else (DS_STEPS, DS_STEPS)
    storage = work / "runs"  # one directory on the machine's disk: every node reaches it
    t0 = time.perf_counter()
    run_all([(train_args(dataset, storage, f"{strategy}_multi", lc.address, strategy=strategy, steps=steps,
                         eval_every=every), lc.env(), work / f"{strategy}_multi.log"),
             (train_args(dataset, storage, f"{strategy}_single", None, strategy=strategy, steps=steps,
                         eval_every=every), lc.env(), work / f"{strategy}_single.log")])
    multi, single = checkpoints(storage / f"{strategy}_multi"), checkpoints(storage / f"{strategy}_single")
    return {"seconds": round(time.perf_counter() - t0, 1), "steps": steps,
            "multi_checkpoint": str(multi[-1]), "single_checkpoint": str(single[-1]),
            "multi_rank_nodes": rank_nodes(multi[-1]), "single_rank_nodes": rank_nodes(single[-1]),
            "checkpoint_steps": [int(p.name.split("_")[-1]) for p in multi],
            "weights": weight_diff(multi[-1], single[-1])}


def node_kill_stage(lc: LocalCluster, dataset: Path, work: Path, kill: str = "node_b") -> dict:
    """Start a 2-node DDP run (max_failures=1), remove `kill` right after the first complete checkpoint, add a
    fresh node with its resources; the run must resume from its latest checkpoint and finish."""
    storage, name = work / "runs", "ddp_killed"
    log = work / f"{name}.log"
    killed_id = lc.nodes[kill].node_id
    proc = start(train_args(dataset, storage, name, lc.address, extra={"scaling.max_failures": 1}), lc.env(), log)
    try:
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        # a checkpoint on disk is not yet one a restart resumes from: the controller registers it (and writes its
        # snapshot) once it has collected the report; a kill before that restarts the run from step 0
        while not (at_kill := registered_steps(storage / name)):
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        t_kill = time.perf_counter()
        lc.cluster.remove_node(lc.nodes.pop(kill), allow_graceful=False)  # its raylet and workers, SIGKILL
        removed_s = time.perf_counter() - t_kill
        lc.add_worker(kill)  # a fresh node offering the same resources
        t_resumed = None
        while proc.poll() is None and t_resumed is None:
            if "resumed from step" in log.read_text(errors="replace"):
                t_resumed = time.perf_counter()
            time.sleep(0.2)
        text = finish(proc, log, max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if t_resumed is None:  # the run finished between two polls: the line is in the log all the same
        t_resumed = time.perf_counter()
    resumed_at = sorted({int(line.split("resumed from step")[1].split()[0])
                         for line in text.splitlines() if "resumed from step" in line})
    ckpts = checkpoints(storage / name)
    return {"killed_node": killed_id, "replacement_node": lc.nodes[kill].node_id,
            "checkpoint_steps_at_kill": at_kill, "resumed_from_steps": resumed_at,
            "final_step": int(ckpts[-1].name.split("_")[-1]), "final_checkpoint": str(ckpts[-1]),
            "final_rank_nodes": rank_nodes(ckpts[-1]), "node_removal_s": round(removed_s, 2),
            "resume_s": round(t_resumed - t_kill, 1)}


def tune_stage(lc: LocalCluster, dataset: Path, work: Path) -> dict:
    """Two concurrent one-worker trials (each worker 1 CPU; the worker nodes have one CPU each)."""
    args = ["tune", "--grid", "smoke_demo", "--num-samples", "2", "--name", "mn_sweep",
            "--storage-path", str(work / "tune"), "--address", lc.address]
    for key, value in {"data.path": str(dataset), "train.steps": 4, "train.eval_every": 2, "train.log_every": 2,
                       "scaling.custom_resources": "{train: 1}"}.items():
        args += ["--set", f"{key}={value}"]
    t0 = time.perf_counter()
    run_all([(args, lc.env(), work / "tune.log")])
    trials = sorted((work / "tune" / "mn_sweep" / "trials").glob("trial_*"))
    nodes = {t.name: sorted({n for c in checkpoints(t) for n in rank_nodes(c)}) for t in trials}
    return {"seconds": round(time.perf_counter() - t0, 1), "trial_nodes": nodes}


# ------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def prepared(cluster, shared_data, work) -> dict:
    return prepare_stage(cluster, shared_data, work)


def test_prepare_runs_on_both_worker_nodes_and_matches_one_node(cluster, prepared):
    ids = cluster.node_ids()
    placement = prepared["placement"]
    # every Ray Data task ran on a worker node (the head has no CPUs), and both took part
    assert set(placement["nodes"]) == {ids["node_a"], ids["node_b"]}, placement
    assert "MapBatches(_parse_reviews_block)" in placement["operators"]
    assert len(prepared["single_node_placement"]["nodes"]) == 1
    compare = prepared["compare"]
    assert compare["differing"] == [], compare
    assert {"sequences.parquet", "items.parquet", "splits/train.parquet"} <= set(compare["files"])
    assert compare["rows"]["sequences.parquet"] > 0


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_two_node_training_matches_one_node(cluster, prepared, work, strategy):
    ids = cluster.node_ids()
    out = train_stage(cluster, Path(prepared["dataset"]), work, strategy)
    assert sorted(out["multi_rank_nodes"]) == sorted([ids["node_a"], ids["node_b"]]), out  # one rank per node
    assert len(set(out["single_rank_nodes"])) == 1
    assert out["checkpoint_steps"][-1] == out["steps"]
    # same seed, same world size, gloo on CPU: the reduction order does not depend on where the ranks run
    assert out["weights"]["identical"], out["weights"]


def test_node_kill_resumes_from_latest_checkpoint(cluster, prepared, work):
    out = node_kill_stage(cluster, Path(prepared["dataset"]), work)
    assert out["final_step"] == DDP_STEPS
    # restarted from a checkpoint written before the kill, not from step 0
    assert out["resumed_from_steps"] and out["resumed_from_steps"][0] >= out["checkpoint_steps_at_kill"][0] > 0, out
    assert out["killed_node"] not in out["final_rank_nodes"]
    assert out["replacement_node"] in out["final_rank_nodes"]
    clean = work / "runs" / "ddp_multi"
    if clean.exists():  # the uninterrupted run of the same config (test_two_node_training_matches_one_node[ddp])
        diff = weight_diff(Path(out["final_checkpoint"]), checkpoints(clean)[-1])
        assert diff["identical"], diff  # nothing lost: RNG, data position, optimizer all restored


def test_tune_trials_spread_over_the_worker_nodes(cluster, prepared, work):
    ids = cluster.node_ids()
    out = tune_stage(cluster, Path(prepared["dataset"]), work)
    assert len(out["trial_nodes"]) == 2, out
    used = {n for nodes in out["trial_nodes"].values() for n in nodes}
    assert used == {ids["node_a"], ids["node_b"]}, out
