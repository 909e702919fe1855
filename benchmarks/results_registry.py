"""The results registry: one JSON record per reported result, in benchmarks/results/registry.jsonl.

Every figure the README and docs/ show is rendered from these records (benchmarks/render_results.py), so a
number is written once, with where it came from (command, commit, source file), and a hand-edited table is
caught by `render_results.py --check`. Benchmarks append their headline figures with `append_record`:

    from results_registry import append_record
    append_record(id="serve_sasrec_demo", kind="serve", title="...", command="python benchmarks/bench_serve.py ...",
                  metrics={"p50_ms": 23.0, "p99_ms": 42.4}, source="benchmarks/results/serve_x.json", note="...")

A metric is a number, or for repeated runs {"mean": m, "per_seed": {"1": a, "2": b}} (seeds of a trained
model) / {"mean": m, "per_run": {"1": a, ...}} (repeated benchmark runs). The format is documented in
docs/benchmarks.md.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "benchmarks" / "results" / "registry.jsonl"
KINDS = ("reference", "model", "ablation", "critique", "serve", "prepare", "bench", "generalisation")
# every record carries every field (null where it does not apply), so tables never guess at a missing key
FIELDS = ("id", "kind", "title", "command", "commit", "date", "dataset", "split", "users", "model", "config",
          "seeds", "metrics", "source", "note")
REPEAT_KEYS = ("per_seed", "per_run")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_record(record: dict[str, Any], where: str = "record") -> None:
    """Raise ValueError naming the record and the field when `record` does not follow the registry format."""
    missing = [f for f in FIELDS if f not in record]
    extra = sorted(set(record) - set(FIELDS))
    if missing or extra:
        raise ValueError(f"{where}: missing fields {missing}, unknown fields {extra}")
    rid = record["id"]
    if not isinstance(rid, str) or not rid or any(c.isspace() for c in rid):
        raise ValueError(f"{where}: id must be a non-empty string without spaces, got {rid!r}")
    if record["kind"] not in KINDS:
        raise ValueError(f"{rid}: kind {record['kind']!r} is not one of {KINDS}")
    for key in ("title", "commit", "date", "note"):
        if not isinstance(record[key], str) or not record[key]:
            raise ValueError(f"{rid}: {key} must be a non-empty string")
    try:
        datetime.date.fromisoformat(record["date"])
    except ValueError:
        raise ValueError(f"{rid}: date {record['date']!r} is not YYYY-MM-DD") from None
    if record["seeds"] is not None and not (isinstance(record["seeds"], list)
                                            and all(isinstance(s, int) for s in record["seeds"])):
        raise ValueError(f"{rid}: seeds must be a list of ints or null")
    for source in record_sources(record):
        if not (ROOT / source).exists():
            raise ValueError(f"{rid}: source {source!r} does not exist")
    metrics = record["metrics"]
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"{rid}: metrics must be a non-empty mapping")
    for name, value in metrics.items():
        if _is_number(value):
            continue
        if not isinstance(value, dict) or not _is_number(value.get("mean")):
            raise ValueError(f"{rid}: metric {name!r} must be a number or {{'mean': number, 'per_seed'|'per_run': ...}}")
        repeats = [k for k in REPEAT_KEYS if k in value]
        if len(repeats) != 1 or set(value) != {"mean", repeats[0]}:
            raise ValueError(f"{rid}: metric {name!r} needs 'mean' and exactly one of {REPEAT_KEYS}")
        per = value[repeats[0]]
        if not isinstance(per, dict) or not per or not all(_is_number(v) for v in per.values()):
            raise ValueError(f"{rid}: metric {name!r}: {repeats[0]} must map labels to numbers")


def record_sources(record: dict[str, Any]) -> list[str]:
    """The raw files behind a record (repository paths): none, one, or a list (e.g. one file per seed)."""
    source = record["source"]
    if source is None:
        return []
    sources = [source] if isinstance(source, str) else source
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
        raise ValueError(f"{record['id']}: source must be a repository path, a list of them, or null")
    return sources


def load_records(path: str | os.PathLike = REGISTRY) -> dict[str, dict[str, Any]]:
    """All records by id, in file order; a malformed line or a duplicate id is an error naming its line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"results registry {path} not found")
    records: dict[str, dict[str, Any]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
        validate_record(record, f"{path}:{lineno}")
        if record["id"] in records:
            raise ValueError(f"{path}:{lineno}: duplicate id {record['id']!r}")
        records[record["id"]] = record
    return records


def metric_mean(record: dict[str, Any], name: str) -> float:
    value = record["metrics"][name]
    return value if _is_number(value) else value["mean"]


def metric_repeats(record: dict[str, Any], name: str) -> list[float] | None:
    """The per-seed (per-run) values of a metric in label order, or None for a single figure."""
    value = record["metrics"][name]
    if _is_number(value):
        return None
    per = value.get("per_seed", value.get("per_run"))
    return [per[k] for k in sorted(per, key=lambda s: (len(s), s))]  # "2" before "10"


def repeated(values: dict[str, float], key: str = "per_seed") -> dict[str, Any]:
    """{"mean": ..., key: values}: the metric form for several seeds or runs."""
    return {"mean": sum(values.values()) / len(values), key: dict(values)}


def current_commit() -> str:
    """The checkout's short commit hash, '+dirty' when tracked files differ from it; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def make_record(*, id: str, kind: str, title: str, metrics: dict[str, Any], note: str, command: str | None = None,
                commit: str | None = None, date: str | None = None, dataset: str | None = None,
                split: str | None = None, users: int | str | None = None, model: str | None = None,
                config: str | None = None, seeds: list[int] | None = None, source: str | list[str] | None = None) -> dict[str, Any]:
    """A validated record; commit and date default to the current checkout and today (UTC)."""
    record = {
        "id": id, "kind": kind, "title": title, "command": command,
        "commit": commit or current_commit(),
        "date": date or datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "dataset": dataset, "split": split, "users": users, "model": model, "config": config, "seeds": seeds,
        "metrics": metrics, "source": source, "note": note,
    }
    validate_record(record, id)
    return record


def append_record(path: str | os.PathLike = REGISTRY, **fields: Any) -> dict[str, Any]:
    """Validate a record (make_record's fields) and add it to the registry; an existing id is refused (give
    the new measurement a new id, or delete the old record by hand if it is superseded). Written to a temp
    file and renamed, so a crash never leaves a half-written registry."""
    path = Path(path)
    record = make_record(**fields)
    existing = load_records(path) if path.exists() else {}
    if record["id"] in existing:
        raise ValueError(f"record id {record['id']!r} already exists in {path}")
    text = path.read_text() if path.exists() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + json.dumps(record, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return record
