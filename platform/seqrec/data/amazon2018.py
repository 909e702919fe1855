"""Amazon Review Data (2018) raw files -> the prepared layout (`seqrec.data.dataset`), on Ray Data.

Inputs are the JSON-lines files as distributed (gz or plain): reviews (`{Category}_5.json.gz` or a full
review file) and metadata (`meta_{Category}.json.gz`).

Pipeline (every step over review rows runs in Ray Data tasks, so it runs unchanged on a multi-node cluster;
only per-item / per-user sized results come back to the driver, each marked where it happens):

1. Read raw lines with `JsonLinesTextDatasource` (a `FileBasedDatasource`: streaming gzip decompression,
   split on b"\\n" only, bytes never decoded at read time) and parse them in `map_batches`. A line that is
   not JSON (including invalid UTF-8 / binary junk), not an object, lacks reviewerID/asin, or has a
   missing/non-numeric unixReviewTime is counted as malformed by reason, and a small sample is kept;
   blank lines are counted separately (`blank_lines`) and are not malformed.
2. Group users (into hash buckets of users, `groupby(bucket).map_groups`) and sort each user's events by
   (unixReviewTime, asin), ties further broken by rating, review-text hash, file and line number, so the
   order never depends on file layout or sharding. CALRec dedup: an event identical to an earlier event of
   the same user in asin, rating, review text and timestamp is dropped (identical events are adjacent in
   that order, so this is "identical to the previous one"); re-purchases at other times stay.
   Each user becomes one row (items, timestamps).
3. Metadata: parse, keep only lines for items that occur in the reviews, dedupe duplicate ASIN lines
   deterministically (a line whose own title is usable first, then the earliest file/line), clean the text
   fields and compute the item text. Titles that clean to nothing (the 2018 meta has many HTML fragments
   like `<span class="a-size-medium a-color-secondary"`) fall back to the first sentence of the description
   (at most 20 words), then to brand + last category; the source of each title is reported.
4. Optionally drop items without a usable title (before the k-core, so the k-core still holds).
5. Iterative k-core (items with < min_item_count interactions and users with < min_user_count are removed,
   repeated until stable); rows/users/items are reported for each round.
6. max_len: "trim" keeps each user's last max_len items, "filter" drops users longer than max_len.
7. Dense indices (item_idx by sorted ASIN, user_idx by sorted reviewerID), leave-one-out split, written
   with `write_prepared`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seqrec.data.dataset import SplitOptions, leave_one_out, split_tables, write_prepared
from seqrec.data.text import (
    CALREC_WORD_LIMITS,
    clean_text,
    format_item_text,
    is_usable_title,
    join_nonempty,
    truncate_words,
)

log = logging.getLogger(__name__)

SOURCE = "amazon2018"
LONG_SEQUENCE_MODES = ("trim", "filter")

# Line status codes (int8 column `error`).
OK, BLANK, BAD_JSON, NOT_OBJECT, MISSING_ID, BAD_TIME, UNMATCHED = range(7)
STATUS_NAMES = {
    OK: "ok",
    BLANK: "blank",
    BAD_JSON: "bad_json",
    NOT_OBJECT: "not_object",
    MISSING_ID: "missing_id",
    BAD_TIME: "bad_time",
    UNMATCHED: "unmatched",
}
MALFORMED_CODES = (BAD_JSON, NOT_OBJECT, MISSING_ID, BAD_TIME)
RAW_SAMPLE_CHARS = 200
FALLBACK_TITLE_WORDS = 20
TITLE_SOURCES = ("title", "description", "brand_category", "none")
ROWS_PER_PARTITION = 250_000

LINE_SCHEMA = pa.schema([("line", pa.binary()), ("src", pa.int32()), ("lineno", pa.int64())])
EVENT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("ts", pa.int64()),
        ("rating", pa.float64()),
        ("text_hash", pa.int64()),
        ("src", pa.int32()),
        ("lineno", pa.int64()),
        ("error", pa.int8()),
        ("raw", pa.string()),
    ]
)
USER_ROW_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("items", pa.list_(pa.string())),
        ("timestamps", pa.list_(pa.int64())),
        ("n", pa.int32()),
        ("n_dups", pa.int32()),
        ("cut", pa.int32()),
    ]
)
META_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("brand", pa.string()),
        ("categories", pa.list_(pa.string())),
        ("price", pa.string()),
        ("description", pa.string()),
        ("text", pa.string()),
        ("title_source", pa.string()),
        ("price_invalid", pa.bool_()),
        ("priority", pa.int8()),
        ("src", pa.int32()),
        ("lineno", pa.int64()),
        ("error", pa.int8()),
        ("raw", pa.string()),
    ]
)
SUMMARY_SCHEMA = pa.schema(
    [
        ("error", pa.int8()),
        ("count", pa.int64()),
        ("src", pa.int32()),
        ("lineno", pa.int64()),
        ("raw", pa.string()),
    ]
)


@dataclass
class Amazon2018Options:
    min_user_count: int = 5  # iterative k-core, users
    min_item_count: int = 5  # iterative k-core, items
    max_len: int | None = None  # None: keep full sequences
    long_sequences: str = "trim"  # "trim": keep the last max_len items; "filter": drop users longer than max_len
    drop_missing_title: bool = False  # drop items without a usable title (after cleaning and fallbacks)
    dedup: bool = True  # CALRec dedup of events identical in item, rating, review text and timestamp
    calrec_truncation: bool = False  # per-field word truncation of the item text (text.CALREC_WORD_LIMITS)
    min_eval_len: int = 3  # passed to SplitOptions (Recformer uses 4)
    seed: int = 0
    malformed_sample: int = 5  # how many malformed lines to keep as a sample in the report

    def __post_init__(self) -> None:
        if self.long_sequences not in LONG_SEQUENCE_MODES:
            raise ValueError(f"long_sequences must be one of {LONG_SEQUENCE_MODES}, got {self.long_sequences!r}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError("max_len must be >= 1 or None")
        if self.min_user_count < 0 or self.min_item_count < 0:
            raise ValueError("min_user_count and min_item_count must be >= 0")
        if self.malformed_sample < 0:
            raise ValueError("malformed_sample must be >= 0")
        SplitOptions(min_eval_len=self.min_eval_len)  # validates

    @property
    def word_limits(self) -> dict[str, int] | None:
        return dict(CALREC_WORD_LIMITS) if self.calrec_truncation else None


# ----------------------------------------------------------------------------------------------------------
# Finding files
# ----------------------------------------------------------------------------------------------------------

_JSON_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")


def _strip_json_suffix(name: str) -> str | None:
    for suffix in sorted(_JSON_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def find_raw_files(input_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(review files, meta files) in `input_dir`, each sorted by name.

    Meta files are `meta_*.json[.gz]`. Review files are the 5-core `*_5.json[.gz]` files when there are any;
    otherwise every other `*.json[l][.gz]` file (e.g. a full `{Category}.json.gz` review file).
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"raw data directory {input_dir} does not exist")
    meta, five_core, other = [], [], []
    for path in sorted(input_dir.iterdir()):
        stem = _strip_json_suffix(path.name)
        if not path.is_file() or stem is None or path.name.startswith("."):
            continue
        if stem.startswith("meta_"):
            meta.append(path)
        elif stem.endswith("_5"):
            five_core.append(path)
        else:
            other.append(path)
    reviews = five_core or other
    if not reviews:
        raise FileNotFoundError(
            f"no Amazon 2018 review files (*_5.json.gz or *.json[.gz]) in {input_dir}; "
            "run `seqrec data download` first"
        )
    return reviews, meta


def _as_file_list(spec: str | Path | Sequence[str | Path] | None, kind: str) -> list[Path]:
    if spec is None:
        return []
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: list[Path] = []
    for item in specs:
        path = Path(item)
        if path.is_dir():
            reviews, meta = find_raw_files(path) if kind == "reviews" else ([], [])
            if kind == "meta":
                meta = [p for p in sorted(path.iterdir()) if p.is_file() and p.name.startswith("meta_")
                        and _strip_json_suffix(p.name) is not None]
            files.extend(reviews if kind == "reviews" else meta)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{kind} file {path} does not exist")
    return files


def _dataset_name(review_files: Sequence[Path]) -> str:
    names = []
    for path in review_files:
        stem = _strip_json_suffix(path.name) or path.stem
        if stem.endswith("_5"):
            stem = stem[:-2]
        if stem not in names:
            names.append(stem)
    return "+".join(names)


# ----------------------------------------------------------------------------------------------------------
# Reading raw lines
# ----------------------------------------------------------------------------------------------------------


def _lines_table(data: bytes, src: int, first_lineno: int) -> pa.Table:
    """All lines in `data` (which ends at a line end, or at end of file) as one binary column, zero-copy."""
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10) + 1
    if len(ends) == 0 or ends[-1] != len(buf):
        ends = np.append(ends, len(buf))
    offsets = np.concatenate([[0], ends]).astype(np.int32)
    n = len(ends)
    lines = pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    return pa.table(
        [lines, pa.array(np.full(n, src, np.int32)), pa.array(np.arange(first_lineno, first_lineno + n))],
        schema=LINE_SCHEMA,
    )


def _make_datasource_class():
    from ray.data.datasource import FileBasedDatasource

    class JsonLinesTextDatasource(FileBasedDatasource):
        """Raw lines of JSON-lines files (gz by extension, or plain) as bytes, plus file index and line number.

        Unlike `ray.data.read_text` it streams each file in chunks instead of reading it whole, splits on
        b"\\n" only (str.splitlines would also split inside JSON strings at U+2028, \\x85, ...), and does
        not decode, so invalid UTF-8 becomes a malformed line at parse time instead of failing the read.
        """

        def __init__(self, paths, chunk_bytes: int = 16 << 20, **kwargs):
            super().__init__(paths, **kwargs)
            self._chunk_bytes = int(chunk_bytes)
            self._file_index = {p: i for i, p in enumerate(self._paths())}

        def file_paths(self) -> list[str]:
            return list(self._paths())

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            src = self._file_index.get(path, -1)
            lineno = 1
            rest = b""
            while True:
                chunk = f.read(self._chunk_bytes)
                if not chunk:
                    break
                data = rest + bytes(chunk)
                cut = data.rfind(b"\n")
                if cut < 0:
                    rest = data
                    continue
                rest = data[cut + 1 :]
                table = _lines_table(data[: cut + 1], src, lineno)
                lineno += table.num_rows
                yield table
            if rest:
                yield _lines_table(rest, src, lineno)

    return JsonLinesTextDatasource


_DATASOURCE_CLASS = None


def json_lines_datasource(paths: Sequence[str | Path], **kwargs):
    """A `JsonLinesTextDatasource` over `paths` (for `ray.data.read_datasource`)."""
    global _DATASOURCE_CLASS
    if _DATASOURCE_CLASS is None:
        _DATASOURCE_CLASS = _make_datasource_class()
    return _DATASOURCE_CLASS([str(Path(p).resolve()) for p in paths], **kwargs)


def iter_raw_lines(path: str | Path) -> Iterator[bytes]:
    """Lines of one raw file, in-process (used by the single-process baseline in benchmarks/)."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from f


