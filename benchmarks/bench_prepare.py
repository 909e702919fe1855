"""Benchmark: `prepare_amazon2018` on Ray Data vs a single-process pandas baseline doing the same steps.

The raw sample (Magazine_Subscriptions, 2,375 reviews) is replicated with new reviewer ids and ASINs
(`{id}-{replica}`) up to `--reviews` lines; the meta lines of the review items (duplicates included) are
replicated the same way. Generated files go to `--workdir` (a temp dir by default), never into the repo.

Both pipelines parse with the same line parsers (`parse_review_line`, `meta_record`) and write with the same
`write_prepared`, and the outputs are compared (`outputs_match`). Rows/s = input review lines / wall seconds.

    python benchmarks/bench_prepare.py --reviews 200000
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from seqrec.data.amazon2018 import (  # noqa: E402
    BLANK,
    OK,
    Amazon2018Options,
    _load_object,
    empty_item_record,
    find_raw_files,
    iter_raw_lines,
    meta_record,
    parse_review_line,
    prepare_amazon2018,
)
from seqrec.data.dataset import SplitOptions, leave_one_out, split_tables, write_prepared  # noqa: E402

log = logging.getLogger("bench_prepare")


# ----------------------------------------------------------------------------------------------------------
# Data generation
# ----------------------------------------------------------------------------------------------------------


def generate(raw_dir: Path, workdir: Path, n_reviews: int, compress: bool = True) -> tuple[Path, Path, dict]:
    """Replicate the raw sample to `n_reviews` review lines (and the matching meta lines)."""
    reviews_src, meta_src = find_raw_files(raw_dir)
    suffix = ".json.gz" if compress else ".json"
    reviews_out = workdir / f"Bench_{n_reviews}_5{suffix}"
    meta_out = workdir / f"meta_Bench_{n_reviews}{suffix}"
    info_path = workdir / f"bench_{n_reviews}{suffix}.info.json"
    if reviews_out.exists() and meta_out.exists() and info_path.exists():
        log.info("reusing generated files in %s", workdir)
        return reviews_out, meta_out, json.loads(info_path.read_text())

    review_templates, items = [], set()
    for path in reviews_src:
        for line in iter_raw_lines(path):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            obj = json.loads(line)
            items.add(obj["asin"])
            line = re.sub(rb'"reviewerID": "([^"]+)"', rb'"reviewerID": "\1-%R%"', line, count=1)
            line = re.sub(rb'"asin": "([^"]+)"', rb'"asin": "\1-%R%"', line, count=1)
            review_templates.append(line + b"\n")
    meta_templates = []
    for path in meta_src:
        for line in iter_raw_lines(path):
            status, obj = _load_object(line)
            if status == OK and obj.get("asin") in items:
                line = line.rstrip(b"\r\n")
                meta_templates.append(re.sub(rb'"asin": "([^"]+)"', rb'"asin": "\1-%R%"', line, count=1) + b"\n")
    replicas = math.ceil(n_reviews / len(review_templates))
    opener = (lambda p: gzip.open(p, "wb", compresslevel=1)) if compress else (lambda p: open(p, "wb"))
    t0 = time.perf_counter()
    written = 0
    with opener(reviews_out) as f:
        for r in range(replicas):
            tag = str(r).encode()
            chunk = [t.replace(b"%R%", tag) for t in review_templates[: n_reviews - written]]
            f.write(b"".join(chunk))
            written += len(chunk)
    with opener(meta_out) as f:
        for r in range(replicas):
            tag = str(r).encode()
            f.write(b"".join(t.replace(b"%R%", tag) for t in meta_templates))
    info = {
        "reviews": written,
        "meta_lines": replicas * len(meta_templates),
        "replicas": replicas,
        "reviews_file_bytes": reviews_out.stat().st_size,
        "meta_file_bytes": meta_out.stat().st_size,
        "compressed": compress,
        "generate_s": round(time.perf_counter() - t0, 2),
    }
    info_path.write_text(json.dumps(info))
    log.info("generated %s", info)
    return reviews_out, meta_out, info


# ----------------------------------------------------------------------------------------------------------
# Single-process pandas baseline: the same steps and rules, no Ray
# ----------------------------------------------------------------------------------------------------------


def prepare_pandas(reviews: Path, meta: Path | None, out_dir: Path, options: Amazon2018Options) -> dict:
    timings = {}
    t0 = time.perf_counter()

    def lap(name):
        nonlocal t0
        now = time.perf_counter()
        timings[name] = round(now - t0, 3)
        t0 = now

    # parse
    users, items, stamps, ratings, hashes, linenos = [], [], [], [], [], []
    malformed = blank = 0
    for lineno, raw in enumerate(iter_raw_lines(reviews), start=1):
        status, user, item, ts, rating, thash = parse_review_line(raw)
        if status == OK:
            users.append(user)
            items.append(item)
            stamps.append(ts)
            ratings.append(np.nan if rating is None else rating)
            hashes.append(thash)
            linenos.append(lineno)
        elif status == BLANK:
            blank += 1
        else:
            malformed += 1
    df = pd.DataFrame({"user_id": users, "item_id": items, "ts": np.array(stamps, np.int64),
                       "rating": np.array(ratings, np.float64), "text_hash": np.array(hashes, np.int64),
                       "lineno": np.array(linenos, np.int64)})
    del users, items, stamps, ratings, hashes, linenos
    lap("parse_reviews")

    # sort + dedup
    df = df.sort_values(["user_id", "ts", "item_id", "rating", "text_hash", "lineno"], kind="stable",
                        na_position="last", ignore_index=True)
    n_before = len(df)
    if options.dedup:
        df = df.drop_duplicates(["user_id", "item_id", "ts", "rating", "text_hash"], ignore_index=True)
    dups = n_before - len(df)
    lap("sort_dedup")

    # meta
    review_items = set(df["item_id"].unique())
    records, keys = [], []
    if meta is not None:
        for lineno, raw in enumerate(iter_raw_lines(meta), start=1):
            status, obj = _load_object(raw)
            if status != OK:
                continue
            asin = obj.get("asin")
            if not isinstance(asin, str) or asin.strip() not in review_items:
                continue
            rec = meta_record(obj, options.word_limits)
            records.append(rec)
            keys.append(lineno)
    meta_df = pd.DataFrame(records, columns=list(empty_item_record("x", None).keys()))
    meta_df["lineno"] = keys
    meta_df = meta_df.sort_values(["item_id", "priority", "lineno"], kind="stable").drop_duplicates("item_id")
    lap("meta")

    if options.drop_missing_title:
        titled = set(meta_df.loc[meta_df["title_source"] != "none", "item_id"])
        df = df[df["item_id"].isin(titled)]
    lap("title_filter")

    # k-core: remove items below min, then users below min, until stable
    rounds = 0
    while True:
        item_counts = df["item_id"].value_counts()
        bad_items = item_counts.index[item_counts < options.min_item_count]
        user_counts = df["user_id"].value_counts()
        if len(bad_items) == 0 and (user_counts >= options.min_user_count).all():
            break
        df = df[~df["item_id"].isin(bad_items)]
        user_counts = df["user_id"].value_counts()
        df = df[df["user_id"].isin(user_counts.index[user_counts >= options.min_user_count])]
        rounds += 1
    lap("kcore")

    # sequences (df is still sorted by user, time, asin) + long sequences
    df = df.reset_index(drop=True)
    if options.max_len is not None:
        pos_from_end = df.groupby("user_id", sort=False).cumcount(ascending=False)
        if options.long_sequences == "trim":
            df = df[pos_from_end < options.max_len]
        else:
            lengths = df.groupby("user_id", sort=False)["item_id"].transform("size")
            df = df[lengths <= options.max_len]
    lap("long_sequences")

    item_ids = np.sort(df["item_id"].unique())
    user_ids = np.sort(df["user_id"].unique())
    item_idx = np.searchsorted(item_ids, df["item_id"].to_numpy()).astype(np.int32)
    user_idx = np.searchsorted(user_ids, df["user_id"].to_numpy())
    order = np.argsort(user_idx, kind="stable")
    item_idx, user_idx, ts = item_idx[order], user_idx[order], df["ts"].to_numpy()[order]
    lengths = np.bincount(user_idx, minlength=len(user_ids))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    sequences = pa.table({
        "user_idx": pa.array(np.arange(len(user_ids), dtype=np.int32)),
        "user_id": pa.array(user_ids.tolist(), pa.string()),
        "items": pa.ListArray.from_arrays(offsets, pa.array(item_idx)),
        "timestamps": pa.ListArray.from_arrays(offsets, pa.array(ts, pa.int64())),
    })
    meta_by_id = {r["item_id"]: r for r in meta_df.to_dict("records")}
    rows = []
    for i, item_id in enumerate(item_ids.tolist()):
        rec = dict(meta_by_id.get(item_id) or empty_item_record(item_id, options.word_limits))
        rec["item_idx"] = i
        rows.append(rec)
    items_table = pa.Table.from_pylist(
        [{k: r[k] for k in ("item_idx", "item_id", "title", "brand", "categories", "price", "description", "text")}
         for r in rows]
    )
    seqs = np.split(item_idx, np.cumsum(lengths)[:-1])
    splits = split_tables(leave_one_out(np.arange(len(user_ids)), seqs, SplitOptions(options.min_eval_len)))
    write_prepared(out_dir, items_table, sequences, splits,
                   {"source": "amazon2018-pandas-baseline", "options": asdict(options),
                    "report": {"malformed": malformed, "blank": blank, "dedup": dups, "kcore_rounds": rounds}})
    lap("assemble_write")
    return {"timings_s": timings, "dedup": dups, "kcore_rounds": rounds, "malformed": malformed}


def outputs_match(a: Path, b: Path) -> bool:
    for rel in ("items.parquet", "sequences.parquet", "splits/train.parquet", "splits/valid.parquet",
                "splits/test.parquet"):
        ta, tb = pq.read_table(a / rel), pq.read_table(b / rel)
        if not ta.equals(tb):
            log.warning("%s differs between the Ray and the pandas outputs", rel)
            return False
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviews", type=int, default=1_000_000, help="review lines to generate")
    parser.add_argument("--workdir", type=Path, default=None, help="where generated files go (default: a temp dir)")
    parser.add_argument("--raw-dir", type=Path,
                        default=Path(os.environ.get("SEQREC_SHARED_DATA", REPO.parent / "shared" / "data")) / "raw_sample")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "prepare.json")
    parser.add_argument("--address", default=None, help="Ray address (default: a local instance)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    parser.add_argument("--plain", action="store_true", help="generate uncompressed files")
    parser.add_argument("--baseline-nice", type=int, default=0,
                        help="run the pandas baseline in a child process at this niceness (Ray workers run at "
                             "nice 19; on a shared machine a nice-0 baseline gets more CPU than they do)")
    parser.add_argument("--skip-pandas", action="store_true")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the generated files and outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_prepare_")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    options = Amazon2018Options()
    result = {"reviews_requested": args.reviews, "options": asdict(options), "cpu_count": os.cpu_count(),
              "load_avg_start": list(os.getloadavg())}
    try:
        reviews, meta, info = generate(args.raw_dir, workdir, args.reviews, compress=not args.plain)
        result["generated"] = info
        n = info["reviews"]
        if not args.skip_pandas:
            shutil.rmtree(workdir / "out_pandas", ignore_errors=True)
            t = time.perf_counter()
            if args.baseline_nice:
                from concurrent.futures import ProcessPoolExecutor

                with ProcessPoolExecutor(1, initializer=os.nice, initargs=(args.baseline_nice,)) as pool:
                    pandas_report = pool.submit(prepare_pandas, reviews, meta, workdir / "out_pandas", options).result()
            else:
                pandas_report = prepare_pandas(reviews, meta, workdir / "out_pandas", options)
            seconds = time.perf_counter() - t
            result["pandas"] = {"seconds": round(seconds, 2), "rows_per_s": round(n / seconds),
                                "nice": args.baseline_nice, **pandas_report}
        if not args.skip_ray:
            from seqrec.ray_utils import init_ray

            t = time.perf_counter()
            for attempt in range(3):  # a local start can time out on a heavily loaded machine
                try:
                    ray = init_ray(args.address, num_cpus=args.num_cpus)
                    break
                except Exception as exc:  # noqa: BLE001
                    log.warning("ray.init failed (%s), retrying", exc)
                    import ray as _ray

                    _ray.shutdown()
                    time.sleep(5)
            else:
                raise RuntimeError("could not start Ray")
            ray.data.DataContext.get_current().enable_progress_bars = False
            init_s = time.perf_counter() - t
            shutil.rmtree(workdir / "out_ray", ignore_errors=True)
            t = time.perf_counter()
            report = prepare_amazon2018(reviews, meta, workdir / "out_ray", options)
            seconds = time.perf_counter() - t
            result["ray"] = {"seconds": round(seconds, 2), "rows_per_s": round(n / seconds),
                             "ray_init_s": round(init_s, 2), "cluster_cpus": ray.cluster_resources().get("CPU"),
                             "timings_s": report["timings_s"], "dedup": report["dedup"]["removed"],
                             "kcore_rounds": report["kcore"]["iterations"], "final": report["final"]}
        if not args.skip_pandas and not args.skip_ray:
            result["outputs_match"] = outputs_match(workdir / "out_ray", workdir / "out_pandas")
        result["load_avg_end"] = list(os.getloadavg())
    finally:
        if own_workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    for name in ("ray", "pandas"):
        if name in result:
            print(f"{name:>6}: {result[name]['seconds']:8.2f} s  {result[name]['rows_per_s']:>10,} rows/s")
    if "outputs_match" in result:
        print(f"outputs match: {result['outputs_match']}")
    print(f"result written to {args.out}")
    return result


if __name__ == "__main__":
    main()
