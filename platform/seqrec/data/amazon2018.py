"""Amazon Review Data (2018) raw files -> the prepared layout (`seqrec.data.dataset`), on Ray Data.

Inputs are the JSON-lines files as distributed (gz or plain): reviews (`{Category}_5.json.gz` or a full
review file) and metadata (`meta_{Category}.json.gz`).

Every step over review rows runs in Ray Data tasks, so the pipeline runs unchanged on a multi-node cluster
(given paths every node can read). What comes back to the driver is per-item or per-user sized, and each such
place says so: item counts per k-core round, the deduped meta rows of the review items, a few status/sample
rows per block, and finally the per-user sequences (the output tables themselves).

1. Read raw lines with `JsonLinesTextDatasource` (a `FileBasedDatasource`: streaming gzip decompression,
   split on b"\n" only, bytes never decoded at read time) and parse them in `map_batches`. A line that is
   not JSON (including invalid UTF-8 / binary junk), not an object, lacks reviewerID/asin, or has a
   missing/non-numeric unixReviewTime is counted as malformed by reason and the first few are kept as a
   sample; blank lines are counted separately (`blank_lines`) and are not malformed.
2. Co-locate each user's events (`groupby(hash bucket of reviewerID).map_groups`, vectorised per bucket) and
   sort them by (unixReviewTime, asin), remaining ties by rating, review-text hash, file and line number, so
   the order never depends on file layout or sharding. CALRec dedup: an event identical to an earlier event
   of the same user in asin, rating, review text and timestamp is dropped (identical events are adjacent in
   this order, so this is "identical to the previous one"); re-purchases at other times stay. Each user
   becomes one row (items, timestamps).
3. Metadata: parse, keep only lines of items that occur in the reviews, dedupe duplicate ASIN lines
   deterministically (a line whose own title is usable first, then the earliest file/line), clean the text
   fields (HTML stripped, entities unescaped) and format the item text. Titles that clean to nothing (most
   2018 meta titles are HTML fragments like `<span class="a-size-medium a-color-secondary"`) fall back to the
   first sentence of the description (at most 20 words), then to brand + last category; the source of every
   title is reported. A price that is not a price after cleaning (scraped CSS/JS) becomes empty. Categories
   keep the full path, top level included.
4. Optionally drop items without a usable title, before the k-core (so the k-core still holds).
5. Iterative k-core until stable; rows/users/items are reported for each round.
6. max_len: "trim" keeps each user's last max_len items, "filter" drops users longer than max_len.
7. Dense indices (item_idx by sorted ASIN, user_idx by sorted reviewerID, both by code point), leave-one-out
   split, written with `write_prepared`.
"""
from __future__ import annotations

import contextlib
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

from seqrec.data.dataset import ITEM_SCHEMA, SplitOptions, leave_one_out, split_tables, write_prepared
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
# Shuffles (map_groups over user / item buckets) use Ray's task-based sort shuffle. With Ray 2.60's default
# hash shuffle (aggregator actors per operation) each of the ~10 shuffles took 5-15 s on a shared 2-CPU
# machine, some actors crashing and being retried; the raw sample took ~120 s instead of ~12 s. Both
# strategies run unchanged on a multi-node cluster.
SHUFFLE_STRATEGY = "sort_shuffle_pull_based"
# Ray coalesces the read's ~16 MB chunks into blocks up to target_max_block_size (128 MiB by default): a 1M
# review file became 5 blocks, i.e. at most 5 parse tasks. 32 MiB blocks give ~4x the parse parallelism.
TARGET_MAX_BLOCK_BYTES = 32 << 20
# Reading (gzip + line split) costs a fraction of parsing (JSON + cleaning); with equal CPU shares a read task
# would hold a whole CPU slot that the parse tasks need. READ_CPUS + 2 * PARSE_CPUS = 2: on a 2-CPU machine
# one read and two parse tasks run together.
READ_CPUS = 0.25
PARSE_CPUS = 0.875

