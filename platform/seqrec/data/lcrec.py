"""LC-Rec JSON (`*.inter.json` {user: [item, ...]}, `*.item.json` {item: {title, description, brand,
categories}}) -> the prepared layout with a leave-one-out split."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from seqrec.data.dataset import SplitOptions, leave_one_out, split_tables, write_prepared
from seqrec.data.text import CALREC_WORD_LIMITS, clean_text, format_item_text
from seqrec.data.unisrec import MalformedLines, _find

log = logging.getLogger(__name__)

# LC-Rec joins category levels with ',' and no space; a ', ' inside a level name ("Tapes, Adhesives &
# Sealants") is part of the name.
_CATEGORY_SEP = re.compile(r",(?! )")


@dataclass
class LCRecOptions:
    max_len: int | None = None  # None keeps full sequences
    long_sequences: str = "trim"  # "trim" keeps the last max_len items, "filter" drops longer users
    calrec_truncation: bool = False
    min_eval_len: int = 3

    def __post_init__(self) -> None:
        if self.long_sequences not in ("trim", "filter"):
            raise ValueError("long_sequences must be 'trim' or 'filter'")


def split_categories(value: str) -> list[str]:
    return [c.strip() for c in _CATEGORY_SEP.split(value or "") if c.strip()]


def read_item_records(input_dir: str | Path, option: str = "LC-Rec directory") -> list[dict]:
    """The item records (`*.item.json` values: title, description, brand, categories) of an LC-Rec directory,
    for readers that match items by title (Flare's category paths and descriptions); `option` names the
    setting in the errors."""
    src = Path(input_dir)
    if not src.exists():
        raise FileNotFoundError(f"{option} {src} does not exist")
    try:
        raw = json.loads(_find(src, ".item.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{option} {src}: not valid LC-Rec JSON: {e}") from e
    return list(raw.values())


def apply_max_len(sequences: list[np.ndarray], max_len: int | None, mode: str) -> tuple[list[np.ndarray], list[bool], int]:
    """Trim to the last `max_len` items or mark longer users for removal. Returns (seqs, keep, n_affected)."""
    if not max_len:
        return sequences, [True] * len(sequences), 0
    affected = sum(len(s) > max_len for s in sequences)
    if mode == "trim":
        return [s[-max_len:] for s in sequences], [True] * len(sequences), affected
    return sequences, [len(s) <= max_len for s in sequences], affected


def prepare_lcrec(input_dir: str | Path, out_dir: str | Path, options: LCRecOptions | None = None, name: str | None = None) -> dict:
    options = options or LCRecOptions()
    input_dir = Path(input_dir)
    bad = MalformedLines()
    item_path, inter_path = _find(input_dir, ".item.json"), _find(input_dir, ".inter.json")
    try:
        raw_items = json.loads(item_path.read_text(encoding="utf-8"))
        raw_inter = json.loads(inter_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{input_dir}: not valid LC-Rec JSON: {e}") from e

    # Item keys are re-indexed densely in numeric order (LC-Rec's are already 0..n-1; this guards gaps).
    item_keys = []
    for key, value in raw_items.items():
        if not isinstance(value, dict) or not str(key).lstrip("-").isdigit():
            bad.add(item_path.name, 0, f"{key}: {str(value)[:100]}", "expected 'index': {title, ...}")
            continue
        item_keys.append(int(key))
    item_keys.sort()
    remap = {k: i for i, k in enumerate(item_keys)}

    users, sequences = [], []
    for user, seq in raw_inter.items():
        if not isinstance(seq, list) or not all(isinstance(x, int) and x in remap for x in seq) or not seq:
            bad.add(inter_path.name, 0, f"{user}: {str(seq)[:100]}", "expected a non-empty list of known item indices")
            continue
        users.append(str(user))
        sequences.append(np.asarray([remap[x] for x in seq], dtype=np.int32))
    sequences, keep, affected = apply_max_len(sequences, options.max_len, options.long_sequences)
    users = [u for u, k in zip(users, keep) if k]
    sequences = [s for s, k in zip(sequences, keep) if k]
    order = sorted(range(len(users)), key=lambda i: int(users[i]) if users[i].isdigit() else users[i])
    users = [users[i] for i in order]
    sequences = [sequences[i] for i in order]

    limits = CALREC_WORD_LIMITS if options.calrec_truncation else None
    cols = {k: [] for k in ("item_idx", "item_id", "title", "brand", "categories", "price", "description", "text")}
    for key in item_keys:
        info = raw_items[str(key)]
        title, brand = clean_text(info.get("title")), clean_text(info.get("brand"))
        categories = split_categories(clean_text(info.get("categories")))
        cols["item_idx"].append(remap[key])
        cols["item_id"].append(str(key))
        cols["title"].append(title)
        cols["brand"].append(brand)
        cols["categories"].append(categories)
        cols["price"].append(None)
        cols["description"].append(clean_text(info.get("description")))
        cols["text"].append(format_item_text(title, categories, brand, None, word_limits=limits))

    user_idx = np.arange(len(users), dtype=np.int32)
    seq_table = pa.table(
        {"user_idx": user_idx, "user_id": users, "items": sequences, "timestamps": pa.nulls(len(users), pa.list_(pa.int64()))}
    )
    splits = split_tables(leave_one_out(user_idx, sequences, SplitOptions(min_eval_len=options.min_eval_len)))
    report = {
        **bad.report(),
        "users_read": len(raw_inter),
        "items_read": len(raw_items),
        "long_sequences": {"mode": options.long_sequences, "max_len": options.max_len, "affected_users": affected},
        "users_kept": len(users),
        "items_with_empty_title": sum(not t for t in cols["title"]),
    }
    meta = {"source": "lcrec", "name": name or input_dir.name, "input": str(input_dir), "options": asdict(options), "seed": None, "report": report}
    write_prepared(out_dir, pa.table(cols), seq_table, splits, meta)
    return report
