from dataclasses import dataclass, field

import pytest

from seqrec.config import from_dict, parse_overrides


@dataclass
class Inner:
    lr: float = 1e-3
    layers: int = 2


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    ks: tuple[int, ...] = (10,)
    note: str | None = None


def test_from_dict_nested_and_types():
    cfg = from_dict(Outer, {"name": "y", "inner": {"lr": "1e-4", "layers": 4}, "ks": [1, 10]})
    assert cfg.inner.lr == 1e-4 and cfg.inner.layers == 4 and cfg.ks == (1, 10)


def test_unknown_keys_and_bad_types_are_rejected():
    with pytest.raises(ValueError, match="unknown keys"):
        from_dict(Outer, {"inner": {"lrr": 1}})
    with pytest.raises(TypeError, match="inner.layers"):
        from_dict(Outer, {"inner": {"layers": "four"}})


def test_overrides():
    assert parse_overrides(["train.lr=1e-3", "model.layers=2", "name=abc"]) == {"train.lr": 1e-3, "model.layers": 2, "name": "abc"}