LINE_SCHEMA = pa.schema([("line", pa.binary()), ("src", pa.int32()), ("lineno", pa.int64())])
# Parsed review rows. Besides one row per valid line (error == OK), each block adds one row per line status
# with `count` set (how many lines of the block had it), and up to `malformed_sample` malformed lines with
# `raw` set (the sample for the report); blank and malformed lines produce no other rows.
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
        ("count", pa.int64()),
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
# Parsed meta rows: one per line of an item that occurs in the reviews (error == OK), plus status-count and
# sample rows as in EVENT_SCHEMA; `bucket` is the hash bucket of the item (0 for status rows).
META_SCHEMA = pa.schema(
    # the prepared item columns (one definition, in dataset.ITEM_SCHEMA) minus the index assigned later
    [f for f in ITEM_SCHEMA if f.name != "item_idx"]
    + [
        ("title_source", pa.string()),
        ("price_invalid", pa.bool_()),
        ("priority", pa.int8()),
        ("src", pa.int32()),
        ("lineno", pa.int64()),
        ("error", pa.int8()),
        ("raw", pa.string()),
        ("count", pa.int64()),
        ("bucket", pa.int32()),
    ]
)
META_ITEM_COLUMNS = [
    "item_id", "title", "brand", "categories", "price", "description", "text", "title_source", "price_invalid",
]


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


def _as_file_list(spec: str | Path | Sequence[str | Path] | None, kind: str) -> list[Path | str]:
    """Files named by `spec`: a file, a directory, a URI (kept as a string) or a list of those."""
    if spec is None:
        return []
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: list = []
    for item in specs:
        if _is_uri(item):  # e.g. s3://bucket/Books_5.json.gz: a file, read by Ray Data's filesystem layer
            files.append(str(item))
            continue
        path = Path(item)
        if path.is_dir() and kind == "reviews":
            files.extend(find_raw_files(path)[0])
        elif path.is_dir():
            files.extend(p for p in sorted(path.iterdir())
                         if p.is_file() and p.name.startswith("meta_") and _strip_json_suffix(p.name) is not None)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{kind} file {path} does not exist")
    return files


def _is_uri(item: str | Path) -> bool:
    return isinstance(item, str) and "://" in item


def _dataset_name(review_files: Sequence[Path | str]) -> str:
    names = []
    for path in review_files:
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        stem = _strip_json_suffix(name) or name
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
    return _DATASOURCE_CLASS([str(p) if _is_uri(p) else str(Path(p).resolve()) for p in paths], **kwargs)


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


def _status_rows(statuses: list[int], srcs: list[int], linenos: list[int], raws: list[bytes], sample: int,
                 schema: pa.Schema) -> pa.Table:
    """Per-status line counts of one block, plus its first `sample` malformed lines (see EVENT_SCHEMA)."""
    counts: dict[int, int] = {}
    bad: list[int] = []
    for i, status in enumerate(statuses):
        counts[status] = counts.get(status, 0) + 1
        if status in MALFORMED_CODES and len(bad) < sample:
            bad.append(i)
    n = len(counts) + len(bad)
    cols: dict[str, Any] = {name: pa.nulls(n, schema.field(name).type) for name in schema.names}
    cols["error"] = pa.array(list(counts) + [statuses[i] for i in bad], pa.int8())
    cols["count"] = pa.array(list(counts.values()) + [None] * len(bad), pa.int64())
    cols["src"] = pa.array([-1] * len(counts) + [srcs[i] for i in bad], pa.int32())
    cols["lineno"] = pa.array([-1] * len(counts) + [linenos[i] for i in bad], pa.int64())
    cols["raw"] = pa.array([None] * len(counts) + [_raw_sample(raws[i]) for i in bad], pa.string())
    if "bucket" in cols:
        cols["bucket"] = pa.array(np.zeros(n, np.int32))
    return pa.table(cols, schema=schema)


def _parse_reviews_block(batch: pa.Table, sample: int) -> pa.Table:
    raws = batch.column("line").to_pylist()
    srcs = batch.column("src").to_pylist()
    linenos = batch.column("lineno").to_pylist()
    statuses = []
    cols: dict[str, list] = {name: [] for name in ("user_id", "item_id", "ts", "rating", "text_hash", "src", "lineno")}
    for raw, src, lineno in zip(raws, srcs, linenos):
        status, user, item, ts, rating, thash = parse_review_line(raw)
        statuses.append(status)
        if status != OK:
            continue
        cols["user_id"].append(user)
        cols["item_id"].append(item)
        cols["ts"].append(ts)
        cols["rating"].append(rating)
        cols["text_hash"].append(thash)
        cols["src"].append(src)
        cols["lineno"].append(lineno)
    n = len(cols["user_id"])
    valid = pa.table(
        {**cols, "error": pa.array(np.zeros(n, np.int8)), "raw": pa.nulls(n, pa.string()),
         "count": pa.nulls(n, pa.int64())},
        schema=EVENT_SCHEMA,
    )
    return pa.concat_tables([valid, _status_rows(statuses, srcs, linenos, raws, sample, EVENT_SCHEMA)])


