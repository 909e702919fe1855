"""BM25 and QRR timings: rank_bm25 (reference) vs seqrec's sparse BM25Index, with bm25s for reference.

Sizes: '4k' is the real Scientific catalog (all item texts of Scientific.text, formatted as the datasets
format them: 'Title: .. Category: .. Brand: .. Price: ..'); larger sizes are synthesised by recombining the
real catalog's vocabulary: title words drawn from the empirical (Zipf-like) title-word distribution plus a
random model number half the time, a real category path, a real brand (70%) or a synthetic one, and a price
half the time, all through the same template. Queries are other item texts (as in LIR-BM25 and in QRR,
whose 'samples' are generated item texts).

Per size it reports: build time; per-query latency of the fast path (single query) and of rank_bm25 /
bm25s (a few queries at the large sizes: rank_bm25 loops over every document per query token); the
speed-up; max |fast - rank_bm25| on the timed queries; an add_or_update of 100 items; QRR over 10 texts,
either 10 random item texts or 10 texts of one category (closer to one user's samples, which share the
category words): p50/p95 wall ms and p50 CPU ms (less sensitive to other processes on a shared machine).

    python benchmarks/bench_bm25.py                       # 4k, 50k, 400k
    python benchmarks/bench_bm25.py --sizes 4k,50k --qrr-reps 30
Writes benchmarks/results/bm25.json (see --out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform as py_platform
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    import seqrec  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "platform"))

from seqrec.data.text import format_item_text  # noqa: E402
from seqrec.data.unisrec import split_unisrec_text  # noqa: E402
from seqrec.retrieval.bm25 import BM25Index, tokenize  # noqa: E402
from seqrec.retrieval.qrr import quasi_round_robin  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("SEQREC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


# ---------------------------------------------------------------------------------------------- corpora
def load_real(data_dir: Path) -> list[tuple[str, str, str]]:
    """(title, category path, brand) of every Scientific item."""
    path = data_dir / "Scientific" / "Scientific.text"
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for no, line in enumerate(fh):
            if no == 0 and line.startswith("item_id"):
                continue
            parts = line.rstrip("\n").split("\t", 1)
            if len(parts) == 2:
                out.append(split_unisrec_text(parts[1]))
    return out


def synthesise(real: list[tuple[str, str, str]], n: int, seed: int = 0) -> list[str]:
    """n product-like texts recombined from the real catalog's title words, categories and brands."""
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for title, _, _ in real:
        for w in title.split():
            counts[w] = counts.get(w, 0) + 1
    words = np.array(list(counts), dtype=object)
    p = np.array(list(counts.values()), dtype=np.float64)
    p /= p.sum()
    cats = [c or "Unknown" for _, c, _ in real]
    brands = [b or "Unknown" for _, _, b in real]
    n_words = rng.integers(4, 20, n)
    drawn = words[rng.choice(len(words), size=int(n_words.sum()), p=p)]
    ends = np.cumsum(n_words)
    has_model = rng.random(n) < 0.5
    models = rng.integers(10_000, 1_000_000_000, n)
    cat_idx = rng.integers(len(cats), size=n)
    real_brand = rng.random(n) < 0.7
    brand_idx = rng.integers(len(brands), size=n)
    synth_brand = rng.integers(max(1, n // 20), size=n)
    has_price = rng.random(n) < 0.5
    prices = rng.integers(100, 50_000, n) / 100.0
    out = []
    start = 0
    for i in range(n):
        title = " ".join(drawn[start:ends[i]])
        start = ends[i]
        if has_model[i]:
            title += f" {models[i]}"
        brand = brands[brand_idx[i]] if real_brand[i] else f"Brand{synth_brand[i]}"
        price = f"${prices[i]:.2f}" if has_price[i] else "Unknown"
        out.append(f"Title: {title} Category: {cats[cat_idx[i]]} Brand: {brand} Price: {price}")
    return out


def corpus_for(size: str, real) -> list[str]:
    if size == "4k":
        return [format_item_text(t, c, b) for t, c, b in real]
    n = int(float(size[:-1]) * 1000) if size.endswith("k") else int(size)
    return synthesise(real, n, seed=n)


# ---------------------------------------------------------------------------------------------- timing
def pct(values, q):
    return float(np.percentile(np.asarray(values) * 1e3, q)) if len(values) else float("nan")


def timed(fn, reps: int):
    """(wall seconds list, cpu seconds list, last result)."""
    walls, cpus, res = [], [], None
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        res = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return walls, cpus, res


def bench_size(size: str, real, args) -> dict:
    rng = np.random.default_rng(123)
    corpus = corpus_for(size, real)
    n = len(corpus)
    query_pool = synthesise(real, 2000, seed=999_999) if size != "4k" else None
    # queries: other items' texts (held out from the synthetic corpus; from the catalog itself at 4k)
    pick = lambda k: [query_pool[i] for i in rng.integers(len(query_pool), size=k)] if query_pool else [
        corpus[i] for i in rng.integers(n, size=k)]
    res: dict = {"size": size, "n_docs": n, "avg_tokens": float(np.mean([len(tokenize(t)) for t in corpus[:5000]]))}
    print(f"\n== {size}: {n} docs", flush=True)

    # ---- fast path
    w0 = time.perf_counter()
    index = BM25Index(corpus)
    res["fast_build_s"] = time.perf_counter() - w0
    res["fast_memory_mb"] = index.memory_bytes() / 2**20
    res["fast_dense_terms"] = int(index._is_dense.sum())
    queries = pick(args.queries)
    index.get_scores(queries[0])  # warm-up
    walls, cpus = [], []
    for q in queries:
        w, c, _ = timed(lambda: index.get_scores(q), 1)
        walls += w
        cpus += c
    res["fast_query_ms_p50"], res["fast_query_ms_p95"] = pct(walls, 50), pct(walls, 95)
    res["fast_query_cpu_ms_p50"] = pct(cpus, 50)
    w, c, _ = timed(lambda: index.score_batch(queries[:10]), 5)
    res["fast_batch10_ms_p50"] = pct(w, 50)
    print(f"fast: build {res['fast_build_s']:.2f}s, query p50 {res['fast_query_ms_p50']:.2f} ms"
          f" (cpu {res['fast_query_cpu_ms_p50']:.2f} ms), batch of 10 p50 {res['fast_batch10_ms_p50']:.1f} ms",
          flush=True)

    # ---- rank_bm25 reference
    n_ref = args.ref_queries if n <= 60_000 else args.ref_queries_large
    if n_ref > 0 and (n <= args.ref_max_docs):
        from rank_bm25 import BM25Okapi

        w0 = time.perf_counter()
        ref = BM25Okapi([tokenize(t) for t in corpus])
        res["rank_bm25_build_s"] = time.perf_counter() - w0
        ref_walls, ref_cpus, diffs = [], [], []
        for q in queries[:n_ref]:
            toks = tokenize(q)
            w0, c0 = time.perf_counter(), time.process_time()
            want = ref.get_scores(toks)
            ref_walls.append(time.perf_counter() - w0)
            ref_cpus.append(time.process_time() - c0)
            diffs.append(float(np.abs(want - index.get_scores(q)).max()))
        res["rank_bm25_queries_timed"] = n_ref
        res["rank_bm25_query_ms_p50"] = pct(ref_walls, 50)
        res["rank_bm25_query_cpu_ms_p50"] = pct(ref_cpus, 50)
        res["max_abs_diff_vs_rank_bm25"] = max(diffs)
        res["speedup_per_query_p50"] = res["rank_bm25_query_ms_p50"] / res["fast_query_ms_p50"]
        res["speedup_per_query_cpu_p50"] = res["rank_bm25_query_cpu_ms_p50"] / res["fast_query_cpu_ms_p50"]
        have_ref = True
        print(f"rank_bm25: build {res['rank_bm25_build_s']:.2f}s, query p50 {res['rank_bm25_query_ms_p50']:.1f} ms"
              f" (cpu {res['rank_bm25_query_cpu_ms_p50']:.1f} ms; {n_ref} queries), speed-up"
              f" x{res['speedup_per_query_p50']:.0f} (cpu x{res['speedup_per_query_cpu_p50']:.0f}),"
              f" max diff {max(diffs):.2e}", flush=True)
        del ref
    else:
        have_ref = False
        res["rank_bm25_skipped"] = True

    # ---- bm25s (for reference; its variants are not BM25Okapi, see report)
    if not args.no_bm25s:
        try:
            import bm25s

            toks = [tokenize(t) for t in corpus]
            methods = args.bm25s_methods if n <= 10_000 else args.bm25s_methods_large
            for method in [m for m in methods.split(",") if m]:
                w0 = time.perf_counter()
                retr = bm25s.BM25(method=method, k1=1.5, b=0.75)
                retr.index(toks, show_progress=False)
                build = time.perf_counter() - w0
                qw = []
                diffs = []
                for q in queries[:20]:
                    qt = tokenize(q)
                    w0 = time.perf_counter()
                    s = retr.get_scores(qt)
                    qw.append(time.perf_counter() - w0)
                    if not have_ref or len(diffs) >= 5:
                        continue
                    mine = index.get_scores(q)
                    # robertson's tf part lacks BM25Okapi's (k1 + 1) factor; rescale so only idf differs
                    diffs.append(float(np.abs(s * (2.5 if method == "robertson" else 1.0) - mine).max()))
                entry = {"build_s": build, "query_ms_p50": pct(qw, 50)}
                if diffs:
                    key = "max_abs_diff_vs_bm25okapi" + ("_after_x(k1+1)" if method == "robertson" else "")
                    entry[key] = max(diffs)
                res[f"bm25s_{method}"] = entry
                print(f"bm25s[{method}]: build {build:.2f}s, query p50 {entry['query_ms_p50']:.2f} ms"
                      + (f", max diff vs BM25Okapi {max(diffs):.3g}" if diffs else ""), flush=True)
            del toks
        except Exception as e:  # pragma: no cover - optional comparison
            res["bm25s_error"] = repr(e)

    # ---- add_or_update of 100 items (50 replaced, 50 appended)
    new_texts = pick(100)
    upd = {int(i): t for i, t in zip(rng.choice(n, 50, replace=False), new_texts[:50])}
    upd.update({n + j: t for j, t in enumerate(new_texts[50:])})
    w0 = time.perf_counter()
    index.add_or_update(upd)
    res["update_100_s"] = time.perf_counter() - w0

    # ---- QRR over 10 texts
    walls, cpus = [], []
    for _ in range(args.qrr_reps):
        samples = pick(10)
        logprobs = -rng.gamma(2.0, 10.0, size=10)
        w, c, _ = timed(lambda: quasi_round_robin(samples, logprobs, index, n_preds=10), 1)
        walls += w
        cpus += c
    res["qrr10_ms_p50"], res["qrr10_ms_p95"] = pct(walls, 50), pct(walls, 95)
    res["qrr10_cpu_ms_p50"] = pct(cpus, 50)
    res["qrr_reps"] = args.qrr_reps
    print(f"QRR(10 random item texts): p50 {res['qrr10_ms_p50']:.1f} ms, p95 {res['qrr10_ms_p95']:.1f} ms, "
          f"cpu p50 {res['qrr10_cpu_ms_p50']:.1f} ms", flush=True)

    # ---- QRR over 10 texts of one category (closer to one user's samples, which share category words)
    by_cat: dict[str, list[int]] = {}
    for i, t in enumerate(corpus):
        by_cat.setdefault(t.split(" Category: ", 1)[-1].split(" Brand: ", 1)[0], []).append(i)
    groups = [g for g in by_cat.values() if len(g) >= 10]
    walls, cpus = [], []
    for _ in range(args.qrr_reps if groups else 0):
        group = groups[rng.integers(len(groups))]
        samples = [corpus[i] for i in rng.choice(group, 10, replace=False)]
        logprobs = -rng.gamma(2.0, 10.0, size=10)
        w, c, _ = timed(lambda: quasi_round_robin(samples, logprobs, index, n_preds=10), 1)
        walls += w
        cpus += c
    if walls:
        res["qrr10_same_category_ms_p50"] = pct(walls, 50)
        res["qrr10_same_category_ms_p95"] = pct(walls, 95)
        res["qrr10_same_category_cpu_ms_p50"] = pct(cpus, 50)
        print(f"QRR(10 texts, one category): p50 {pct(walls, 50):.1f} ms, p95 {pct(walls, 95):.1f} ms, "
              f"cpu p50 {pct(cpus, 50):.1f} ms", flush=True)
    return res


def print_table(rows: list[dict]) -> None:
    def f(v, fmt):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    head = (f"{'size':>6} {'docs':>8} {'build s':>8} {'ref build':>9} {'q ms':>7} {'ref q ms':>9} {'x':>6} "
            f"{'x cpu':>6} "
            f"{'bm25s q':>8} {'max|diff|':>9} {'upd100 s':>8} {'qrr p50':>8} {'qrr p95':>8} {'qrr cpu':>8} "
            f"{'qrrcat50':>8} {'MB':>6}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['size']:>6} {r['n_docs']:>8} {f(r.get('fast_build_s'), '.2f'):>8} "
              f"{f(r.get('rank_bm25_build_s'), '.2f'):>9} {f(r.get('fast_query_ms_p50'), '.2f'):>7} "
              f"{f(r.get('rank_bm25_query_ms_p50'), '.1f'):>9} {f(r.get('speedup_per_query_p50'), '.0f'):>6} "
              f"{f(r.get('speedup_per_query_cpu_p50'), '.0f'):>6} "
              f"{f(r.get('bm25s_robertson', {}).get('query_ms_p50'), '.2f'):>8} "
              f"{f(r.get('max_abs_diff_vs_rank_bm25'), '.1e'):>9} {f(r.get('update_100_s'), '.2f'):>8} "
              f"{f(r.get('qrr10_ms_p50'), '.1f'):>8} {f(r.get('qrr10_ms_p95'), '.1f'):>8} "
              f"{f(r.get('qrr10_cpu_ms_p50'), '.1f'):>8} {f(r.get('qrr10_same_category_ms_p50'), '.1f'):>8} "
              f"{f(r.get('fast_memory_mb'), '.0f'):>6}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4k,50k,400k", help="comma list: '4k' (real catalog), '50k', '400000', ...")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data dir (with Scientific/)")
    ap.add_argument("--queries", type=int, default=50, help="queries timed on the fast path")
    ap.add_argument("--ref-queries", type=int, default=20, help="rank_bm25 queries timed up to 60k docs")
    ap.add_argument("--ref-queries-large", type=int, default=3, help="rank_bm25 queries timed above 60k docs")
    ap.add_argument("--ref-max-docs", type=int, default=500_000, help="skip rank_bm25 above this size")
    ap.add_argument("--no-bm25s", action="store_true")
    ap.add_argument("--bm25s-methods", default="robertson,lucene,atire", help="bm25s variants up to 10k docs")
    ap.add_argument("--bm25s-methods-large", default="robertson", help="bm25s variants above 10k docs")
    ap.add_argument("--qrr-reps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "bm25.json")
    args = ap.parse_args(argv)

    real = load_real(args.data)
    BM25Index(corpus_for("4k", real)[:200]).score_batch(["warm up"])  # imports (pandas, scipy) out of timings
    load_before = os.getloadavg()
    rows = [bench_size(s.strip(), real, args) for s in args.sizes.split(",") if s.strip()]
    print_table(rows)
    meta = {
        "python": sys.version.split()[0],
        "machine": py_platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "note": "wall-clock figures on a shared machine; cpu_ms = process CPU time (less load-sensitive)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"\nloadavg before {load_before}, after {meta['loadavg_after']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
