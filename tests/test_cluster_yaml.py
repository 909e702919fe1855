"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema and validator) and keeps the
cluster closed: only SSH from an admin range, dashboard/Serve on loopback, GPU workers that autoscale."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


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
    for t in gpu.values():
        assert t["max_workers"] > t["min_workers"] >= 0  # room to scale
    assert types["gpu_train"]["min_workers"] == 0  # training nodes only exist while a trainer needs them


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
