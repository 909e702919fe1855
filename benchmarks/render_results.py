"""Render the results registry into README.md and docs/**/*.md.

A rendered block sits between markers in a Markdown file:

    <!-- results:TABLE_ID -->
    | ... the table, written by this script ... |
    <!-- /results:TABLE_ID -->

and an inline value the same way on one line (`<!-- results:ID -->85%<!-- /results:ID -->`). What each block
shows (which records, which columns, which format) is defined in benchmarks/results/tables.yaml; the
numbers come from benchmarks/results/registry.jsonl (benchmarks/results_registry.py). Rendering is
deterministic, so a second run changes nothing.

    python benchmarks/render_results.py            # rewrite every block in place
    python benchmarks/render_results.py --check    # exit 1 naming each block that differs (CI: no hand edits)
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_registry import REGISTRY, ROOT, load_records, metric_mean, metric_repeats  # noqa: E402

log = logging.getLogger("render_results")
TABLES = ROOT / "benchmarks" / "results" / "tables.yaml"
BLOCK = re.compile(r"<!-- results:(?P<id>[\w.-]+) -->(?P<body>.*?)<!-- /results:(?P=id) -->", re.DOTALL)
OPENING = re.compile(r"<!-- results:([\w.-]+) -->")
MISSING = "-"


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown file under docs/, in a fixed order."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def load_tables(path: Path = TABLES) -> dict[str, dict[str, Any]]:
    with open(path) as f:
        tables = yaml.safe_load(f) or {}
    if not isinstance(tables, dict):
        raise ValueError(f"{path}: top level must map table ids to definitions")
    for tid, spec in tables.items():
        kinds = [k for k in ("records", "select", "inline") if k in spec]
        if len(kinds) != 1:
            raise ValueError(f"{path}: table {tid!r} needs exactly one of records / select / inline")
        if "inline" not in spec and not spec.get("columns"):
            raise ValueError(f"{path}: table {tid!r} has no columns")
    return tables


def format_number(value: float, fmt: str) -> str:
    if fmt == "pct":
        return f"{100 * value:.0f}%"
    if fmt == "int":
        return f"{int(round(value)):,}"
    if fmt == "times":
        return f"{value:.1f}x"
    if fmt == "gain":  # a ratio shown as the relative change
        return f"{100 * (value - 1):+.1f}%"
    return format(value, fmt)


def format_field(value: Any, fmt: str | None) -> str:
    if value is None:
        return MISSING
    if isinstance(value, list):
        text = ", ".join(str(v) for v in value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and fmt not in (None, "code"):
        return format_number(value, fmt)
    else:
        text = str(value)
    return f"`{text}`" if fmt == "code" else text


def metric_cell(record: dict[str, Any], column: dict[str, Any]) -> str:
    names = column["metric"] if isinstance(column["metric"], list) else [column["metric"]]
    present = [n for n in names if n in record["metrics"]]  # a list: the first metric the record has
    if not present:
        return MISSING
    name = present[0]
    fmt = column.get("format", ".4f")
    mean = format_number(metric_mean(record, name), fmt)
    repeats = metric_repeats(record, name)
    if column.get("seeds") and repeats and len(repeats) > 1:
        values = " / ".join(format_number(v, fmt) for v in repeats)
        return values + f" ({mean})" if column.get("show_mean", True) else values
    return mean


def cell(record: dict[str, Any], column: dict[str, Any]) -> str:
    if "metric" in column:
        text = metric_cell(record, column)
    elif "field" in column:
        if column["field"] not in record:
            raise ValueError(f"column {column.get('header')!r}: records have no field {column['field']!r}")
        text = format_field(record[column["field"]], column.get("format"))
    elif "text" in column:  # a fixed per-record label from the table definition
        text = column["text"].get(record["id"], MISSING)
    else:
        raise ValueError(f"column {column.get('header')!r} needs metric, field or text")
    return text.replace("|", "\\|")


def table_records(tid: str, spec: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    if "records" in spec:
        unknown = [r for r in spec["records"] if r not in records]
        if unknown:
            raise ValueError(f"table {tid!r}: unknown record ids {unknown}")
        return [records[r] for r in spec["records"]]
    wanted = spec["select"]
    return [r for r in records.values() if all(r.get(k) == v for k, v in wanted.items())]


def render_table(tid: str, spec: dict[str, Any], records: dict[str, dict[str, Any]]) -> str:
    rows = table_records(tid, spec, records)
    if not rows:
        if "empty" not in spec:
            raise ValueError(f"table {tid!r} selects no records and defines no `empty` text")
        return spec["empty"]
    columns = spec["columns"]
    lines = ["| " + " | ".join(c["header"] for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def render_inline(tid: str, spec: dict[str, Any], records: dict[str, dict[str, Any]]) -> str:
    inline = spec["inline"]

    def value(ref: list[str]) -> float:
        rid, metric = ref
        if rid not in records or metric not in records[rid]["metrics"]:
            raise ValueError(f"inline {tid!r}: no metric {metric!r} in record {rid!r}")
        return metric_mean(records[rid], metric)

    fmt = inline.get("format", ".4f")
    if "ratio" in inline:  # [record, metric, record, metric]: the first over the second
        num, den = inline["ratio"][:2], inline["ratio"][2:]
        return format_number(value(num) / value(den), fmt)
    if "value" in inline:
        return format_number(value(inline["value"]), fmt)
    raise ValueError(f"inline {tid!r} needs ratio or value")


def render_block(tid: str, tables: dict[str, dict[str, Any]], records: dict[str, dict[str, Any]]) -> str:
    if tid not in tables:
        raise ValueError(f"no table {tid!r} in {TABLES.relative_to(ROOT)}")
    spec = tables[tid]
    if "inline" in spec:
        return render_inline(tid, spec, records)
    return "\n" + render_table(tid, spec, records) + "\n"


FENCE = re.compile(r"^```.*?^```[^\n]*$", re.DOTALL | re.MULTILINE)


def fenced_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of fenced code blocks: markers shown inside them are examples, not blocks to render."""
    return [m.span() for m in FENCE.finditer(text)]