# ----------------------------------------------------------------------------------------------------------
# Parsing one line (shared with the single-process baseline so both apply exactly the same rules)
# ----------------------------------------------------------------------------------------------------------


def _load_object(raw: bytes) -> tuple[int, Any]:
    stripped = raw.strip()
    if not stripped:
        return BLANK, None
    try:
        obj = json.loads(stripped)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return BAD_JSON, None
    if not isinstance(obj, dict):
        return NOT_OBJECT, None
    return OK, obj


def _as_id(value: Any) -> str | None:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return None


def _as_time(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int):
        return value if abs(value) < 2**62 else None
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and abs(value) < 2**62 else None
    return None


def _as_rating(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def text_hash(text: Any) -> int:
    """A stable 64-bit hash of the review text (stands in for the text in the dedup comparison)."""
    if text is None:
        text = ""
    elif not isinstance(text, str):
        text = json.dumps(text, sort_keys=True)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def parse_review_line(raw: bytes) -> tuple[int, str | None, str | None, int | None, float | None, int]:
    """(status, reviewerID, asin, unixReviewTime, overall, review-text hash) of one raw review line."""
    status, obj = _load_object(raw)
    if status != OK:
        return status, None, None, None, None, 0
    user, item = _as_id(obj.get("reviewerID")), _as_id(obj.get("asin"))
    if user is None or item is None:
        return MISSING_ID, None, None, None, None, 0
    ts = _as_time(obj.get("unixReviewTime"))
    if ts is None:
        return BAD_TIME, None, None, None, None, 0
    return OK, user, item, ts, _as_rating(obj.get("overall")), text_hash(obj.get("reviewText"))


def _raw_sample(raw: bytes) -> str:
    return raw[: RAW_SAMPLE_CHARS * 4].decode("utf-8", "replace").rstrip("\r\n")[:RAW_SAMPLE_CHARS]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PRICE = re.compile(r"^\$?\s?\d[\d,]*(\.\d+)?(\s*-\s*\$?\s?\d[\d,]*(\.\d+)?)?$")


def _categories(obj: dict) -> list[str]:
    cats = obj.get("category")
    if cats is None:  # older dumps: "categories": [[path], ...]
        legacy = obj.get("categories")
        if isinstance(legacy, list) and legacy and isinstance(legacy[0], list):
            cats = legacy[0]
        else:
            cats = legacy
    if isinstance(cats, str):
        cats = [cats]
    if not isinstance(cats, list):
        return []
    out = []
    for cat in cats:
        if isinstance(cat, (str, int, float)) and not isinstance(cat, bool):
            cleaned = clean_text(cat)
            if cleaned:
                out.append(cleaned)
    return out


def fallback_title(description: str, brand: str, categories: Sequence[str]) -> tuple[str, str]:
    """(title, source) for an item whose own title is unusable: first sentence of the description (at most
    FALLBACK_TITLE_WORDS words), else brand + last category, else ('', 'none')."""
    if description:
        first = truncate_words(_SENTENCE_END.split(description, 1)[0], FALLBACK_TITLE_WORDS)
        if is_usable_title(first):
            return first, "description"
    candidate = join_nonempty([brand, categories[-1] if categories else ""])
    if is_usable_title(candidate):
        return candidate, "brand_category"
    return "", "none"


def meta_record(obj: dict, word_limits: dict[str, int] | None) -> dict[str, Any]:
    """Cleaned item fields of one parsed meta line (asin already validated)."""
    raw_title = obj.get("title")
    title = clean_text(raw_title) if isinstance(raw_title, (str, list)) else ""
    brand = clean_text(obj.get("brand")) if isinstance(obj.get("brand"), str) else ""
    categories = _categories(obj)
    raw_price = obj.get("price")
    price = clean_text(raw_price) if isinstance(raw_price, (str, int, float)) and not isinstance(raw_price, bool) else ""
    price_invalid = bool(price) and not _PRICE.match(price)
    if price_invalid:  # e.g. CSS/JS blobs scraped into the price field
        price = ""
    description = obj.get("description")
    description = clean_text(description) if isinstance(description, (str, list)) else ""
    if is_usable_title(title):
        source, priority = "title", 0
    else:
        title, source = fallback_title(description, brand, categories)
        priority = 1 if source != "none" else 2
    return {
        "item_id": _as_id(obj.get("asin")),
        "title": title,
        "brand": brand,
        "categories": categories,
        "price": price,
        "description": description,
        "text": format_item_text(title, categories, brand, price, word_limits=word_limits),
        "title_source": source,
        "price_invalid": price_invalid,
        "priority": priority,
    }


def empty_item_record(item_id: str, word_limits: dict[str, int] | None) -> dict[str, Any]:
    """Fields of a review item that has no meta line."""
    return {
        "item_id": item_id,
        "title": "",
        "brand": "",
        "categories": [],
        "price": "",
        "description": "",
        "text": format_item_text("", [], "", "", word_limits=word_limits),
        "title_source": "none",
        "price_invalid": False,
        "priority": 3,
    }


# ----------------------------------------------------------------------------------------------------------
# Batch functions (run in Ray Data tasks; module-level so they pickle by reference)
# ----------------------------------------------------------------------------------------------------------


def _parse_reviews_block(batch: pa.Table) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in EVENT_SCHEMA.names}
    for raw, src, lineno in zip(
        batch.column("line").to_pylist(), batch.column("src").to_pylist(), batch.column("lineno").to_pylist()
    ):
        status, user, item, ts, rating, thash = parse_review_line(raw)
        cols["user_id"].append(user)
        cols["item_id"].append(item)
        cols["ts"].append(ts)
        cols["rating"].append(rating)
        cols["text_hash"].append(thash)
        cols["src"].append(src)
        cols["lineno"].append(lineno)
        cols["error"].append(status)
        cols["raw"].append(_raw_sample(raw) if status in MALFORMED_CODES else None)
    return pa.table(cols, schema=EVENT_SCHEMA)


