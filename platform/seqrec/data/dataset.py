"""The canonical on-disk dataset and its loader.

Layout of a prepared dataset directory (written by `seqrec data prepare` or `seqrec data demo`):

    items.parquet       item_idx, item_id, title, brand, categories (list), price, description, text
    sequences.parquet   user_idx, user_id, items (list, chronological), timestamps (list or null)
    splits/train.parquet  user_idx, items        (each user's training sequence)
    splits/valid.parquet  user_idx, history, target
    splits/test.parquet   user_idx, history, target
    meta.json           source, counts, options, seed, pipeline version, report of dropped/malformed rows

Item and user indices are dense and 0-based. `text` is the key: value item text from
`seqrec.data.text.format_item_text`; every text model and the BM25 corpus read it from here.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

PIPELINE_VERSION = "1"

ITEM_SCHEMA = pa.schema(
    [
        ("item_idx", pa.int32()),
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("brand", pa.string()),
        ("categories", pa.list_(pa.string())),
        ("price", pa.string()),
        ("description", pa.string()),
        ("text", pa.string()),
    ]
)
SEQUENCE_SCHEMA = pa.schema(
    [
        ("user_idx", pa.int32()),
        ("user_id", pa.string()),
        ("items", pa.list_(pa.int32())),
        ("timestamps", pa.list_(pa.int64())),
    ]
)
TRAIN_SCHEMA = pa.schema([("user_idx", pa.int32()), ("items", pa.list_(pa.int32()))])
EVAL_SCHEMA = pa.schema(
    [("user_idx", pa.int32()), ("history", pa.list_(pa.int32())), ("target", pa.int32())]
)
SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class SplitOptions:
    """How sequences become leave-one-out splits."""

    min_eval_len: int = 3  # users with fewer items are training-only (Recformer uses 4)

    def __post_init__(self) -> None:
        if self.min_eval_len < 3:
            raise ValueError("min_eval_len must be >= 3 (a valid and a test target plus one history item)")


def leave_one_out(
    user_idx: np.ndarray, sequences: list[np.ndarray], options: SplitOptions
) -> dict[str, dict[str, list]]:
    """Last item = test target, penultimate = valid target, the rest = training sequence.

    Works on one batch of users, so it runs inside Ray Data `map_batches` as well as in-process.
    Users shorter than `options.min_eval_len` keep their whole sequence for training and get no eval rows.
    """
    out = {
        "train": {"user_idx": [], "items": []},
        "valid": {"user_idx": [], "history": [], "target": []},
        "test": {"user_idx": [], "history": [], "target": []},
    }
    for user, seq in zip(user_idx, sequences):
        seq = np.asarray(seq, dtype=np.int32)
        if len(seq) < options.min_eval_len:
            out["train"]["user_idx"].append(int(user))
            out["train"]["items"].append(seq)
            continue
        out["train"]["user_idx"].append(int(user))
        out["train"]["items"].append(seq[:-2])
        out["valid"]["user_idx"].append(int(user))
        out["valid"]["history"].append(seq[:-2])
        out["valid"]["target"].append(int(seq[-2]))
        out["test"]["user_idx"].append(int(user))
        out["test"]["history"].append(seq[:-1])
        out["test"]["target"].append(int(seq[-1]))
    return out


def split_tables(splits: dict[str, dict[str, list]]) -> dict[str, pa.Table]:
    tables = {"train": pa.table(splits["train"], schema=TRAIN_SCHEMA)}
    for name in ("valid", "test"):
        tables[name] = pa.table(splits[name], schema=EVAL_SCHEMA)
    return tables


def _atomic_write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def write_prepared(
    out_dir: str | os.PathLike,
    items: pa.Table,
    sequences: pa.Table,
    splits: dict[str, pa.Table],
    meta: dict[str, Any],
) -> Path:
    """Validate and write a prepared dataset. Each file goes to a temp name first, then is renamed."""
    out = Path(out_dir)
    items = items.select(ITEM_SCHEMA.names).cast(ITEM_SCHEMA)
    sequences = sequences.select(SEQUENCE_SCHEMA.names).cast(SEQUENCE_SCHEMA)
    n_items = items.num_rows
    idx = items.column("item_idx").to_numpy()
    if not np.array_equal(np.sort(idx), np.arange(n_items)):
        raise ValueError("items.item_idx must be a dense 0..n_items-1 range")
    items = items.sort_by("item_idx")
    sequences = sequences.sort_by("user_idx")
    for name, table in splits.items():
        col = "items" if name == "train" else "history"
        flat = table.column(col).combine_chunks().flatten().to_numpy() if table.num_rows else np.zeros(0)
        if flat.size and (flat.min() < 0 or flat.max() >= n_items):
            raise ValueError(f"split {name} references item indices outside 0..{n_items - 1}")
    _atomic_write_parquet(items, out / "items.parquet")
    _atomic_write_parquet(sequences, out / "sequences.parquet")
    for name in SPLIT_NAMES:
        schema = TRAIN_SCHEMA if name == "train" else EVAL_SCHEMA
        _atomic_write_parquet(splits[name].select(schema.names).cast(schema), out / "splits" / f"{name}.parquet")
    lengths = np.diff(sequences.column("items").combine_chunks().offsets.to_numpy())
    meta = dict(meta)
    meta.setdefault("pipeline_version", PIPELINE_VERSION)
    meta["counts"] = {
        "users": int(sequences.num_rows),
        "items": int(n_items),
        "interactions": int(lengths.sum()),
        **{f"{name}_rows": int(splits[name].num_rows) for name in SPLIT_NAMES},
    }
    atomic_write_json(meta, out / "meta.json")
    log.info("wrote prepared dataset to %s: %s", out, meta["counts"])
    return out


def _list_column(table: pa.Table, name: str) -> list[np.ndarray]:
    """A list<int32> column as a list of numpy arrays, without a Python loop over elements."""
    col = table.column(name).combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


@dataclass
class EvalRows:
    """Rows to evaluate: histories (chronological item indices), targets and user indices."""

    user_idx: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: np.ndarray | slice) -> "EvalRows":
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        return EvalRows(self.user_idx[index], [self.histories[i] for i in index], self.targets[index])


@dataclass
class PreparedDataset:
    """A prepared dataset loaded from disk. Cheap to construct; tables load lazily."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    _cache: dict[str, pa.Table] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PreparedDataset":
        """`path`: the dataset directory, file:// URI of one, or an s3:// / gs:// URI (copied once into this
        node's cache by seqrec.storage.local_copy: each node of a cluster reads its own copy)."""
        from seqrec.storage import local_copy

        path = local_copy(path, "datasets")
        meta_path = path / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"{path} is not a prepared seqrec dataset (no meta.json); run `seqrec data prepare` first"
            )
        return cls(path=path, meta=json.loads(meta_path.read_text()))

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.path.name

    def _table(self, rel: str) -> pa.Table:
        if rel not in self._cache:
            self._cache[rel] = pq.read_table(self.path / rel)
        return self._cache[rel]

    @property
    def items(self) -> pa.Table:
        return self._table("items.parquet")

    @property
    def sequences(self) -> pa.Table:
        return self._table("sequences.parquet")

    def split(self, name: str) -> pa.Table:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        return self._table(f"splits/{name}.parquet")

    @property
    def n_items(self) -> int:
        return int(self.meta["counts"]["items"])

    @property
    def n_users(self) -> int:
        return int(self.meta["counts"]["users"])

    def item_texts(self) -> list[str]:
        return self.items.column("text").to_pylist()

    def item_attributes(self) -> list[dict[str, str]]:
        """Per item (item_idx order) its attributes as strings: title, brand, category (the path joined with
        ' > ', most general first), price and description; '' where missing (Recformer's attribute dicts)."""
        from seqrec.data.text import clean_text, format_price

        n = self.items.num_rows
        cols = {c: self.items.column(c).to_pylist() if c in self.items.column_names else [None] * n
                for c in ("title", "brand", "categories", "price", "description")}
        out = []
        for i in range(n):
            cats = cols["categories"][i] or []
            category = clean_text(cats) if isinstance(cats, str) else " > ".join(clean_text(c) for c in cats if c)
            out.append({"title": clean_text(cols["title"][i]), "brand": clean_text(cols["brand"][i]),
                        "category": category, "price": format_price(cols["price"][i]),
                        "description": clean_text(cols["description"][i])})
        return out

    def item_ids(self) -> list[str]:
        return self.items.column("item_id").to_pylist()

    def train_sequences(self) -> list[np.ndarray]:
        return _list_column(self.split("train"), "items")

    def full_sequences(self) -> list[np.ndarray]:
        return _list_column(self.sequences, "items")

    def eval_rows(self, name: str) -> EvalRows:
        table = self.split(name)
        return EvalRows(
            user_idx=table.column("user_idx").to_numpy().astype(np.int64),
            histories=_list_column(table, "history"),
            targets=table.column("target").to_numpy().astype(np.int64),
        )

    def train_item_counts(self) -> np.ndarray:
        """Occurrences of each item in the training sequences (MostPop's scores)."""
        col = self.split("train").column("items").combine_chunks().values.to_numpy()
        return np.bincount(col, minlength=self.n_items).astype(np.float64)

    def iter_train_batches(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        yield from self.split("train").to_batches(max_chunksize=batch_size)


def refit_dataset(dataset: PreparedDataset, out_dir: str | os.PathLike) -> PreparedDataset:
    """The refit protocol's copy of `dataset` (train.fit_on "train+valid"): the same catalog, sequences and
    valid/test rows, with each evaluated user's validation target appended to their training sequence (which
    makes it their test history). The test rows are untouched, so test metrics stay comparable; validation rows
    are now training data and must not be used for selection. Written once (meta.json last); the frozen-encoder
    feature cache is shared with the source through a `features` symlink (it is keyed by text)."""
    out = Path(out_dir)
    source = str(Path(dataset.path).resolve())
    if (out / "meta.json").exists():
        existing = PreparedDataset.load(out)
        if existing.meta.get("refit_of") == source and existing.meta.get("source_counts") == dataset.meta["counts"]:
            return existing
    valid = dataset.eval_rows("valid")
    valid_target = dict(zip(valid.user_idx.tolist(), valid.targets.tolist()))
    valid_history = dict(zip(valid.user_idx.tolist(), valid.histories))
    train = dataset.split("train")
    users = train.column("user_idx").to_numpy().tolist()
    seqs = _list_column(train, "items")
    rows = {u: s for u, s in zip(users, seqs)}
    for u, target in valid_target.items():  # a valid user without a training row trains on history + target
        rows[u] = np.append(rows.get(u, valid_history[u]), target)
    order = sorted(rows)
    refit_train = pa.table({"user_idx": pa.array(order, pa.int32()),
                            "items": pa.array([rows[u].astype(np.int32) for u in order], pa.list_(pa.int32()))})
    meta = {k: v for k, v in dataset.meta.items() if k != "counts"}
    meta.update(name=f"{dataset.name}+valid", refit_of=source, source_counts=dataset.meta["counts"],
                fit_on="train+valid")
    features = Path(source) / "features"
    features.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "features").exists():
        os.symlink(features, out / "features", target_is_directory=True)
    write_prepared(out, dataset.items, dataset.sequences,
                   {"train": refit_train, "valid": dataset.split("valid"), "test": dataset.split("test")}, meta)
    log.info("refit dataset %s: %d validation targets moved into training", out, len(valid_target))
    return PreparedDataset.load(out)
