"""Shared fixtures: one Ray instance for the whole session, the real data paths, a small demo dataset."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SEQREC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) imported as a module, for tests of its pure functions."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"real data not found at {SHARED_DATA}; set SEQREC_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray (starting Ray costs seconds)."""
    from seqrec.ray_utils import init_ray

    ray = init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def free_leftover_placement_groups():
    """After each test, remove placement groups still reserved in the shared Ray instance. Tests run one at a
    time, so none belongs to a live run; a Train run stopped by Tune (ASHA) can leave its group reserved, and in
    the shared instance the next test's trainer would then wait for CPUs forever (seen as a suite hang)."""
    yield
    import ray

    if not ray.is_initialized():
        return
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id, info in ray.util.placement_group_table().items():
        if info.get("state") == "CREATED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """A small synthetic dataset (prepared layout) with learnable sequential structure."""
    from seqrec.data.dataset import PreparedDataset
    from seqrec.data.demo import DemoOptions, generate_demo

    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, DemoOptions(n_users=300, n_items=120, seed=7))
    return PreparedDataset.load(out)


@pytest.fixture(scope="session")
def scientific_dataset(tmp_path_factory, shared_data):
    """The real Scientific data (UniSRec split) in the prepared layout."""
    from seqrec.data.dataset import PreparedDataset
    from seqrec.data.unisrec import prepare_unisrec

    out = tmp_path_factory.mktemp("scientific")
    prepare_unisrec(shared_data / "Scientific", out)
    return PreparedDataset.load(out)


@pytest.fixture
def packed_and_padded_scores(monkeypatch):
    """score_all(model, batch) twice: with QueryPacking as the model plans it, and with packing switched off
    (every batch padded), for tests that the two agree."""
    import torch

    from seqrec.models.layers import QueryPacking

    def run(model, batch):
        with torch.no_grad():
            packed = model.score_all(batch)
            with monkeypatch.context() as patch:
                patch.setattr(QueryPacking, "plan", staticmethod(lambda *a, **k: None))
                padded = model.score_all(batch)
        return packed, padded

    return run