def _summarize_block(batch: pa.Table, sample: int) -> pa.Table:
    """Line counts per status, plus the first `sample` malformed lines of the block (count 0)."""
    errors = batch.column("error").to_numpy()
    codes, counts = np.unique(errors, return_counts=True)
    out = {
        "error": codes.astype(np.int8).tolist(),
        "count": counts.astype(np.int64).tolist(),
        "src": [-1] * len(codes),
        "lineno": [-1] * len(codes),
        "raw": [None] * len(codes),
    }
    if sample:
        bad = np.flatnonzero(np.isin(errors, MALFORMED_CODES))[:sample]
        if len(bad):
            rows = batch.select(["error", "src", "lineno", "raw"]).take(pa.array(bad))
            out["error"] += rows.column("error").to_pylist()
            out["count"] += [0] * len(bad)
            out["src"] += rows.column("src").to_pylist()
            out["lineno"] += rows.column("lineno").to_pylist()
            out["raw"] += rows.column("raw").to_pylist()
    return pa.table(out, schema=SUMMARY_SCHEMA)


def stable_bucket(values: pa.Array | pa.ChunkedArray, n_buckets: int) -> np.ndarray:
    """Hash bucket of each string, identical in every process (unlike Python's salted hash())."""
    import pandas as pd

    arr = np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)
    if len(arr) == 0:
        return np.zeros(0, np.int32)
    return (pd.util.hash_array(arr, categorize=False) % np.uint64(n_buckets)).astype(np.int32)


