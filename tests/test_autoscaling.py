"""Autoscaling observed on one machine (benchmarks/bench_autoscaling.py's scenario, with assertions).

A private head of {CPU: 1} runs Ray's fake multi-node provider (the provider of ray.cluster_utils.AutoscalingCluster,
started here by `ray start --block` on loopback with private ports, temp dir and token auth instead of that class's
`ray stop --force`, which would stop every Ray instance on the machine). Its worker type is cluster.yaml's
`cpu_tune`, offering {CPU: 1, tune: 1}, at most 2 nodes, each a real raylet on this machine.

- `ray job submit` of a sweep whose trials need `tune` makes the autoscaler add worker nodes; once the sweep is
  done they are removed after the idle timeout.
- the sweep's winner is deployed with `ray job submit jobs/deploy.py` and recommender autoscaling (1..3 replicas,
  target 0.2 ongoing requests); a bounded load adds replicas, and they go back to 1 after it.

Node and replica counts are polled every second; the timelines are in the assertion messages.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark

IDLE_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_autoscaling")


@pytest.fixture(scope="module")
def cluster(bench):
    c = bench.FakeCluster(idle_timeout_s=IDLE_TIMEOUT_S)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def sweep(bench, cluster, demo_dataset, tmp_path_factory):
    return bench.run_sweep(cluster, demo_dataset.path, tmp_path_factory.mktemp("tune"), IDLE_TIMEOUT_S)


@pytest.mark.slow
def test_sweep_adds_worker_nodes_and_idle_ones_are_removed(bench, cluster, sweep):
    timeline = sweep["node_timeline"]
    assert timeline and timeline[0][1] == 0, timeline  # the head alone: nothing offers `tune` yet
    # both trials at once need two `tune` nodes; the autoscaler added them while the job ran
    assert sweep["peak_worker_nodes"] == bench.MAX_WORKERS, timeline
    assert sweep["scale_up_s"] is not None and sweep["first_worker_node_s"] < sweep["job_finished_s"], sweep
    # and removed all of them once idle (the idle clock starts when the trials end, a little before the job does)
    assert sweep["scale_down_s"] is not None and sweep["all_workers_removed_s"] > sweep["first_worker_node_s"], sweep
    assert cluster.worker_count() == 0
    # the sweep itself finished on those nodes: both trials and a best record
    best = json.loads(Path(sweep["best_record"]).read_text())
    assert Path(best["checkpoint"]).is_dir(), best
    trials = list((Path(sweep["best_record"]).parent / "trials").glob("trial_*"))
    assert len(trials) == 2, trials


@pytest.mark.slow
def test_serve_adds_replicas_under_load_and_removes_them_after(bench, cluster, sweep, demo_dataset):
    result = bench.run_serve(cluster, sweep["best_record"], bench.demo_histories(demo_dataset.path),
                             concurrency=12, load_s=20.0)
    timeline = result["replica_timeline"]
    assert result["requests"]["ok"] > 0 and result["requests"]["failed"] == 0, result["requests"]
    assert result["scale_up_s"] is not None and result["peak_replicas"] >= 2, timeline
    assert result["scale_down_s"] is not None, timeline
    assert cluster.replica_count() == bench.SERVE_SETTINGS["recommender.min_replicas"], timeline


def test_serve_settings_carry_the_autoscaling_delays_and_custom_resources():
    """What run_serve relies on: the delays reach Serve's autoscaling_config only when set (None keeps Serve's
    defaults), and custom resources reach the replicas' ray_actor_options (cluster.yaml's `serve`)."""
    from seqrec.serve.app import deployment_options
    from seqrec.serve.config import settings_from_dict

    s = settings_from_dict({"recommender": {"max_replicas": 3, "upscale_delay_s": 1, "downscale_delay_s": 4,
                                            "resources": {"serve": 1}}})
    opts = deployment_options(s.recommender)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8.0,
                                          "upscale_delay_s": 1.0, "downscale_delay_s": 4.0}
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {"serve": 1.0}}
    default = deployment_options(settings_from_dict({}).recommender)
    assert "upscale_delay_s" not in default["autoscaling_config"] and "resources" not in default["ray_actor_options"]
