"""BM25Index: parity with rank_bm25.BM25Okapi (same tokens) to 1e-6, exact ties, top-k, updates."""
from __future__ import annotations

import math

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

import seqrec.retrieval.bm25 as bm25_module
from seqrec.retrieval.bm25 import BM25Index, tokenize

TOL = 1e-6

# 'the' is in 5 of 6 docs (df > N/2: negative idf -> epsilon * average idf), 'glue' in 3 of 6 (idf = 0 exactly
# is impossible with +0.5 smoothing but df = N/2 gives log(1) = 0), one empty document, repeated terms.
HAND_CORPUS = [
    "The gorilla glue, the strong glue!",
    "the sanding roll 80 grit",
    "",
    "The wood glue for the wood",
    "the SANDING disc - 120 grit, 120 grit",
    "the glue gun",
]
HAND_QUERIES = [
    "glue",
    "the",
    "the the the",  # repeated floored term
    "glue glue sanding",  # repeated query terms are summed per occurrence
    "wood wood wood glue",
    "unknownterm",
    "unknownterm glue other-unknown",
    "",
    "   ,;:  ",
    "120 grit the disc",
    "GORILLA Glue",
]


def reference(corpus: list[str]) -> BM25Okapi:
    return BM25Okapi([tokenize(t) for t in corpus], k1=1.5, b=0.75, epsilon=0.25)


def reference_scores(ref: BM25Okapi, queries: list[str]) -> np.ndarray:
    return np.stack([ref.get_scores(tokenize(q)) for q in queries])


def exact_sum_scores(ref: BM25Okapi, query: str) -> np.ndarray:
    """rank_bm25's per-token terms summed exactly (math.fsum): equal multisets of terms give equal scores."""
    toks = tokenize(query)
    out = []
    for d, freqs in enumerate(ref.doc_freqs):
        parts = []
        for t in toks:
            f = freqs.get(t, 0)
            if f:
                norm = ref.k1 * (1 - ref.b + ref.b * ref.doc_len[d] / ref.avgdl)
                parts.append((ref.idf.get(t) or 0) * (f * (ref.k1 + 1) / (f + norm)))
        out.append(math.fsum(parts))
    return np.array(out)