def _valid_events_block(batch: pa.Table, n_buckets: int) -> pa.Table:
    batch = batch.filter(pc.equal(batch.column("error"), OK)).drop_columns(["error", "raw"])
    return batch.append_column("bucket", pa.array(stable_bucket(batch.column("user_id"), n_buckets)))


def _adjacent_equal(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    return pc.equal(arr.slice(1), arr.slice(0, n - 1)).to_numpy(zero_copy_only=False)


def _offsets_from_lengths(lengths: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def _empty_user_rows() -> pa.Table:
    return USER_ROW_SCHEMA.empty_table()


def _sort_dedup_bucket(group: pa.Table, dedup: bool) -> pa.Table:
    """One bucket of users (all of each user's events): sort, dedup, one row per user."""
    if group.num_rows == 0:
        return _empty_user_rows()
    group = group.sort_by(
        [(name, "ascending") for name in ("user_id", "ts", "item_id", "rating", "text_hash", "src", "lineno")]
    )
    n = group.num_rows
    same_user = _adjacent_equal(group.column("user_id"))
    user_start = np.concatenate([[True], ~same_user])
    user_of_row = np.cumsum(user_start) - 1
    n_users = int(user_start.sum())
    dup = np.zeros(n, dtype=bool)
    if dedup and n > 1:
        same = same_user.copy()
        for name in ("item_id", "ts", "text_hash"):
            same &= _adjacent_equal(group.column(name))
        same &= _adjacent_equal(pc.fill_null(group.column("rating"), -1.0))
        dup[1:] = same
    n_dups = np.bincount(user_of_row[dup], minlength=n_users).astype(np.int32)
    kept = group.filter(pa.array(~dup))
    lengths = np.bincount(user_of_row[~dup], minlength=n_users)
    offsets = _offsets_from_lengths(lengths)
    return pa.table(
        [
            group.column("user_id").combine_chunks().take(pa.array(np.flatnonzero(user_start))),
            pa.ListArray.from_arrays(offsets, kept.column("item_id").combine_chunks()),
            pa.ListArray.from_arrays(offsets, kept.column("ts").combine_chunks()),
            pa.array(lengths.astype(np.int32)),
            pa.array(n_dups),
            pa.array(np.zeros(n_users, np.int32)),
        ],
        schema=USER_ROW_SCHEMA,
    )


ITEM_COUNT_SCHEMA = pa.schema([("item_id", pa.string()), ("count", pa.int64())])


def _item_counts_block(batch: pa.Table, n_buckets: int) -> pa.Table:
    """Partial interaction counts per item of one block, with the item's hash bucket."""
    flat = batch.column("items").combine_chunks().flatten()
    if len(flat) == 0:
        return ITEM_COUNT_SCHEMA.append(pa.field("bucket", pa.int32())).empty_table()
    counts = pc.value_counts(flat)
    values = counts.field("values")
    return pa.table(
        [values, pc.cast(counts.field("counts"), pa.int64()), pa.array(stable_bucket(values, n_buckets))],
        names=["item_id", "count", "bucket"],
    )


def _sum_counts_bucket(group: pa.Table) -> pa.Table:
    """Total count per item of one bucket of partial counts."""
    if group.num_rows == 0:
        return ITEM_COUNT_SCHEMA.empty_table()
    total = group.group_by("item_id").aggregate([("count", "sum")])
    return pa.table([total.column("item_id"), total.column("count_sum")], schema=ITEM_COUNT_SCHEMA)


def _user_stats_block(batch: pa.Table) -> pa.Table:
    """Partial per-block statistics of user rows (combined on the driver: one row per block)."""
    n = batch.column("n").to_numpy() if batch.num_rows else np.zeros(0, np.int32)
    dups = batch.column("n_dups").to_numpy() if batch.num_rows else np.zeros(0, np.int32)
    return pa.table(
        {
            "users": [len(n)],
            "rows": [int(n.sum())],
            "min_len": [int(n.min()) if len(n) else None],
            "max_len": [int(n.max()) if len(n) else None],
            "dups": [int(dups.sum())],
        },
        schema=pa.schema([(c, pa.int64()) for c in ("users", "rows", "min_len", "max_len", "dups")]),
    )


def _resolve(value):
    """fn_args given as ObjectRefs (broadcast once with ray.put) are fetched inside the task."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _rebuild_user_rows(batch: pa.Table, keep_value: np.ndarray, min_len: int, cut: np.ndarray | None = None) -> pa.Table:
    """Keep the list values where `keep_value` (aligned with the flattened lists), drop rows shorter than min_len."""
    items = batch.column("items").combine_chunks()
    stamps = batch.column("timestamps").combine_chunks()
    parents = pc.list_parent_indices(items).to_numpy()
    lengths = np.bincount(parents[keep_value], minlength=batch.num_rows).astype(np.int32)
    offsets = _offsets_from_lengths(lengths)
    mask = pa.array(keep_value)
    table = pa.table(
        [
            batch.column("user_id"),
            pa.ListArray.from_arrays(offsets, items.flatten().filter(mask)),
            pa.ListArray.from_arrays(offsets, stamps.flatten().filter(mask)),
            pa.array(lengths),
            batch.column("n_dups"),
            pa.array(cut.astype(np.int32)) if cut is not None else batch.column("cut"),
        ],
        schema=USER_ROW_SCHEMA,
    )
    if min_len > 0:
        table = table.filter(pa.array(lengths >= min_len))
    return table


def _filter_users_block(batch: pa.Table, banned_items: pa.Array | None, min_user: int) -> pa.Table:
    """Remove banned items from every sequence, then drop users left with fewer than `min_user` items."""
    if batch.num_rows == 0:
        return _empty_user_rows()
    flat = batch.column("items").combine_chunks().flatten()
    banned_items = _resolve(banned_items)
    if banned_items is not None and len(banned_items):
        keep = ~pc.is_in(flat, value_set=banned_items).to_numpy(zero_copy_only=False)
    else:
        keep = np.ones(len(flat), dtype=bool)
    return _rebuild_user_rows(batch, keep, min_user)


def _limit_length_block(batch: pa.Table, max_len: int, mode: str) -> pa.Table:
    if batch.num_rows == 0:
        return _empty_user_rows()
    lengths = batch.column("n").to_numpy()
    if mode == "filter":
        return batch.filter(pa.array(lengths <= max_len))
    items = batch.column("items").combine_chunks()
    parents = pc.list_parent_indices(items).to_numpy()
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    position = np.arange(len(parents)) - starts[parents]
    keep = position >= (lengths - max_len)[parents]
    cut = np.maximum(lengths - max_len, 0)
    return _rebuild_user_rows(batch, keep, 0, cut=cut)


def _parse_meta_block(batch: pa.Table, wanted: pa.Array, word_limits: dict[str, int] | None) -> pa.Table:
    """Parse meta lines; clean only those whose asin occurs in the reviews (`wanted`)."""
    wanted = _resolve(wanted)
    raws = batch.column("line").to_pylist()
    statuses, objs, asins = [], [], []
    for raw in raws:
        status, obj = _load_object(raw)
        asin = _as_id(obj.get("asin")) if status == OK else None
        if status == OK and asin is None:
            status = MISSING_ID
        statuses.append(status)
        objs.append(obj if status == OK else None)
        asins.append(asin)
    asin_arr = pa.array(asins, pa.string())
    matched = pc.fill_null(pc.is_in(asin_arr, value_set=wanted), False).to_numpy(zero_copy_only=False)
    cols: dict[str, list] = {name: [] for name in META_SCHEMA.names}
    record_fields = [f for f in META_SCHEMA.names if f not in ("src", "lineno", "error", "raw")]
    for i, (raw, status, obj) in enumerate(zip(raws, statuses, objs)):
        if status == OK and not matched[i]:
            status = UNMATCHED
        record = meta_record(obj, word_limits) if status == OK else None
        for name in record_fields:
            cols[name].append(record[name] if record is not None else None)
        cols["error"].append(status)
        cols["raw"].append(_raw_sample(raw) if status in MALFORMED_CODES else None)
    cols["src"] = batch.column("src").combine_chunks()
    cols["lineno"] = batch.column("lineno").combine_chunks()
    return pa.table(cols, schema=META_SCHEMA)


def _matched_meta_block(batch: pa.Table, n_buckets: int) -> pa.Table:
    batch = batch.filter(pc.equal(batch.column("error"), OK)).drop_columns(["error", "raw"])
    return batch.append_column("bucket", pa.array(stable_bucket(batch.column("item_id"), n_buckets)))


def _dedupe_meta_bucket(group: pa.Table) -> pa.Table:
    """One meta line per ASIN: usable own title first, then fallback, then the earliest file/line."""
    group = group.drop_columns(["bucket"])
    if group.num_rows == 0:
        return group
    group = group.sort_by([(n, "ascending") for n in ("item_id", "priority", "src", "lineno")])
    first = np.concatenate([[True], ~_adjacent_equal(group.column("item_id"))])
    return group.filter(pa.array(first))


# ----------------------------------------------------------------------------------------------------------
# Driver-side helpers
# ----------------------------------------------------------------------------------------------------------


def _collect(ds, schema: pa.Schema | None = None) -> pa.Table:
    """Bring a (small: per-item / per-user / summary sized) dataset to the driver as one table."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        if schema is None:
            schema = ds.schema(fetch_if_missing=True)
            schema = getattr(schema, "base_schema", schema)
        return schema.empty_table() if schema is not None else pa.table({})
    return pa.concat_tables(tables, promote_options="default").combine_chunks()


def _summary(parsed, sample: int, files: Sequence[str]) -> dict[str, Any]:
    table = _collect(parsed.map_batches(_summarize_block, fn_kwargs={"sample": sample}, batch_format="pyarrow",
                                        batch_size=None), SUMMARY_SCHEMA)
    counts = {name: 0 for name in STATUS_NAMES.values()}
    is_count = pc.equal(table.column("src"), -1).to_numpy(zero_copy_only=False)
    errors = table.column("error").to_numpy()
    number = table.column("count").to_numpy()
    for code, c in zip(errors[is_count], number[is_count]):
        counts[STATUS_NAMES[int(code)]] += int(c)
    samples = table.filter(pa.array(~is_count)).sort_by([("src", "ascending"), ("lineno", "ascending")])
    sample_rows = [
        {"file": files[src] if 0 <= src < len(files) else None, "line": lineno, "reason": STATUS_NAMES[err], "text": raw}
        for err, src, lineno, raw in zip(
            samples.column("error").to_pylist(),
            samples.column("src").to_pylist(),
            samples.column("lineno").to_pylist(),
            samples.column("raw").to_pylist(),
        )
    ][:sample]
    malformed_by_reason = {STATUS_NAMES[c]: counts[STATUS_NAMES[c]] for c in MALFORMED_CODES}
    return {
        "files": list(files),
        "lines": int(sum(counts.values())),
        "blank_lines": counts["blank"],
        "parsed": counts["ok"],
        "unmatched": counts["unmatched"],
        "malformed": int(sum(malformed_by_reason.values())),
        "malformed_by_reason": malformed_by_reason,
        "malformed_sample": sample_rows,
    }


def _partitions(n_rows: int) -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 2)) or 2
    return int(min(max(2, cpus, math.ceil(n_rows / ROWS_PER_PARTITION)), 1024))


