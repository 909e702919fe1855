"""RecBole / UniSRec atomic files -> the prepared layout, keeping the source split exactly.

Files: <name>.text (ASIN, "title. category path. brand. "), <name>.{train,valid,test}.inter (user, history of
<= 50 item indices, target), <name>.item2index, <name>.user2index. Valid and test rows are copied verbatim so
numbers stay comparable with RecBole and UniSRec. Full sequences are rebuilt as: the shortest training
history + the training targets in order + the valid target + the test target; the rebuilt sequence is checked
against the test row and disagreements are counted in the report.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from seqrec.data.dataset import EVAL_SCHEMA, TRAIN_SCHEMA, write_prepared
from seqrec.data.text import format_item_text

log = logging.getLogger(__name__)


class MalformedLines:
    """Counts malformed input lines per file and keeps a few examples for the report."""

    def __init__(self, sample_size: int = 5):
        self.counts: dict[str, int] = defaultdict(int)
        self.samples: list[dict] = []
        self.sample_size = sample_size

    def add(self, file: str, line_no: int, line: str, reason: str) -> None:
        self.counts[file] += 1
        if len(self.samples) < self.sample_size:
            self.samples.append({"file": file, "line": line_no, "reason": reason, "text": line[:200]})

    def report(self) -> dict:
        return {"malformed_lines": dict(self.counts), "malformed_total": sum(self.counts.values()), "malformed_sample": self.samples}


def _find(input_dir: Path, suffix: str) -> Path:
    matches = sorted(input_dir.glob(f"*{suffix}"))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected exactly one *{suffix} in {input_dir}, found {[m.name for m in matches]}")
    return matches[0]


def _read_index(path: Path, bad: MalformedLines) -> dict[str, int]:
    out = {}
    for no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
            bad.add(path.name, no, line, "expected 'id<TAB>index'")
            continue
        out[parts[0]] = int(parts[1])
    return out


def _read_inter(path: Path, n_items: int, bad: MalformedLines) -> list[tuple[int, np.ndarray, int]]:
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for no, line in enumerate(lines, 1):
        if no == 1 and line.startswith("user_id"):
            continue
        parts = line.split("\t")
        try:
            if len(parts) != 3:
                raise ValueError("expected 3 tab-separated fields")
            history = np.array([int(x) for x in parts[1].split()], dtype=np.int32)
            user, target = int(parts[0]), int(parts[2])
            if not (0 <= target < n_items) or (len(history) and (history.min() < 0 or history.max() >= n_items)):
                raise ValueError("item index out of range")
        except ValueError as e:
            bad.add(path.name, no, line, str(e))
            continue
        rows.append((user, history, target))
    return rows


def split_unisrec_text(text: str) -> tuple[str, str, str]:
    """'title. category path. brand. ' -> (title, category path, brand). Titles may contain '. '."""
    body = text.strip()
    if body.endswith("."):
        body = body[:-1]
    parts = body.rsplit(". ", 2)
    while len(parts) < 3:
        parts.append("")
    return parts[0].strip(), parts[1].strip(), parts[2].strip()


def prepare_unisrec(input_dir: str | Path, out_dir: str | Path, name: str | None = None) -> dict:
    input_dir = Path(input_dir)
    bad = MalformedLines()
    item2index = _read_index(_find(input_dir, ".item2index"), bad)
    user2index = _read_index(_find(input_dir, ".user2index"), bad)
    n_items, n_users = len(item2index), len(user2index)
    if sorted(item2index.values()) != list(range(n_items)):
        raise ValueError("item2index is not a dense 0-based index")

    text_path = _find(input_dir, ".text")
    texts: dict[int, str] = {}
    for no, line in enumerate(text_path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if no == 1 and line.startswith("item_id"):
            continue
        parts = line.split("\t", 1)
        if len(parts) != 2 or parts[0] not in item2index:
            bad.add(text_path.name, no, line, "expected 'ASIN<TAB>text' with a known ASIN")
            continue
        texts[item2index[parts[0]]] = parts[1]

    inter = {s: _read_inter(_find(input_dir, f".{s}.inter"), n_items, bad) for s in ("train", "valid", "test")}

    # rebuild each user's full chronological sequence
    train_by_user: dict[int, list[tuple[np.ndarray, int]]] = defaultdict(list)
    for position, (user, history, target) in enumerate(inter["train"]):
        train_by_user[user].append((history, target, position))
    valid = {u: (h, t) for u, h, t in inter["valid"]}
    test = {u: (h, t) for u, h, t in inter["test"]}
    users = sorted(set(valid) | set(test) | set(train_by_user))
    sequences, train_items, mismatched = {}, {}, 0
    for user in users:
        # Prefixes are listed newest first; histories are capped at 50 items, so rows of equal (capped)
        # length are ordered by file position, reversed.
        rows = sorted(train_by_user.get(user, []), key=lambda r: (len(r[0]), -r[2]))
        if rows:
            seq = list(rows[0][0]) + [t for _, t, _ in rows]
        elif user in valid:
            seq = list(valid[user][0])
        else:
            seq = list(test[user][0])[:-1]
        train_items[user] = np.asarray(seq, dtype=np.int32)
        if user in valid:
            seq.append(valid[user][1])
        if user in test:
            seq.append(test[user][1])
            history = test[user][0]
            if not np.array_equal(np.asarray(seq[:-1][-len(history):] if len(history) else [], dtype=np.int32), history):
                mismatched += 1
        sequences[user] = np.asarray(seq, dtype=np.int32)

    index2user = {v: k for k, v in user2index.items()}
    items_cols = {"item_idx": [], "item_id": [], "title": [], "brand": [], "categories": [], "price": [], "description": [], "text": []}
    index2item = {v: k for k, v in item2index.items()}
    missing_text = 0
    for idx in range(n_items):
        raw = texts.get(idx, "")
        missing_text += not raw
        title, category, brand = split_unisrec_text(raw)
        items_cols["item_idx"].append(idx)
        items_cols["item_id"].append(index2item[idx])
        items_cols["title"].append(title)
        items_cols["brand"].append(brand)
        # UniSRec joins the category path with spaces, so the levels cannot be recovered: keep it whole.
        items_cols["categories"].append([category] if category else [])
        items_cols["price"].append(None)
        items_cols["description"].append("")
        items_cols["text"].append(format_item_text(title, category, brand, None))

    seq_users = np.asarray(users, dtype=np.int32)
    sequences_table = pa.table(
        {
            "user_idx": seq_users,
            "user_id": [index2user.get(u, str(u)) for u in users],
            "items": [sequences[u] for u in users],
            "timestamps": pa.nulls(len(users), pa.list_(pa.int64())),
        }
    )
    splits = {
        "train": pa.table({"user_idx": seq_users, "items": [train_items[u] for u in users]}, schema=TRAIN_SCHEMA),
        "valid": pa.table(
            {"user_idx": [u for u, _, _ in inter["valid"]], "history": [h for _, h, _ in inter["valid"]], "target": [t for _, _, t in inter["valid"]]},
            schema=EVAL_SCHEMA,
        ),
        "test": pa.table(
            {"user_idx": [u for u, _, _ in inter["test"]], "history": [h for _, h, _ in inter["test"]], "target": [t for _, _, t in inter["test"]]},
            schema=EVAL_SCHEMA,
        ),
    }
    report = {
        **bad.report(),
        "source_rows": {s: len(r) for s, r in inter.items()},
        "items_without_text": missing_text,
        "rebuilt_sequences_disagreeing_with_test_history": mismatched,
        "users_in_user2index": n_users,
    }
    meta = {"source": "unisrec", "name": name or input_dir.name, "input": str(input_dir), "options": {}, "seed": None, "report": report}
    write_prepared(out_dir, pa.table(items_cols), sequences_table, splits, meta)
    if report["malformed_total"]:
        log.warning("skipped %d malformed lines, e.g. %s", report["malformed_total"], report["malformed_sample"][:2])
    return report
