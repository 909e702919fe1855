"""Typed configs: dataclasses filled from YAML with unknown keys rejected (no string-keyed dicts downstream)."""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
CONFIG_DIR = Path(__file__).parent / "configs"


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for arg in non_none:
            try:
                return _convert(arg, value, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(f"{where}: {value!r} matches none of {non_none}: {errors}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        return float(value)  # YAML reads 1e-4 as a string
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise with the key's path."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown keys {sorted(unknown)}; allowed: {sorted(fields)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return data


def resolve_config_path(name_or_path: str, subdir: str = "") -> Path:
    """A file path as given, or a named config shipped in the package (e.g. 'sasrec_scientific')."""
    p = Path(name_or_path)
    if p.exists():
        return p
    base = CONFIG_DIR / subdir if subdir else CONFIG_DIR
    for candidate in (base / name_or_path, base / f"{name_or_path}.yaml"):
        if candidate.exists():
            return candidate
    shipped = sorted(q.relative_to(base).with_suffix("").as_posix() for q in base.rglob("*.yaml")) if base.exists() else []
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a shipped config; shipped: {shipped}")


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys ('train.lr', 'model.params.layers') in a nested mapping, in order; returns `data`."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {dotted!r}: {key!r} is {child!r}, not a mapping")
            node = child
        node[leaf] = value
    return data


def load_config(cls: type[T], name_or_path: str, subdir: str = "", overrides: dict[str, Any] | None = None) -> T:
    data = read_yaml(resolve_config_path(name_or_path, subdir))
    return from_dict(cls, apply_overrides(data, overrides))


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """['train.lr=1e-3', 'model.layers=2'] -> {'train.lr': 0.001, 'model.layers': 2} (values parsed as YAML)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} must look like key.path=value")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw)
        if isinstance(value, str):
            try:  # YAML 1.1 reads '1e-3' as a string
                value = float(value)
            except ValueError:
                pass
        out[key.strip()] = value
    return out