def _user_stats(users_ds) -> dict[str, int]:
    table = _collect(users_ds.map_batches(_user_stats_block, batch_format="pyarrow", batch_size=None))
    if table.num_rows == 0:
        return {"users": 0, "rows": 0, "min_len": 0, "max_len": 0, "dups": 0}

    def total(name, fn):
        value = fn(table.column(name)).as_py()
        return int(value) if value is not None else 0

    return {
        "users": total("users", pc.sum),
        "rows": total("rows", pc.sum),
        "min_len": total("min_len", pc.min),
        "max_len": total("max_len", pc.max),
        "dups": total("dups", pc.sum),
    }


def _item_counts(users_ds, partitions: int) -> pa.Table:
    """Interactions per item. Collected to the driver: one row per item (a per-item aggregate).

    Partial counts per block, then summed per hash bucket of items in map_groups (Ray's hash-aggregate
    operator starts aggregator actors, which costs seconds per call; this path does not).
    """
    table = _collect(
        users_ds.map_batches(_item_counts_block, fn_kwargs={"n_buckets": 4 * partitions}, batch_format="pyarrow",
                             batch_size=None)
        .groupby("bucket", num_partitions=partitions)
        .map_groups(_sum_counts_bucket, batch_format="pyarrow"),
        ITEM_COUNT_SCHEMA,
    )
    return table.sort_by("item_id")


