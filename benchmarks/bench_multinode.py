"""Multi-node on one machine: the figures behind tests/test_multinode.py, written to JSON.

    python benchmarks/bench_multinode.py [--out benchmarks/results/multinode_<time>.json] [--work DIR]

Starts the same `ray.cluster_utils.Cluster` as the tests (a head with no CPUs, node_a and node_b with one CPU
each; private RAY_TMPDIR) and runs, through the same helpers (tests/test_multinode.py):

  1. `seqrec data prepare --format amazon2018` on the raw sample, on the cluster and on a one-node local instance:
     the nodes each Ray Data operator ran on, and whether every output file is identical (row counts per file);
  2. `seqrec train` with 2 workers, one per node (DDP over gloo, then DeepSpeed ZeRO-2), and the same on one node:
     where each rank ran (its checkpoint's rank state) and whether the weights are identical;
  3. a 2-node DDP run whose node_b is killed after its first checkpoint and replaced: the step it resumed from,
     the seconds from the kill to the resumed worker's first line, and whether its final weights equal the
     uninterrupted run's;
  4. a 2-trial `seqrec tune` sweep: the node of each trial.

Prints the figures and writes them as one JSON (benchmarks/results/multinode_<time>.json).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench_multinode")


def _helpers():
    """tests/test_multinode.py (not a package) as a module: the cluster and the stages are defined once."""
    spec = importlib.util.spec_from_file_location("test_multinode", REPO / "tests" / "test_multinode.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # before it runs: its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def _short(node_id: str, names: dict[str, str]) -> str:
    """A node id as its role (node_a, node_b, node_b#2 for the replacement) where known."""
    return names.get(node_id, node_id[:12])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/multinode_<time>.json)")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--shared-data", default=os.environ.get("SEQREC_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    mn = _helpers()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="seqrec_multinode_"))
    t0 = time.perf_counter()
    lc = mn.start_cluster()
    started_s = time.perf_counter() - t0
    names = {v: k for k, v in lc.node_ids().items()}
    names[lc.cluster.head_node.node_id] = "head"
    try:
        prep = mn.prepare_stage(lc, Path(args.shared_data), work)
        log.info("prepare: %s", prep["placement"]["nodes"])
        dataset = Path(prep["dataset"])
        ddp = mn.train_stage(lc, dataset, work, "ddp")
        ds = mn.train_stage(lc, dataset, work, "deepspeed")
        tune = mn.tune_stage(lc, dataset, work)
        kill = mn.node_kill_stage(lc, dataset, work)
        names[kill["replacement_node"]] = "node_b#2"
        kill["weights_vs_uninterrupted"] = mn.weight_diff(Path(kill["final_checkpoint"]),
                                                           Path(ddp["multi_checkpoint"]))
    finally:
        lc.shutdown()
        shutil.rmtree(lc.temp_root, ignore_errors=True)

    def nodes(ids):
        return sorted({_short(n, names) for n in ids})

    result = {
        "benchmark": "multinode",
        "cluster": {"head": {"CPU": 0}, "node_a": {"CPU": 1, "node_a": 1, "train": 1},
                    "node_b": {"CPU": 1, "node_b": 1, "train": 1}, "start_s": round(started_s, 1),
                    "machine_cpus": os.cpu_count()},
        "prepare": {"nodes": nodes(prep["placement"]["nodes"]),
                    "nodes_per_operator": {op: nodes(ids) for op, ids in prep["placement"]["operators"].items()},
                    "single_node_nodes": len(prep["single_node_placement"]["nodes"]),
                    "identical_to_one_node": not prep["compare"]["differing"],
                    "differing_files": prep["compare"]["differing"], "rows": prep["compare"]["rows"],
                    "seconds_both_runs": prep["seconds"]},
        "train": {strategy: {"steps": out["steps"], "rank_nodes": [_short(n, names) for n in out["multi_rank_nodes"]],
                             "single_node_rank_nodes": len(set(out["single_rank_nodes"])),
                             "weights_identical_to_one_node": out["weights"]["identical"],
                             "max_abs_diff": out["weights"]["max_abs_diff"], "tensors": out["weights"]["tensors"],
                             "seconds_both_runs": out["seconds"]}
                  for strategy, out in (("ddp_gloo", ddp), ("deepspeed_zero2", ds))},
        "node_kill": {"killed": "node_b", "checkpoint_steps_at_kill": kill["checkpoint_steps_at_kill"],
                      "resumed_from_steps": kill["resumed_from_steps"], "final_step": kill["final_step"],
                      "final_rank_nodes": [_short(n, names) for n in kill["final_rank_nodes"]],
                      "node_removal_s": kill["node_removal_s"], "resume_s": kill["resume_s"],
                      "weights_identical_to_uninterrupted": kill["weights_vs_uninterrupted"]["identical"],
                      "max_abs_diff": kill["weights_vs_uninterrupted"]["max_abs_diff"]},
        "tune": {"trial_nodes": {t: nodes(ids) for t, ids in tune["trial_nodes"].items()},
                 "seconds": tune["seconds"]},
        "total_s": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out) if args.out else RESULTS / f"multinode_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