def _status_only_block(batch: pa.Table) -> pa.Table:
    """The status-count and sample rows of a block (drops the data rows)."""
    return batch.filter(_is_status_row(batch)).select(["error", "count", "src", "lineno", "raw"])


def _is_status_row(batch: pa.Table) -> pa.Array:
    """Status-count rows have `count`, sample rows `raw`; data rows have neither."""
    return pc.or_(pc.is_valid(batch.column("count")), pc.is_valid(batch.column("raw")))


def stable_bucket(values: pa.Array | pa.ChunkedArray, n_buckets: int) -> np.ndarray:
    """Hash bucket of each string, identical in every process (unlike Python's salted hash())."""
    import pandas as pd

    arr = np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)
    if len(arr) == 0:
        return np.zeros(0, np.int32)
    return (pd.util.hash_array(arr, categorize=False) % np.uint64(n_buckets)).astype(np.int32)


def _valid_events_block(batch: pa.Table, n_buckets: int) -> pa.Table:
    batch = batch.filter(pc.invert(_is_status_row(batch))).drop_columns(["error", "raw", "count"])
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


ITEM_COUNT_SCHEMA = pa.schema(
    [("item_id", pa.string()), ("count", pa.int64()), ("min_len", pa.int64()), ("bucket", pa.int32())]
)


def _item_counts_block(batch: pa.Table, n_buckets: int, banned_items, min_user: int) -> pa.Table:
    """Partial interaction counts per item of one block of user rows, after `_filter_users_block`.

    One extra row with a null item_id carries the block's number of users (`count`) and shortest sequence
    (`min_len`), so one pass gives the round's item counts and its user statistics.
    """
    if banned_items is not None or min_user > 0:
        batch = _filter_users_block(batch, banned_items, min_user)
    flat = batch.column("items").combine_chunks().flatten() if batch.num_rows else pa.array([], pa.string())
    lengths = batch.column("n").to_numpy() if batch.num_rows else np.zeros(0, np.int32)
    if len(flat):
        counts = pc.value_counts(flat)
        values, numbers = counts.field("values"), pc.cast(counts.field("counts"), pa.int64())
    else:
        values, numbers = pa.array([], pa.string()), pa.array([], pa.int64())
    n = len(values)
    return pa.table(
        [
            pa.concat_arrays([values, pa.nulls(1, pa.string())]),
            pa.concat_arrays([numbers, pa.array([len(lengths)], pa.int64())]),
            pa.array([None] * n + [int(lengths.min()) if len(lengths) else None], pa.int64()),
            pa.array(np.append(stable_bucket(values, n_buckets), 0).astype(np.int32)),
        ],
        schema=ITEM_COUNT_SCHEMA,
    )