def _map_users(users_ds, fn, **fn_kwargs):
    return users_ds.map_batches(fn, fn_kwargs=fn_kwargs, batch_format="pyarrow", batch_size=None).materialize()


def prepare_amazon2018(
    reviews: str | Path | list,
    meta: str | Path | list | None,
    out_dir: str | Path,
    options: Amazon2018Options | None = None,
    address: str | None = None,
) -> dict:
    """Prepare raw Amazon 2018 files into `out_dir`; returns the report (also in meta.json under 'report').

    `reviews` / `meta`: a file, a list of files, or a directory (reviews: `find_raw_files` rules; meta: the
    `meta_*` files in it). `meta=None` prepares without item text (every title 'Unknown').
    `address`: Ray address to join (None starts or reuses a local instance, see `seqrec.ray_utils.init_ray`).
    """
    from seqrec.ray_utils import init_ray

    options = options or Amazon2018Options()
    review_files = _as_file_list(reviews, "reviews")
    meta_files = _as_file_list(meta, "meta")
    if not review_files:
        raise FileNotFoundError("no review files given")
    ray = init_ray(address)
    timings: dict[str, float] = {}
    t_start = t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = round(now - t0, 3)
        t0 = now

    word_limits = options.word_limits
    report: dict[str, Any] = {}

    # 1. Read and parse reviews.
    source = json_lines_datasource(review_files)
    review_paths = source.file_paths()
    parsed = (
        ray.data.read_datasource(source)
        # num_cpus differs from the read's so the two are not fused: the gz read of one file is sequential,
        # but parsing its blocks then runs in parallel tasks.
        .map_batches(_parse_reviews_block, batch_format="pyarrow", batch_size=None, num_cpus=0.99)
        .materialize()
    )
    report["reviews"] = _summary(parsed, options.malformed_sample, review_paths)
    report["reviews"].pop("unmatched")
    n_valid = report["reviews"]["parsed"]
    log.info("parsed %d review lines: %d valid, %d malformed, %d blank", report["reviews"]["lines"], n_valid,
             report["reviews"]["malformed"], report["reviews"]["blank_lines"])
    if n_valid == 0:
        raise ValueError(f"no valid review lines in {review_paths}")
    partitions = _partitions(n_valid)
    lap("parse_reviews")

    # 2. Per-user sort + dedup, one row per user. Buckets of users keep map_groups calls few and vectorised.
    buckets = 4 * partitions
    users = (
        parsed.map_batches(_valid_events_block, fn_kwargs={"n_buckets": buckets}, batch_format="pyarrow",
                           batch_size=None)
        .groupby("bucket", num_partitions=partitions)
        .map_groups(_sort_dedup_bucket, fn_kwargs={"dedup": options.dedup}, batch_format="pyarrow")
        .materialize()
    )
    del parsed
    stats = _user_stats(users)
    report["dedup"] = {"enabled": options.dedup, "removed": stats["dups"], "events_after": stats["rows"]}
    lap("sort_dedup")

    # 3. Metadata for the review items.
    item_counts = _item_counts(users, partitions)
    review_items = item_counts.column("item_id").combine_chunks()
    report["reviews"].update(users=stats["users"], items=len(review_items), events=stats["rows"])
    if meta_files:
        meta_source = json_lines_datasource(meta_files)
        meta_paths = meta_source.file_paths()
        wanted = ray.put(review_items)
        meta_parsed = (
            ray.data.read_datasource(meta_source)
            .map_batches(_parse_meta_block, fn_args=(wanted, word_limits), batch_format="pyarrow",
                         batch_size=None, num_cpus=0.99)
            .materialize()
        )
        meta_report = _summary(meta_parsed, options.malformed_sample, meta_paths)
        meta_report["matched_lines"] = meta_report.pop("parsed")
        meta_buckets = 4 * _partitions(meta_report["matched_lines"])
        # One row per review item with meta: collected to the driver (a per-item table).
        meta_items = _collect(
            meta_parsed.map_batches(_matched_meta_block, fn_kwargs={"n_buckets": meta_buckets},
                                    batch_format="pyarrow", batch_size=None)
            .groupby("bucket", num_partitions=_partitions(meta_report["matched_lines"]))
            .map_groups(_dedupe_meta_bucket, batch_format="pyarrow"),
            META_SCHEMA.remove(META_SCHEMA.get_field_index("raw")).remove(META_SCHEMA.get_field_index("error")),
        )
        del meta_parsed
        meta_report["duplicate_lines_dropped"] = meta_report["matched_lines"] - meta_items.num_rows
    else:
        meta_report = {"files": [], "lines": 0}
        meta_items = META_SCHEMA.empty_table().drop_columns(["error", "raw"])
    meta_report["review_items"] = len(review_items)
    meta_report["review_items_with_meta"] = meta_items.num_rows
    meta_report["review_items_without_meta"] = len(review_items) - meta_items.num_rows
    report["meta"] = meta_report
    log.info("meta: %s", {k: v for k, v in meta_report.items() if k not in ("malformed_sample", "files")})
    lap("meta")

    # 4. Items without a usable title (own title or fallback), dropped before the k-core if asked.
    titled = meta_items.filter(pc.not_equal(meta_items.column("title_source"), "none")).column("item_id")
    untitled = pc.filter(review_items, pc.invert(pc.is_in(review_items, value_set=titled)))
    report["title_filter"] = {"enabled": options.drop_missing_title, "items_without_title": len(untitled),
                              "items_dropped": 0, "events_dropped": 0, "users_dropped": 0}
    if options.drop_missing_title and len(untitled):
        users = _map_users(users, _filter_users_block, banned_items=ray.put(untitled), min_user=1)
        after = _user_stats(users)
        report["title_filter"].update(items_dropped=len(untitled), events_dropped=stats["rows"] - after["rows"],
                                      users_dropped=stats["users"] - after["users"])
        stats = after
        item_counts = _item_counts(users, partitions)
    lap("title_filter")

    # 5. Iterative k-core.
    rounds = []
    while True:
        below = item_counts.filter(pc.less(item_counts.column("count"), options.min_item_count)).column("item_id")
        entry = {"round": len(rounds), "rows": stats["rows"], "users": stats["users"],
                 "items": item_counts.num_rows, "items_below_min": len(below),
                 "users_below_min": None}
        rounds.append(entry)
        if stats["users"] == 0 or (len(below) == 0 and stats["min_len"] >= options.min_user_count):
            entry["users_below_min"] = 0
            break
        log.info("k-core round %d: %d rows, %d users, %d items (%d items below min)", entry["round"],
                 entry["rows"], entry["users"], entry["items"], len(below))
        users = _map_users(users, _filter_users_block, banned_items=ray.put(below.combine_chunks()),
                           min_user=options.min_user_count)
        stats = _user_stats(users)
        item_counts = _item_counts(users, partitions)
    log.info("k-core stable after %d rounds: %d rows, %d users, %d items", len(rounds) - 1, stats["rows"],
             stats["users"], item_counts.num_rows)
    report["kcore"] = {"min_user_count": options.min_user_count, "min_item_count": options.min_item_count,
                       "rounds": rounds, "iterations": len(rounds) - 1}
    if stats["users"] == 0:
        raise ValueError(
            f"no interactions left after the {options.min_user_count}/{options.min_item_count} k-core filter "
            f"(and title filter); report so far: {json.dumps(report, default=str)[:2000]}"
        )
    lap("kcore")

    # 6. Long sequences.
    limit = {"max_len": options.max_len, "mode": options.long_sequences, "users_trimmed": 0,
             "events_trimmed": 0, "users_filtered": 0, "events_filtered": 0}
    if options.max_len is not None and stats["max_len"] > options.max_len:
        users = _map_users(users, _limit_length_block, max_len=options.max_len, mode=options.long_sequences)
    # The final per-user sequences come to the driver: they are the output tables.
    sequences = _collect(users, USER_ROW_SCHEMA)
    del users
    cut = sequences.column("cut").to_numpy()
    lengths = sequences.column("n").to_numpy()
    limit["users_trimmed"] = int((cut > 0).sum())
    limit["events_trimmed"] = int(cut.sum())
    limit["users_filtered"] = stats["users"] - sequences.num_rows
    limit["events_filtered"] = stats["rows"] - int(lengths.sum()) - limit["events_trimmed"]
    report["long_sequences"] = limit
    lap("long_sequences")

    # 7. Dense indices, items table, split, write.
    items, seq_table, splits = _assemble(sequences, meta_items, options)
    title_sources = items.column("title_source").to_pylist()
    counts = {s: title_sources.count(s) for s in TITLE_SOURCES}
    report["final"] = {
        "users": seq_table.num_rows,
        "items": items.num_rows,
        "interactions": int(lengths.sum()),
        "items_with_meta": int(pc.sum(pc.is_in(items.column("item_id"), value_set=meta_items.column("item_id"))).as_py() or 0),
        "title_source": counts,
        "fallback_titles": counts["description"] + counts["brand_category"],
        "invalid_prices_dropped": int(pc.sum(items.column("price_invalid")).as_py() or 0),
    }
    report["timings_s"] = timings
    meta_json = {
        "source": SOURCE,
        "name": _dataset_name(review_files),
        "options": asdict(options),
        "seed": options.seed,
        "raw_files": {"reviews": [str(p) for p in review_files], "meta": [str(p) for p in meta_files]},
        "report": report,
    }
    write_prepared(out_dir, items, seq_table, splits, meta_json)
    lap("assemble_write")
    timings["total"] = round(time.perf_counter() - t_start, 3)
    log.info("prepared %s: %s", out_dir, report["final"])
    return report


