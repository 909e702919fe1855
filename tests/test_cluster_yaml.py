"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema and validator) and keeps the
cluster closed: only SSH from an admin range, dashboard/Serve on loopback, workers that autoscale. Its node
types offer the custom resources the code and the autoscaling tests ask for (and the head offers none)."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
GPUS_PER_INSTANCE = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8, "p4d.24xlarge": 8}
BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_valid_against_ray_schema(cluster):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)  # the file as written
    validate_config(prepare_config(cluster))  # and after the launcher fills in its provider defaults
    # a broken config is rejected by the same validator (the check is not vacuous)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**cluster, "max_workers": "many"}, schema)


def test_cpu_head_and_autoscaling_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["max_workers"] == 0 and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    gpu = {name: t for name, t in types.items() if t["node_config"]["InstanceType"].startswith(("g5", "p4", "p5"))}
    assert {"gpu_train", "gpu_serve"} <= set(gpu)
    for name, t in types.items():
        if name != cluster["head_node_type"]:
            assert t["max_workers"] > t["min_workers"] >= 0, name  # room to scale
    # training and CPU tuning nodes only exist while a trainer or a sweep needs them
    assert types["gpu_train"]["min_workers"] == 0 and types["cpu_tune"]["min_workers"] == 0
    assert not types["cpu_tune"]["node_config"]["InstanceType"].startswith(("g", "p"))


def custom(resources: dict) -> set[str]:
    return set(resources) - BUILTIN


def requested_custom_resources() -> dict[str, set[str]]:
    """Custom resources every shipped train config and grid asks its Train workers for (scaling.custom_resources)."""
    from seqrec.config import CONFIG_DIR, read_yaml

    out = {}
    for path in sorted((CONFIG_DIR / "train").rglob("*.yaml")):
        res = (read_yaml(path).get("scaling") or {}).get("custom_resources") or {}
        out[f"train/{path.stem}"] = set(res)
    for path in sorted((CONFIG_DIR / "grids").rglob("*.yaml")):
        data = read_yaml(path)
        res = dict((data.get("set") or {}).get("scaling.custom_resources") or {})
        res.update(((data.get("set") or {}).get("scaling") or {}).get("custom_resources") or {})
        out[f"grids/{path.relative_to(CONFIG_DIR / 'grids').with_suffix('')}"] = set(res)
    return out


def test_every_requested_resource_is_offered_by_a_worker_type_not_the_head(cluster):
    types = cluster["available_node_types"]
    head = custom(types[cluster["head_node_type"]]["resources"])
    offered = {r for name, t in types.items() if name != cluster["head_node_type"] for r in custom(t["resources"])}
    requests = requested_custom_resources()
    assert requests["grids/autoscale_demo"] == {"tune"}  # the autoscaling sweep (not vacuous)
    for where, names in requests.items():
        assert names <= offered, (where, names - offered)  # else the autoscaler has no node type to add
        assert not names & head, (where, names & head)  # else the work runs on the head and nothing scales
    # the sweep's workers are CPU work: the type that offers `tune` has no GPUs
    tune_types = [t for t in types.values() if "tune" in t["resources"]]
    assert tune_types and all(t["node_config"]["InstanceType"] not in GPUS_PER_INSTANCE for t in tune_types)


def test_train_and_serve_resources_follow_the_gpus(cluster):
    """`train` is one unit per GPU (one Train worker per GPU, scaling.custom_resources: {train: 1}); the serve
    type has GPUs for replicas with num_gpus and offers `serve`."""
    types = cluster["available_node_types"]
    train = types["gpu_train"]
    assert train["resources"]["train"] == GPUS_PER_INSTANCE[train["node_config"]["InstanceType"]]
    serve = types["gpu_serve"]
    assert GPUS_PER_INSTANCE[serve["node_config"]["InstanceType"]] >= 1 and "serve" in serve["resources"]
    # the documented replica settings ask Serve for exactly what gpu_serve offers
    from seqrec.serve.app import deployment_options
    from seqrec.serve.config import settings_from_dict

    settings = settings_from_dict({"recommender": {"num_gpus": 1, "resources": {"serve": 1}}})
    actor = deployment_options(settings.recommender)["ray_actor_options"]
    assert actor["num_gpus"] == 1 and custom(actor["resources"]) == custom(serve["resources"]) == {"serve"}
    from seqrec.train.config import ScalingSection

    assert ScalingSection(use_gpu=True, custom_resources={"train": 1}).resources_per_worker() == {
        "CPU": 1.0, "GPU": 1, "train": 1.0}


def test_the_autoscaling_test_cluster_is_cluster_yaml_in_small(cluster):
    """benchmarks/bench_autoscaling.py (and tests/test_autoscaling.py through it) scale a worker type of the
    same name and custom resources as cluster.yaml's, from a head that offers none of them."""
    from conftest import load_benchmark

    bench = load_benchmark("bench_autoscaling")
    types = cluster["available_node_types"]
    assert bench.WORKER_TYPE in types
    assert custom(bench.WORKER_RESOURCES) == custom(types[bench.WORKER_TYPE]["resources"]) == {"tune"}
    assert not custom(bench.HEAD_RESOURCES) & custom(bench.WORKER_RESOURCES)
    assert types[bench.WORKER_TYPE]["min_workers"] == 0  # scaled from zero, as in the test


def test_setup_installs_the_project(cluster):
    assert any("pip install -e ." in cmd for cmd in cluster["setup_commands"])
    assert "." in cluster["file_mounts"].values()


def test_no_dashboard_or_serve_port_open_to_the_world(cluster):
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    for rule in rules:
        ranges = [r["CidrIp"] for r in rule.get("IpRanges", [])]
        assert "0.0.0.0/0" not in ranges, rule
        assert not rule["FromPort"] <= 8265 <= rule["ToPort"] and not rule["FromPort"] <= 8000 <= rule["ToPort"]
    head_cmds = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds and "0.0.0.0" not in head_cmds


def test_ray_start_flags_exist(cluster):
    """Every flag of the start commands is a real `ray start` option of the installed Ray."""
    from ray.scripts.scripts import start

    known = {opt for p in start.params for opt in p.opts}
    for cmd in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        for part in cmd.split(";"):
            words = shlex.split(part.replace("$RAY_HEAD_IP", "HEAD"))
            if words[:2] != ["ray", "start"]:
                continue
            for w in words[2:]:
                if w.startswith("--"):
                    assert w.split("=")[0] in known, w
