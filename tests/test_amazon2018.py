"""The amazon2018 raw-data pipeline (Ray Data): real raw sample, garbage lines, dedup, k-core, long sequences."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from seqrec.data.amazon2018 import Amazon2018Options, _as_file_list, find_raw_files, prepare_amazon2018
from seqrec.data.dataset import PreparedDataset

CATEGORY = "Magazine_Subscriptions"


def _write_lines(path: Path, lines: list[bytes]) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _review(user: str, item: str, ts, rating: float = 5.0, text: str = "ok") -> bytes:
    return json.dumps(
        {"reviewerID": user, "asin": item, "unixReviewTime": ts, "overall": rating, "reviewText": text}
    ).encode()


def _no_filter(**kwargs) -> Amazon2018Options:
    return Amazon2018Options(min_user_count=1, min_item_count=1, **kwargs)


def _sequences_by_user(ds: PreparedDataset) -> dict[str, list[str]]:
    item_ids = ds.item_ids()
    users = ds.sequences.column("user_id").to_pylist()
    return {u: [item_ids[i] for i in seq] for u, seq in zip(users, ds.full_sequences())}


@pytest.fixture(scope="module")
def raw_sample(shared_data) -> tuple[list[Path], list[Path]]:
    return find_raw_files(shared_data / "raw_sample")


@pytest.fixture(scope="module")
def prepared_sample(ray_session, raw_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("amazon2018_sample")
    reviews, meta = raw_sample
    report = prepare_amazon2018(reviews, meta, out, Amazon2018Options())
    return out, report


def test_find_raw_files(raw_sample, tmp_path):
    reviews, meta = raw_sample
    assert [p.name for p in reviews] == [f"{CATEGORY}_5.json.gz"]
    assert [p.name for p in meta] == [f"meta_{CATEGORY}.json.gz"]
    # Without a 5-core file, a full review file is used; meta files are never reviews.
    _write_lines(tmp_path / "Books.json", [_review("u", "i", 1)])
    _write_lines(tmp_path / "meta_Books.json.gz", [b"{}"])
    (tmp_path / "notes.txt").write_text("x")
    assert find_raw_files(tmp_path) == ([tmp_path / "Books.json"], [tmp_path / "meta_Books.json.gz"])
    # prepare_amazon2018 also takes directories (and URIs, passed through to Ray Data).
    assert _as_file_list(tmp_path, "reviews") == [tmp_path / "Books.json"]
    assert _as_file_list(str(tmp_path), "meta") == [tmp_path / "meta_Books.json.gz"]
    assert _as_file_list(["s3://bucket/Books_5.json.gz"], "reviews") == ["s3://bucket/Books_5.json.gz"]
    with pytest.raises(FileNotFoundError):
        find_raw_files(tmp_path / "missing")


def test_raw_sample_report_and_layout(prepared_sample, raw_sample):
    out, report = prepared_sample
    reviews = report["reviews"]
    assert (reviews["lines"], reviews["parsed"], reviews["malformed"], reviews["blank_lines"]) == (2375, 2375, 0, 0)
    assert (reviews["users"], reviews["items"]) == (348, 157)

    # Dedup count, checked independently on the raw lines.
    keys = Counter()
    with gzip.open(raw_sample[0][0], "rt") as f:
        for line in f:
            r = json.loads(line)
            keys[(r["reviewerID"], r["asin"], r.get("overall"), r.get("reviewText", ""), r["unixReviewTime"])] += 1
    expected_dups = sum(c - 1 for c in keys.values())
    assert report["dedup"]["removed"] == expected_dups
    assert report["dedup"]["events_after"] == 2375 - expected_dups

    rounds = report["kcore"]["rounds"]
    assert rounds[0] == {"round": 0, "rows": 2375 - expected_dups, "users": 348, "items": 157,
                         "items_below_min": rounds[0]["items_below_min"]}
    assert rounds[-1]["items_below_min"] == 0
    for before, after in zip(rounds, rounds[1:]):
        assert before["items_below_min"] > 0
        assert after["rows"] < before["rows"] and after["users"] <= before["users"]
        assert after["items"] <= before["items"] - before["items_below_min"]

    meta = report["meta"]
    assert meta["lines"] == 3385 and meta["malformed"] == 0
    assert meta["review_items"] == 157
    assert (meta["review_items_with_meta"], meta["review_items_without_meta"]) == (151, 6)
    assert meta["matched_lines"] - meta["duplicate_lines_dropped"] == 151

    ds = PreparedDataset.load(out)
    assert ds.meta["source"] == "amazon2018" and ds.meta["name"] == CATEGORY
    assert ds.meta["report"]["final"] == report["final"]
    final = report["final"]
    assert (ds.n_users, ds.n_items) == (final["users"], final["items"]) == (rounds[-1]["users"], rounds[-1]["items"])
    assert ds.meta["counts"]["interactions"] == final["interactions"] == rounds[-1]["rows"]
    assert sum(final["title_source"].values()) == final["items"]
    assert final["fallback_titles"] == final["title_source"]["description"] + final["title_source"]["brand_category"]
    # SOURCES.md: only a handful of the review items have a clean title, the rest need a fallback.
    assert final["title_source"]["title"] <= 6 and final["fallback_titles"] > 100

    items = ds.items.to_pydict()
    assert items["item_idx"] == list(range(ds.n_items))
    assert items["item_id"] == sorted(items["item_id"])
    assert all(t.startswith("Title: ") and " Category: " in t for t in items["text"])
    assert all("<" not in t and "&amp;" not in t for t in items["title"] + items["text"])
    assert sum(1 for t in items["title"] if t) == final["items"] - final["title_source"]["none"]

    seqs = ds.full_sequences()
    assert ds.sequences.column("user_idx").to_pylist() == list(range(ds.n_users))
    users = ds.sequences.column("user_id").to_pylist()
    assert users == sorted(users)
    flat = np.concatenate(seqs)
    assert flat.min() == 0 and flat.max() == ds.n_items - 1
    # k-core property holds on the output.
    assert min(len(s) for s in seqs) >= 5 and np.bincount(flat).min() >= 5
    for ts in ds.sequences.column("timestamps").to_pylist():
        assert ts == sorted(ts)

    test, valid, train = ds.eval_rows("test"), ds.eval_rows("valid"), ds.train_sequences()
    assert len(test) == len(valid) == ds.n_users
    for u, seq in enumerate(seqs):
        assert test.targets[u] == seq[-1] and valid.targets[u] == seq[-2]
        assert list(test.histories[u]) == list(seq[:-1]) and list(train[u]) == list(seq[:-2])


def test_garbage_lines_are_counted_not_fatal(prepared_sample, raw_sample, tmp_path):
    clean_out, clean_report = prepared_sample
    reviews, meta = raw_sample
    with gzip.open(reviews[0], "rb") as f:
        lines = f.read().splitlines()
    malformed = {
        10: b'{"reviewerID": "A1", "asin": "B000", "unixReviewTime": 12',  # truncated JSON
        500: b"\xff\xfe\x00\x81\x9c binary junk \xc3\x28 \x00\x00",  # invalid UTF-8 / binary
        900: b'{"reviewerID": "A5QQOOZJOVPSF", "unixReviewTime": 1393372800}',  # no asin
        1400: b'{"reviewerID": "A5QQOOZJOVPSF", "asin": "B00005N7P0", "unixReviewTime": "yesterday"}',
        2000: b"[1, 2, 3]",  # JSON, not an object
    }
    blank = {20: b"", 1000: b"   ", 1500: b"\r"}
    garbage = []
    for i, line in enumerate(lines):
        for extra in (malformed, blank):
            if i in extra:
                garbage.append(extra[i])
        garbage.append(line)
    garbage.append(b"{not json at all")  # last line, no trailing newline
    path = tmp_path / f"{CATEGORY}_5.json"  # plain (not gz) this time
    path.write_bytes(b"\n".join(garbage))

    report = prepare_amazon2018([path], meta, tmp_path / "out", Amazon2018Options(malformed_sample=3))
    r = report["reviews"]
    assert r["malformed"] == len(malformed) + 1
    assert r["blank_lines"] == len(blank)
    assert r["parsed"] == 2375 and r["lines"] == 2375 + len(malformed) + 1 + len(blank)
    assert r["malformed_by_reason"] == {"bad_json": 3, "not_object": 1, "missing_id": 1, "bad_time": 1}
    sample = r["malformed_sample"]
    assert len(sample) == 3 and [s["line"] for s in sample] == sorted(s["line"] for s in sample)
    assert sample[0]["reason"] == "bad_json" and sample[0]["text"].startswith('{"reviewerID": "A1"')
    assert all(s["file"].endswith(path.name) for s in sample)
    # The garbage changes nothing else.
    assert report["final"] == clean_report["final"] and report["kcore"] == clean_report["kcore"]
    assert _sequences_by_user(PreparedDataset.load(tmp_path / "out")) == _sequences_by_user(
        PreparedDataset.load(clean_out)
    )


def test_dedup_sort_and_meta_fields(ray_session, tmp_path):
    reviews = _write_lines(
        tmp_path / "Tiny_5.json.gz",
        [
            _review("U1", "I3", 300, text="third"),
            _review("U1", "I1", 100, text="first"),
            _review("U1", "I2", 200, text="second"),
            _review("U1", "I2", 200, text="second"),  # exact duplicate -> dropped
            _review("U1", "I1", 400, text="first"),  # re-purchase later, same text and rating -> kept
            _review("U1", "I4", 500),  # no meta line
            _review("U2", "I2", 50, text="a"),
            _review("U2", "I2", 50, text="b"),  # same time, different text -> kept
            _review("U2", "I1", 50, rating=4.0, text="x"),  # same time: ties broken by asin
            _review("U2", "I3", 60),
        ],
    )
    html_title = '<span class="a-size-medium a-color-secondary"'
    meta_lines = [
        {"asin": "I1", "title": "Clean &amp; Simple", "brand": "Acme", "category": ["Books", "Arts &amp; Music"],
         "price": "$12.99", "description": ["<b>Great</b> book.", "More text."]},
        {"asin": "I2", "title": html_title, "brand": "Beta", "category": ["Books", "Poetry"], "price": "",
         "description": ["A poem collection. With extras."]},
        {"asin": "I2", "title": html_title, "brand": "Beta", "category": ["Books", "Poetry"], "price": "",
         "description": ["A poem collection. With extras."]},  # duplicate meta line
        {"asin": "I3", "title": html_title, "brand": "Gamma", "category": ["Books", "Maps"],
         "price": ".a-box-inner{background-color:#fff}", "description": []},
        {"asin": "I9", "title": "Not reviewed"},
    ]
    meta = _write_lines(tmp_path / "meta_Tiny.json.gz", [json.dumps(m).encode() for m in meta_lines])
    report = prepare_amazon2018(reviews, meta, tmp_path / "out", _no_filter())

    assert report["dedup"]["removed"] == 1
    ds = PreparedDataset.load(tmp_path / "out")
    assert _sequences_by_user(ds) == {"U1": ["I1", "I2", "I3", "I1", "I4"], "U2": ["I1", "I2", "I2", "I3"]}
    assert ds.sequences.column("timestamps").to_pylist() == [[100, 200, 300, 400, 500], [50, 50, 50, 60]]

    assert report["meta"]["matched_lines"] == 4 and report["meta"]["duplicate_lines_dropped"] == 1
    assert report["meta"]["unmatched"] == 1
    items = {row["item_id"]: row for row in ds.items.to_pylist()}
    assert items["I1"]["title"] == "Clean & Simple"
    assert items["I1"]["categories"] == ["Books", "Arts & Music"]
    assert items["I1"]["price"] == "$12.99" and items["I1"]["description"] == "Great book. More text."
    assert items["I1"]["text"] == "Title: Clean & Simple Category: Books > Arts & Music Brand: Acme Price: $12.99"
    assert items["I2"]["title"] == "A poem collection."  # first sentence of the description
    assert items["I3"]["title"] == "Gamma Maps" and items["I3"]["price"] == ""  # brand + category tail
    assert items["I4"]["text"] == "Title: Unknown Category: Unknown Brand: Unknown Price: Unknown"
    assert report["final"]["title_source"] == {"title": 1, "description": 1, "brand_category": 1, "none": 1}
    assert report["final"]["fallback_titles"] == 2 and report["final"]["invalid_prices_dropped"] == 1
    assert report["meta"]["review_items_without_meta"] == 1

    other = prepare_amazon2018(
        reviews, meta, tmp_path / "out2", _no_filter(dedup=False, drop_missing_title=True, calrec_truncation=True)
    )
    assert other["dedup"]["removed"] == 0
    assert other["title_filter"] == {"enabled": True, "items_without_title": 1, "items_dropped": 1,
                                     "events_dropped": 1, "users_dropped": 0}
    ds2 = PreparedDataset.load(tmp_path / "out2")
    assert _sequences_by_user(ds2)["U1"] == ["I1", "I2", "I2", "I3", "I1"]
    assert ds2.item_ids() == ["I1", "I2", "I3"]


def test_kcore_known_answer(ray_session, tmp_path):
    # k=2: w (1 event) goes in round 1, which leaves D with one event; then z has one event, which leaves C
    # with one event; A and B with x, y remain.
    rows = [("A", "x"), ("A", "y"), ("B", "x"), ("B", "y"), ("C", "y"), ("C", "z"), ("D", "z"), ("D", "w")]
    reviews = _write_lines(tmp_path / "K_5.json", [_review(u, i, t) for t, (u, i) in enumerate(rows)])
    report = prepare_amazon2018(
        reviews, None, tmp_path / "out", Amazon2018Options(min_user_count=2, min_item_count=2)
    )
    summary = [(r["rows"], r["users"], r["items"], r["items_below_min"]) for r in report["kcore"]["rounds"]]
    assert summary == [(8, 4, 4, 1), (6, 3, 3, 1), (4, 2, 2, 0)]
    ds = PreparedDataset.load(tmp_path / "out")
    assert _sequences_by_user(ds) == {"A": ["x", "y"], "B": ["x", "y"]}
    assert ds.item_ids() == ["x", "y"]
    assert report["meta"]["review_items_without_meta"] == 4
    assert set(ds.item_texts()) == {"Title: Unknown Category: Unknown Brand: Unknown Price: Unknown"}

    with pytest.raises(ValueError, match="no interactions left"):
        prepare_amazon2018(reviews, None, tmp_path / "empty", Amazon2018Options(min_user_count=9))


@pytest.mark.parametrize("mode", ["trim", "filter"])
def test_long_sequences(ray_session, tmp_path, mode):
    rows = [_review("short", f"i{k}", k) for k in range(3)] + [_review("long", f"i{k}", 10 + k) for k in range(6)]
    reviews = _write_lines(tmp_path / "L_5.json", rows)
    report = prepare_amazon2018(reviews, None, tmp_path / "out", _no_filter(max_len=4, long_sequences=mode),
                                name=f"long-{mode}")
    ds = PreparedDataset.load(tmp_path / "out")
    assert ds.name == f"long-{mode}"
    seqs = _sequences_by_user(ds)
    limit = report["long_sequences"]
    if mode == "trim":
        assert seqs == {"short": ["i0", "i1", "i2"], "long": ["i2", "i3", "i4", "i5"]}
        assert (limit["users_trimmed"], limit["events_trimmed"], limit["users_filtered"]) == (1, 2, 0)
        assert report["final"]["interactions"] == 7
    else:
        assert seqs == {"short": ["i0", "i1", "i2"]}
        assert (limit["users_trimmed"], limit["users_filtered"], limit["events_filtered"]) == (0, 1, 6)
        assert report["final"]["interactions"] == 3