def opt_pes_ranks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based optimistic / pessimistic rank of every item (as seqrec.eval.metrics defines them)."""
    srt = np.sort(scores)
    n = len(scores)
    return 1 + n - np.searchsorted(srt, scores, side="right"), n - np.searchsorted(srt, scores, side="left")


def test_tokenize():
    assert tokenize("Title: 4 1/2-Inch Roll, $12.99 (PORTER_CABLE)") == [
        "title", "4", "1", "2", "inch", "roll", "12", "99", "porter", "cable"
    ]
    assert tokenize("") == [] and tokenize(None) == [] and tokenize(" -- ") == []
    assert tokenize("Café Über") == ["café", "über"]


@pytest.mark.parametrize("dense_df_frac", [0.5, None, 0.0])
def test_parity_hand_corpus(dense_df_frac):
    ref = reference(HAND_CORPUS)
    # preconditions of what the corpus is meant to exercise
    assert ref.idf["the"] == pytest.approx(0.25 * ref.average_idf)
    assert math.log(6 - 5 + 0.5) - math.log(5 + 0.5) < 0
    index = BM25Index(HAND_CORPUS, dense_df_frac=dense_df_frac)
    assert index.n_docs == len(HAND_CORPUS)
    got = index.score_batch(HAND_QUERIES)
    assert got.shape == (len(HAND_QUERIES), len(HAND_CORPUS)) and got.dtype == np.float64
    np.testing.assert_allclose(got, reference_scores(ref, HAND_QUERIES), rtol=0, atol=TOL)
    # empty query / only unknown terms: exactly zero
    for q in ("", "   ,;:  ", "unknownterm"):
        assert not index.get_scores(q).any()
    # the empty document never scores
    assert not got[:, 2].any()
    # get_scores == one row of score_batch
    np.testing.assert_array_equal(index.get_scores("glue glue sanding"), got[3])
    assert index.idf("the") == pytest.approx(ref.idf["the"]) and index.idf("nope") == 0.0


def test_dense_layouts_agree():
    """The dense-term factorisation changes only the last bits (grid rounding), never zeros or ties."""
    a = BM25Index(HAND_CORPUS, dense_df_frac=0.5).score_batch(HAND_QUERIES)
    for other in (BM25Index(HAND_CORPUS, dense_df_frac=None), BM25Index(HAND_CORPUS, dense_df_frac=0.0)):
        b = other.score_batch(HAND_QUERIES)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-8)
        np.testing.assert_array_equal(a == 0.0, b == 0.0)
        for row_a, row_b in zip(a, b):
            for ra, rb in zip(opt_pes_ranks(row_a), opt_pes_ranks(row_b)):
                np.testing.assert_array_equal(ra, rb)


def test_numpy_kernel_fallback_matches(monkeypatch):
    index = BM25Index(HAND_CORPUS)
    fast = index.score_batch(HAND_QUERIES)
    monkeypatch.setattr(bm25_module, "_scatter_add", bm25_module._scatter_add_numpy)
    monkeypatch.setattr(bm25_module, "_add_product", bm25_module._add_product_numpy)
    np.testing.assert_array_equal(index.score_batch(HAND_QUERIES), fast)


def test_degenerate_corpora():
    assert BM25Index([]).score_batch(["glue"]).shape == (1, 0)
    assert not BM25Index(["", "  "]).score_batch(["glue", ""]).any()
    single = BM25Index(["glue"])
    np.testing.assert_allclose(single.get_scores("glue"), reference(["glue"]).get_scores(["glue"]), atol=TOL)
    assert BM25Index(HAND_CORPUS).score_batch([]).shape == (0, len(HAND_CORPUS))


def test_identical_docs_tie_and_unmatched_docs_are_zero():
    corpus = ["red glue stick", "blue tape", "red glue stick", "glue red stick", "green paint"]
    index = BM25Index(corpus)
    s = index.get_scores("red stick glue glue")
    assert s[0] == s[2] == s[3]  # same token multiset (order irrelevant)
    assert s[1] == 0.0 and s[4] == 0.0


def _scientific_texts(shared_data, n: int) -> list[str]:
    path = shared_data / "Scientific" / "Scientific.text"
    texts = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        header = fh.readline()
        assert header.startswith("item_id")
        for line in fh:
            parts = line.rstrip("\n").split("\t", 1)
            if len(parts) == 2:
                texts.append(parts[1])
            if len(texts) >= n:
                break
    return texts


@pytest.fixture(scope="module")
def scientific(shared_data):
    from seqrec.data.text import format_item_text
    from seqrec.data.unisrec import split_unisrec_text

    raw = _scientific_texts(shared_data, 1050)
    formatted = [format_item_text(*split_unisrec_text(t)) for t in raw]
    return raw, formatted


@pytest.mark.parametrize("kind", ["raw", "formatted"])
def test_parity_real_item_texts(scientific, kind):
    raw, formatted = scientific
    texts = raw if kind == "raw" else formatted  # formatted: 'Title: .. Category: .. Brand: .. Price: Unknown'
    corpus, queries = texts[:1000], texts[1000:1050]  # queries: other items' texts
    ref = reference(corpus)
    index = BM25Index(corpus)
    got = index.score_batch(queries)
    want = reference_scores(ref, queries)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    # zero exactly where rank_bm25 is zero (no shared term)
    np.testing.assert_array_equal(got == 0.0, want == 0.0)
    if kind == "formatted":
        assert index._is_dense.sum() >= 4  # the template words take the dense path


def test_ties_follow_exact_arithmetic(scientific):
    """Optimistic/pessimistic ranks equal those of exactly-summed BM25 (rank_bm25 itself breaks some of these
    ties through summation order, which is why the comparison is against the fsum reference)."""
    _, formatted = scientific
    corpus = formatted[:1000]
    ref = reference(corpus)
    index = BM25Index(corpus)
    queries = formatted[1000:1015] + ["title", "industrial scientific", "zzz"]
    got = index.score_batch(queries)
    for q, query in enumerate(queries):
        exact = exact_sum_scores(ref, query)
        for mine, theirs in zip(opt_pes_ranks(got[q]), opt_pes_ranks(exact)):
            np.testing.assert_array_equal(mine, theirs)


def test_top_k_order_and_ties():
    corpus = ["glue", "tape", "glue", "glue glue", "paint"]
    index = BM25Index(corpus)
    idx, scores = index.top_k("glue", 3)
    full = index.get_scores("glue")
    assert list(idx) == sorted(range(5), key=lambda i: (-full[i], i))[:3]
    assert np.all(np.diff(scores) <= 0)
    assert idx[1] < idx[2] or scores[1] != scores[2]  # ties by lower index
    assert len(index.top_k("glue", 0)[0]) == 0 and len(index.top_k("glue", 99)[0]) == 5


def test_add_or_update_matches_fresh_build(scientific):
    raw, _ = scientific
    corpus = list(raw[:200])
    index = BM25Index(corpus)
    changes = {3: "Brand new text about a zzznewterm microscope", 10: "", 200: raw[300], 201: "Gorilla glue"}
    index.add_or_update(changes)
    updated = corpus + [raw[300], "Gorilla glue"]
    updated[3], updated[10] = changes[3], changes[10]
    assert index.n_docs == len(updated)
    queries = ["zzznewterm microscope", "gorilla glue", raw[250], raw[5], ""]
    np.testing.assert_allclose(
        index.score_batch(queries), reference_scores(reference(updated), queries), rtol=0, atol=TOL
    )
    np.testing.assert_array_equal(index.score_batch(queries), BM25Index(updated).score_batch(queries))
    with pytest.raises(ValueError):
        index.add_or_update({index.n_docs + 1: "gap"})
    # successive updates (append only, then replace only) still equal a fresh build
    index.add_or_update({index.n_docs: "new microscope slide"})
    index.add_or_update({0: "", 5: "microscope"})
    updated = updated + ["new microscope slide"]
    updated[0], updated[5] = "", "microscope"
    np.testing.assert_array_equal(index.score_batch(queries), BM25Index(updated).score_batch(queries))
    np.testing.assert_allclose(
        index.score_batch(queries), reference_scores(reference(updated), queries), rtol=0, atol=TOL
    )


def test_score_batch_out_buffer():
    index = BM25Index(HAND_CORPUS)
    buf = np.full((2, len(HAND_CORPUS)), np.nan)
    res = index.score_batch(["glue", "the"], out=buf)
    assert res is buf and not np.isnan(buf).any()
    with pytest.raises(ValueError):
        index.score_batch(["glue"], out=np.zeros((1, 2)))


def test_batch_sharing_postings_is_bitwise_exact(scientific):
    """Queries of one batch that share (term, count) pairs get those postings scattered once; the result
    is bit-identical to scoring each query alone (grid sums do not depend on order)."""
    _, formatted = scientific
    corpus = formatted[:1000]
    index = BM25Index(corpus)
    cats = [t.split("Category: ")[1].split(" Brand:")[0] for t in formatted]
    category = max(set(cats), key=cats.count)  # the most common category path
    queries = [t for t, c in zip(formatted, cats) if c == category][:8]
    assert len(queries) >= 4
    shared = set.intersection(*[set(zip(*index._query_terms(q))) for q in queries])
    ptr = index._post_ptr
    volume = sum(int(ptr[t + 1] - ptr[t]) for t, _ in shared)
    assert volume * 8 * (len(queries) - 1) >= index.n_docs * (len(queries) + 1)  # the shared path is taken
    batch = index.score_batch(queries)
    for q, query in enumerate(queries):
        np.testing.assert_array_equal(batch[q], index.get_scores(query))


def test_iter_scores_matches_score_batch():
    index = BM25Index(HAND_CORPUS)
    batch = index.score_batch(HAND_QUERIES)
    seen = 0
    for q, row in index.iter_scores(HAND_QUERIES):
        np.testing.assert_array_equal(row, batch[q])
        seen += 1
    assert seen == len(HAND_QUERIES)