def _sum_counts_bucket(group: pa.Table) -> pa.Table:
    """Total count per item of one bucket of partial counts (the null-item row sums the user counts)."""
    if group.num_rows == 0:
        return ITEM_COUNT_SCHEMA.empty_table()
    total = group.group_by("item_id", use_threads=False).aggregate([("count", "sum"), ("min_len", "min")])
    return pa.table(
        [total.column("item_id"), total.column("count_sum"), total.column("min_len_min"),
         pa.array(np.zeros(total.num_rows, np.int32))],
        schema=ITEM_COUNT_SCHEMA,
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


def _parse_meta_block(batch: pa.Table, wanted, word_limits: dict[str, int] | None, sample: int,
                      n_buckets: int) -> pa.Table:
    """Parse meta lines; clean only those whose asin occurs in the reviews (`wanted`)."""
    wanted = _resolve(wanted)
    raws = batch.column("line").to_pylist()
    srcs = batch.column("src").to_pylist()
    linenos = batch.column("lineno").to_pylist()
    statuses, objs, asins = [], [], []
    for raw in raws:
        status, obj = _load_object(raw)
        asin = _as_id(obj.get("asin")) if status == OK else None
        if status == OK and asin is None:
            status = MISSING_ID
        statuses.append(status)
        objs.append(obj if status == OK else None)
        asins.append(asin)
    matched = pc.fill_null(pc.is_in(pa.array(asins, pa.string()), value_set=wanted), False)
    matched = matched.to_numpy(zero_copy_only=False)
    records = []
    for i, status in enumerate(statuses):
        if status == OK and not matched[i]:
            statuses[i] = UNMATCHED
        elif status == OK:
            record = meta_record(objs[i], word_limits)
            record["src"], record["lineno"], record["error"] = srcs[i], linenos[i], OK
            records.append(record)
    table = pa.Table.from_pylist(records, schema=META_SCHEMA)
    table = table.set_column(
        table.schema.get_field_index("bucket"), "bucket", pa.array(stable_bucket(table.column("item_id"), n_buckets))
    )
    return pa.concat_tables([table, _status_rows(statuses, srcs, linenos, raws, sample, META_SCHEMA)])


def _dedupe_meta_bucket(group: pa.Table) -> pa.Table:
    """One meta line per ASIN: usable own title first, then fallback, then the earliest file/line.
    Status rows pass through unchanged."""
    if group.num_rows == 0:
        return group
    is_item = pc.invert(_is_status_row(group))
    status_rows = group.filter(pc.invert(is_item))
    items = group.filter(is_item)
    if items.num_rows:
        items = items.sort_by([(n, "ascending") for n in ("item_id", "priority", "src", "lineno")])
        first = np.concatenate([[True], ~_adjacent_equal(items.column("item_id"))])
        items = items.filter(pa.array(first))
    return pa.concat_tables([items, status_rows])


# ----------------------------------------------------------------------------------------------------------
# Driver-side helpers
# ----------------------------------------------------------------------------------------------------------


# Where the Ray Data tasks of the running prepare ran: operator name -> node ids (from Ray Data's execution
# stats, which record each block's producing node). A multi-node cluster's placement, read back into the report.
_placement: dict[str, set[str]] = {}


def _record_placement(ds) -> None:
    """Add the nodes that produced `ds`'s blocks, and its parents' (the stats chain up to the read), to
    `_placement`. Best effort: the stats are Ray Data internals, a version without them records nothing."""
    raw_stats = getattr(ds, "_raw_stats", None)
    stack = [raw_stats() if raw_stats is not None else None]
    while stack:
        stats = stack.pop()
        if stats is None:
            continue
        for op_name, blocks in getattr(stats, "metadata", {}).items():
            for block in blocks:
                node = getattr(getattr(block, "exec_stats", None), "node_id", None)
                if node:
                    _placement.setdefault(op_name, set()).add(node)
        stack.extend(getattr(stats, "parents", []))


def _collect(ds, schema: pa.Schema | None = None) -> pa.Table:
    """Bring a (small: per-item / per-user / summary sized) dataset to the driver as one table."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    _record_placement(ds)
    if not tables:
        if schema is None:
            schema = ds.schema(fetch_if_missing=True)
            schema = getattr(schema, "base_schema", schema)
        return schema.empty_table() if schema is not None else pa.table({})
    return pa.concat_tables(tables, promote_options="default").combine_chunks()


STATUS_COLUMNS = pa.schema(
    [("error", pa.int8()), ("count", pa.int64()), ("src", pa.int32()), ("lineno", pa.int64()), ("raw", pa.string())]
)


def _summary(status_rows: pa.Table, sample: int, files: Sequence[str]) -> dict[str, Any]:
    """Line counts per status and the first `sample` malformed lines (by file, line) from status rows."""
    counts = {name: 0 for name in STATUS_NAMES.values()}
    is_count = pc.is_valid(status_rows.column("count")).to_numpy(zero_copy_only=False)
    for code, c in zip(status_rows.column("error").to_numpy()[is_count], status_rows.column("count").to_numpy()[is_count]):
        counts[STATUS_NAMES[int(code)]] += int(c)
    samples = status_rows.filter(pa.array(~is_count)).sort_by([("src", "ascending"), ("lineno", "ascending")])
    sample_rows = [
        {"file": files[src] if 0 <= src < len(files) else None, "line": lineno, "reason": STATUS_NAMES[err],
         "text": raw}
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


@dataclass
class _Counts:
    items: pa.Table  # item_id, count (one row per item; a per-item aggregate on the driver)
    users: int
    min_len: int

    @property
    def rows(self) -> int:
        return int(pc.sum(self.items.column("count")).as_py() or 0)


def _count_items(users_ds, partitions: int, banned_items=None, min_user: int = 0) -> _Counts:
    """Item counts (and user count / shortest sequence) of `users_ds` after removing `banned_items` and
    users left with fewer than `min_user` items. One Ray execution: partial counts per block, summed per hash
    bucket of items in map_groups (Ray's hash-aggregate operator starts aggregator actors, which costs seconds
    per call; this path does not). The result is collected to the driver: one row per item."""
    table = _collect(
        users_ds.map_batches(
            _item_counts_block,
            fn_kwargs={"n_buckets": 4 * partitions, "banned_items": banned_items, "min_user": min_user},
            batch_format="pyarrow",
            batch_size=None,
        )
        .repartition(partitions)
        .groupby("bucket", num_partitions=partitions)
        .map_groups(_sum_counts_bucket, batch_format="pyarrow"),
        ITEM_COUNT_SCHEMA,
    )
    is_user_row = pc.is_null(table.column("item_id")).to_numpy(zero_copy_only=False)
    user_rows = table.filter(pa.array(is_user_row))
    items = table.filter(pa.array(~is_user_row)).select(["item_id", "count"]).sort_by("item_id")
    min_len = pc.min(user_rows.column("min_len")).as_py() if user_rows.num_rows else None
    return _Counts(items=items, users=int(pc.sum(user_rows.column("count")).as_py() or 0),
                   min_len=int(min_len) if min_len is not None else 0)


def prepare_amazon2018(
    reviews: str | Path | list,
    meta: str | Path | list | None,
    out_dir: str | Path,
    options: Amazon2018Options | None = None,
    address: str | None = None,
    *,
    name: str | None = None,
) -> dict:
    """Prepare raw Amazon 2018 files into `out_dir`; returns the report (also in meta.json under 'report').

    `reviews` / `meta`: a file, a list of files, or a directory (reviews: `find_raw_files` rules; meta: the
    `meta_*` files in it). `meta=None` prepares without item text (every title 'Unknown').
    `address`: Ray address to join (None starts or reuses a local instance, see `seqrec.ray_utils.init_ray`).
    `name`: stored in meta.json; default: the category from the review file names (e.g. Magazine_Subscriptions).
    """
    from seqrec.ray_utils import init_ray

    options = options or Amazon2018Options()
    review_files = _as_file_list(reviews, "reviews")
    meta_files = _as_file_list(meta, "meta")
    if not review_files:
        raise FileNotFoundError("no review files given")
    ray = init_ray(address)
    with _data_context(shuffle_strategy=SHUFFLE_STRATEGY, target_max_block_size=TARGET_MAX_BLOCK_BYTES):
        return _prepare(ray, review_files, meta_files, Path(out_dir), options, name or _dataset_name(review_files))


@contextlib.contextmanager
def _data_context(**settings):
    """Datasets created inside use these DataContext settings (each Dataset keeps a copy of the context);
    the process-wide context is restored afterwards."""
    from ray.data.context import DataContext

    ctx = DataContext.get_current()
    previous = {name: getattr(ctx, name) for name in settings}
    for name, value in settings.items():
        setattr(ctx, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(ctx, name, value)


def _prepare(ray, review_files: list, meta_files: list, out_dir: Path, options: Amazon2018Options,
             name: str) -> dict:
    timings: dict[str, float] = {}
    t_start = t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = round(now - t0, 3)
        t0 = now

    word_limits = options.word_limits
    report: dict[str, Any] = {}
    _placement.clear()

    # 1. Read and parse reviews. The parsed rows stay in the object store (materialized), not on the driver.
    source = json_lines_datasource(review_files)
    review_paths = source.file_paths()
    parsed = (
        # One read task per file (a gz stream cannot be split); it yields ~16 MB blocks as it goes.
        ray.data.read_datasource(source, override_num_blocks=len(review_paths), num_cpus=READ_CPUS)
        # Different num_cpus keep read and parse unfused: the read of one file is sequential, its blocks are
        # then parsed by parallel tasks.
        .map_batches(_parse_reviews_block, fn_kwargs={"sample": options.malformed_sample},
                     batch_format="pyarrow", batch_size=None, num_cpus=PARSE_CPUS)
        .materialize()
    )
    # Status counts and malformed samples: a few rows per block, collected to the driver.
    status_rows = _collect(parsed.map_batches(_status_only_block, batch_format="pyarrow", batch_size=None),
                           STATUS_COLUMNS)
    report["reviews"] = _summary(status_rows, options.malformed_sample, review_paths)
    report["reviews"].pop("unmatched")
    n_valid = report["reviews"]["parsed"]
    log.info("parsed %d review lines: %d valid, %d malformed, %d blank", report["reviews"]["lines"], n_valid,
             report["reviews"]["malformed"], report["reviews"]["blank_lines"])
    if n_valid == 0:
        raise ValueError(f"no valid review lines in {review_paths}")
    partitions = _partitions(n_valid)
    lap("parse_reviews")

    # 2. Per-user sort + dedup, one row per user. Buckets of users keep map_groups calls few and vectorised.
    # Every shuffle is preceded by repartition(partitions) (block split/merge, no shuffle): the sort shuffle
    # behind groupby has as many map and reduce tasks as input blocks, i.e. blocks^2 pieces.
    users = (
        parsed.map_batches(_valid_events_block, fn_kwargs={"n_buckets": 4 * partitions}, batch_format="pyarrow",
                           batch_size=None)
        .repartition(partitions)
        .groupby("bucket", num_partitions=partitions)
        .map_groups(_sort_dedup_bucket, fn_kwargs={"dedup": options.dedup}, batch_format="pyarrow")
        .materialize()
    )
    del parsed
    counts = _count_items(users, partitions)
    review_items = counts.items.column("item_id").combine_chunks()
    report["dedup"] = {"enabled": options.dedup, "removed": n_valid - counts.rows, "events_after": counts.rows}
    report["reviews"].update(users=counts.users, items=len(review_items))
    lap("sort_dedup")

    # 3. Metadata of the review items: one row per item with meta, collected to the driver (per-item table).
    meta_items = META_SCHEMA.empty_table().select(META_ITEM_COLUMNS)
    meta_report: dict[str, Any] = {"files": [], "lines": 0}
    if meta_files:
        meta_source = json_lines_datasource(meta_files)
        meta_paths = meta_source.file_paths()
        meta_rows = _collect(
            ray.data.read_datasource(meta_source, override_num_blocks=len(meta_paths), num_cpus=READ_CPUS)
            .map_batches(
                _parse_meta_block,
                fn_kwargs={"wanted": ray.put(review_items), "word_limits": word_limits,
                           "sample": options.malformed_sample, "n_buckets": 4 * partitions},
                batch_format="pyarrow", batch_size=None, num_cpus=PARSE_CPUS,
            )
            .repartition(partitions)
            .groupby("bucket", num_partitions=partitions)
            .map_groups(_dedupe_meta_bucket, batch_format="pyarrow"),
            META_SCHEMA,
        )
        is_item = pc.invert(_is_status_row(meta_rows))
        meta_report = _summary(meta_rows.filter(pc.invert(is_item)).select(STATUS_COLUMNS.names),
                               options.malformed_sample, meta_paths)
        meta_report["matched_lines"] = meta_report.pop("parsed")
        meta_items = meta_rows.filter(is_item).select(META_ITEM_COLUMNS).sort_by("item_id")
        meta_report["duplicate_lines_dropped"] = meta_report["matched_lines"] - meta_items.num_rows
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
    banned = pa.array([], pa.string())
    min_user = 0
    if options.drop_missing_title and len(untitled):
        banned, min_user = untitled, 1
        after = _count_items(users, partitions, ray.put(banned), min_user)
        report["title_filter"].update(items_dropped=len(untitled), events_dropped=counts.rows - after.rows,
                                      users_dropped=counts.users - after.users)
        counts = after
    lap("title_filter")

    # 5. Iterative k-core. Round r removes the items below min_item_count, then the users left below
    # min_user_count. Removal is monotone, so the state after round r is `users` filtered once by the union of
    # all items removed so far (and the user minimum): each round is one pass over `users`, nothing in between
    # is materialized, and only the per-item counts come back to the driver.
    rounds = []
    while True:
        below = counts.items.filter(pc.less(counts.items.column("count"), options.min_item_count)).column("item_id")
        entry = {"round": len(rounds), "rows": counts.rows, "users": counts.users, "items": counts.items.num_rows,
                 "items_below_min": len(below)}
        rounds.append(entry)
        log.info("k-core round %d: %d rows, %d users, %d items (%d items below min)", entry["round"],
                 entry["rows"], entry["users"], entry["items"], len(below))
        if counts.users == 0 or (len(below) == 0 and counts.min_len >= options.min_user_count):
            break
        banned = pa.concat_arrays([banned, below.combine_chunks()])
        min_user = options.min_user_count
        counts = _count_items(users, partitions, ray.put(banned), min_user)
    final = rounds[-1]
    report["kcore"] = {"min_user_count": options.min_user_count, "min_item_count": options.min_item_count,
                       "rounds": rounds, "iterations": len(rounds) - 1}
    if final["users"] == 0:
        raise ValueError(
            f"no interactions left after the {options.min_user_count}/{options.min_item_count} k-core filter "
            f"(and title filter); report so far: {json.dumps(report, default=str)[:2000]}"
        )
    lap("kcore")

    # 6. Long sequences; the final per-user sequences come to the driver (they are the output tables).
    final_users = users
    if len(banned) or min_user:
        final_users = final_users.map_batches(
            _filter_users_block, fn_kwargs={"banned_items": ray.put(banned), "min_user": min_user},
            batch_format="pyarrow", batch_size=None,
        )
    if options.max_len is not None:
        final_users = final_users.map_batches(
            _limit_length_block, fn_kwargs={"max_len": options.max_len, "mode": options.long_sequences},
            batch_format="pyarrow", batch_size=None,
        )
    sequences = _collect(final_users, USER_ROW_SCHEMA)
    del users, final_users
    cut = sequences.column("cut").to_numpy()
    lengths = sequences.column("n").to_numpy()
    limit = {"max_len": options.max_len, "mode": options.long_sequences,
             "users_trimmed": int((cut > 0).sum()), "events_trimmed": int(cut.sum()),
             "users_filtered": final["users"] - sequences.num_rows}
    limit["events_filtered"] = final["rows"] - int(lengths.sum()) - limit["events_trimmed"]
    report["long_sequences"] = limit
    lap("long_sequences")

    # 7. Dense indices, items table, split, write.
    items, seq_table, splits = _assemble(sequences, meta_items, options)
    title_sources = items.column("title_source").to_pylist()
    title_counts = {s: title_sources.count(s) for s in TITLE_SOURCES}
    report["final"] = {
        "users": seq_table.num_rows,
        "items": items.num_rows,
        "interactions": int(lengths.sum()),
        "items_with_meta": int(pc.sum(pc.is_in(items.column("item_id"), value_set=meta_items.column("item_id"))).as_py() or 0),
        "title_source": title_counts,
        "fallback_titles": title_counts["description"] + title_counts["brand_category"],
        "invalid_prices_dropped": int(pc.sum(items.column("price_invalid")).as_py() or 0),
    }
    report["timings_s"] = timings
    # nodes per Ray Data operator, and all of them: the driver's node too when it ran tasks (a one-node run: one)
    report["placement"] = {"nodes": sorted(set().union(*_placement.values())),
                           "operators": {op: sorted(nodes) for op, nodes in _placement.items()}}
    meta_json = {
        "source": SOURCE,
        "name": name,
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
            + [META_SCHEMA.field(name) for name in META_ITEM_COLUMNS if name != "item_idx"]
        ),
    )
    seqs = np.split(item_index.to_numpy(), np.cumsum(lengths)[:-1]) if len(lengths) else []
    splits = split_tables(leave_one_out(user_idx, seqs, SplitOptions(min_eval_len=options.min_eval_len)))
    return items, seq_table, splits