def _assemble(sequences: pa.Table, meta_items: pa.Table, options: Amazon2018Options):
    """Driver side, vectorised: indices, items table, sequences table, leave-one-out splits."""
    sequences = sequences.sort_by("user_id")
    lengths = sequences.column("n").to_numpy().astype(np.int64)
    offsets = _offsets_from_lengths(lengths)
    flat_items = sequences.column("items").combine_chunks().flatten()
    flat_stamps = sequences.column("timestamps").combine_chunks().flatten()
    item_ids = pc.unique(flat_items).sort()
    item_index = pc.cast(pc.index_in(flat_items, value_set=item_ids), pa.int32())
    user_idx = np.arange(sequences.num_rows, dtype=np.int32)
    seq_table = pa.table(
        {
            "user_idx": pa.array(user_idx),
            "user_id": sequences.column("user_id"),
            "items": pa.ListArray.from_arrays(offsets, item_index),
            "timestamps": pa.ListArray.from_arrays(offsets, flat_stamps),
        }
    )
    # Items: the deduped meta row of each item, or an empty record for items without meta.
    pos = pc.index_in(item_ids, value_set=meta_items.column("item_id")).to_pylist()
    records = meta_items.to_pylist()
    rows = []
    for i, (item_id, p) in enumerate(zip(item_ids.to_pylist(), pos)):
        rec = dict(records[p]) if p is not None else empty_item_record(item_id, options.word_limits)
        rec["item_idx"] = i
        rows.append(rec)
    items = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [("item_idx", pa.int32())]
            + [f for f in META_SCHEMA if f.name not in ("priority", "src", "lineno", "error", "raw")]
        ),
    )
    seqs = np.split(item_index.to_numpy(), np.cumsum(lengths)[:-1]) if len(lengths) else []
    splits = split_tables(leave_one_out(user_idx, seqs, SplitOptions(min_eval_len=options.min_eval_len)))
    return items, seq_table, splits
