"""benchmarks/bench_average.py: the uniform weight average of checkpoints of one run."""
from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def average_mod():
    return load_benchmark("bench_average")


def test_float_tensors_are_averaged_and_others_kept(average_mod):
    a = {"w": torch.tensor([1.0, 2.0]), "seen": torch.tensor([True, False])}
    b = {"w": torch.tensor([3.0, 6.0]), "seen": torch.tensor([True, False])}
    c = {"w": torch.tensor([2.0, 1.0]), "seen": torch.tensor([True, False])}
    out = average_mod.average_state([a, b, c])
    assert torch.equal(out["w"], torch.tensor([2.0, 3.0]))
    assert torch.equal(out["seen"], a["seen"])


def test_mismatched_checkpoints_are_refused(average_mod):
    a = {"w": torch.ones(2), "seen": torch.tensor([True, False])}
    with pytest.raises(ValueError, match="differs"):
        average_mod.average_state([a, {"w": torch.ones(2), "seen": torch.tensor([True, True])}])
    with pytest.raises(ValueError, match="different tensors"):
        average_mod.average_state([a, {"w": torch.ones(2)}])