def _outside(pos: int, spans: list[tuple[int, int]]) -> bool:
    return not any(a <= pos < b for a, b in spans)


def block_ids(text: str) -> list[str]:
    spans = fenced_spans(text)
    return [m.group("id") for m in BLOCK.finditer(text) if _outside(m.start(), spans)]


def render_text(text: str, tables: dict[str, dict[str, Any]], records: dict[str, dict[str, Any]],
                where: str = "") -> tuple[str, list[str]]:
    """The text with every block rendered, and the ids of the blocks whose content changed."""
    spans = fenced_spans(text)
    closed = set(block_ids(text))
    opened = {m.group(1) for m in OPENING.finditer(text) if _outside(m.start(), spans)}
    unclosed = sorted(opened - closed)
    if unclosed:
        raise ValueError(f"{where}: results markers opened but not closed: {unclosed}")
    changed: list[str] = []

    def replace(match: re.Match) -> str:
        if not _outside(match.start(), spans):
            return match.group(0)
        tid = match.group("id")
        body = render_block(tid, tables, records)
        if body != match.group("body"):
            changed.append(tid)
        return f"<!-- results:{tid} -->{body}<!-- /results:{tid} -->"

    return BLOCK.sub(replace, text), changed


def render_all(check: bool, root: Path = ROOT, tables_path: Path = TABLES, registry: Path = REGISTRY) -> int:
    tables = load_tables(tables_path)
    records = load_records(registry)
    stale: list[str] = []
    used: set[str] = set()
    for path in doc_files(root):
        if not path.exists():
            continue
        text = path.read_text()
        new, changed = render_text(text, tables, records, str(path.relative_to(root)))
        used.update(block_ids(text))
        rel = path.relative_to(root)
        stale += [f"{rel}: {tid}" for tid in changed]
        if changed and not check:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(new)
            os.replace(tmp, path)
            log.info("%s: rendered %s", rel, ", ".join(changed))
    for tid in sorted(set(tables) - used):
        log.warning("table %r is defined but no document shows it", tid)
    if check and stale:
        print("rendered results differ from the registry (run python benchmarks/render_results.py):")
        for line in stale:
            print(f"  {line}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any block differs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return render_all(args.check)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
