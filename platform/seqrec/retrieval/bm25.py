"""BM25 over item text: a sparse index whose scores equal rank_bm25.BM25Okapi (to ~1e-9) and is fast.

Tokenisation (one function, used by the index, by the rank_bm25 reference in tests and by benchmarks):
    `tokenize(text)` = lowercase, then maximal runs of Unicode letters/digits (`[^\\W_]+`); everything else
    (spaces, punctuation, '_', '$', '>', ...) separates tokens. No stopwords, no stemming. So
    "Title: 4 1/2-Inch Roll" -> ['title', '4', '1', '2', 'inch', 'roll'].

Scoring (BM25Okapi of rank_bm25 0.2.2, defaults k1=1.5, b=0.75, epsilon=0.25):
    N docs, dl_d = #tokens of doc d, avgdl = mean dl, df_t = #docs containing t, tf_td = count of t in d
    idf_t = log(N - df_t + 0.5) - log(df_t + 0.5)          over the terms present in the corpus
    idf_t < 0  ->  epsilon * mean_t(idf_t)                  (mean over all present terms, before the floor)
    K_d = k1 * (1 - b + b * dl_d / avgdl),   h1_d = (k1 + 1) / (1 + K_d)   (the tf-part at tf = 1)
    W_td = idf_t * tf_td * (k1 + 1) / (tf_td + K_d)           (0 where tf_td = 0)
    score(q, d) = sum over query tokens, WITH repetition, of W_td  = sum_t c_qt * W_td
where c_qt counts t in the query. Unknown query tokens contribute 0; an empty query scores 0 everywhere.

Layout (no Python loop over documents or postings; a query costs its terms' posting lists + 4 passes over N):
    * sparse terms (df < dense_df_frac * N): posting lists (doc ids ascending, weight W_td), CSR-like arrays.
    * dense terms (df >= dense_df_frac * N, and every term whose idf was floored), e.g. the template words
      'title', 'category', 'brand', 'price', 'unknown', 'industrial', 'scientific' found in nearly every item:
      their tf = 1 weight factorises as idf_t * h1_d, so a query's dense terms add  A_d * h1_d  with
      A_d = sum of c_t * idf_t over the query's dense terms that d contains = (sum over all of them) minus
      (sum over those d lacks); only the short "lacks" (complement) lists are stored. Docs with tf > 1 for a
      dense term get the correction W_td - idf_t * h1_d as a posting of t.
    The posting lists are scattered into the (N,) output with scipy's compiled CSC mat-vec kernel (one call
    per query term, no copies), falling back to numpy fancy indexing.

Exact ties. Posting weights, idf and therefore A_d are rounded to the grid 2**-32 (|error| <= 3e-10 per
query token, so parity with rank_bm25 holds to 1e-6 for queries of up to ~3000 tokens; item-text queries of
~40 tokens measure ~1e-9). Sums of grid values
below 2**21 are exact in float64, hence independent of summation order: two docs whose scores are equal in
exact arithmetic (same length and same multiset of (idf, tf) among the query terms, e.g. identical texts, or
docs matching different terms with equal df) get bit-identical scores, and a doc sharing no term with the
query gets exactly 0.0. rank_bm25 itself breaks such ties by floating-point summation order; here they stay
ties, which is what the evaluator's optimistic/pessimistic ranks assume.

Memory: weights are float64 (item-text queries score up to ~200 on Scientific, where float32 rounding of
the scores alone is up to 7.6e-6, beyond the 1e-6 parity target); ~12 bytes per stored posting plus ~8 per
cached term count: about 200 MB for 400k items of ~35 distinct tokens.

Updates: `add_or_update({idx: text})` tokenises only the new/changed texts and re-derives every weight from
the cached term-count matrix (any change moves N, avgdl, df and the idf floor, so all BM25 weights change);
it is vectorised and much cheaper than tokenising the catalog again. `rebuild(corpus)` starts over.
"""
from __future__ import annotations

import re
import threading
from itertools import chain
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

_TOKEN = re.compile(r"[^\W_]+")
_GRID = 2.0**32  # weights are rounded to multiples of 1/_GRID, see the module docstring


def tokenize(text: str | None) -> list[str]:
    """Lowercase, split on anything that is not a Unicode letter or digit. No stopwords. None/'' -> []."""
    if not text:
        return []
    return _TOKEN.findall(text.lower())


def _map_tokens(flat: list[str], vocab: dict[str, int]) -> np.ndarray:
    """Term ids (int64) of the tokens in `flat`, adding new terms to `vocab`."""
    if not flat:
        return np.zeros(0, dtype=np.int64)
    try:  # hash-factorise the whole token stream at C speed, then map the (few) distinct strings
        import pandas as pd

        codes, uniques = pd.factorize(np.asarray(flat, dtype=object), sort=False)
        lut = np.fromiter((vocab.setdefault(u, len(vocab)) for u in uniques), dtype=np.int64, count=len(uniques))
        return lut[codes]
    except ImportError:  # pragma: no cover - pandas is a project dependency
        return np.fromiter((vocab.setdefault(t, len(vocab)) for t in flat), dtype=np.int64, count=len(flat))


_SCRATCH = threading.local()


def scratch_buffer(n: int, slot: str) -> np.ndarray:
    """A per-thread reusable float64 (n,) buffer (contents undefined). Fresh large arrays cost page faults
    on every call (~1-2 ms per 3 MB here); reusing them keeps repeated scoring at memory speed. A slot must
    only be used by code that is done with it before anything else on the thread can use the same slot."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.shape[0] != n:
        buf = bufs[slot] = np.empty(n, dtype=np.float64)
    return buf


def _on_grid(x: np.ndarray) -> np.ndarray:
    """Round to the nearest multiple of 1/_GRID (exact power-of-two scaling, one rounding)."""
    return np.rint(x * _GRID) / _GRID


def _scatter_add_numpy(out, span, idx, weights, scale):
    lo, hi = int(span[0]), int(span[1])
    w = weights[lo:hi]
    out[idx[lo:hi]] += w if scale == 1.0 else w * scale  # doc ids within one list are unique


def _add_product_numpy(out, h, x):
    out += h * x


def _make_kernels():
    """Two in-place accumulation kernels (scipy's compiled sparse mat-vec routines, no temporaries):

    scatter_add(out, span, idx, weights, scale): out[idx[lo:hi]] += scale * weights[lo:hi]  (span = [lo, hi])
        = csc_matvec of a one-column CSC matrix whose column pointer points into the shared posting arrays;
    add_product(out, h, x): out += h * x  (elementwise) = dia_matvec of diag(h) times x.
    They are scipy-internal, so they are probed once here against numpy, which replaces them if they are
    missing or give any different bit (e.g. a build contracting to FMA): scores never depend on the path.
    """
    try:
        from scipy.sparse import _sparsetools

        csc_matvec, dia_matvec = _sparsetools.csc_matvec, _sparsetools.dia_matvec
        rng = np.random.default_rng(0)
        n = 257
        idx = rng.permutation(n).astype(np.int32)
        w, h, x, base = rng.random(n), rng.random(n), rng.random(n), rng.random(n)
        got, want = base.copy(), base.copy()
        csc_matvec(n, 1, np.array([3, n - 5], dtype=np.int32), idx, w, np.array([2.5]), got)
        _scatter_add_numpy(want, np.array([3, n - 5]), idx, w, 2.5)
        zero = np.array([0], dtype=np.int32)
        dia_matvec(n, n, 1, n, zero, h, x, got)
        _add_product_numpy(want, h, x)
        if not np.array_equal(got, want):
            raise RuntimeError("scipy kernels differ from numpy")
    except Exception:  # pragma: no cover - depends on the scipy build
        return _scatter_add_numpy, _add_product_numpy

    def scatter_add(out, span, idx, weights, scale):
        csc_matvec(len(out), 1, span, idx, weights, np.array([scale]), out)

    def add_product(out, h, x):
        n = len(out)
        dia_matvec(n, n, 1, n, zero, h, x, out)

    return scatter_add, add_product


_scatter_add, _add_product = _make_kernels()


def _count_rows(token_lists: Sequence[list[str]], vocab: dict[str, int]) -> tuple[sp.csr_matrix, np.ndarray]:
    """Term-count CSR (len(token_lists) x len(vocab)) int32 and the doc lengths; grows `vocab`."""
    n = len(token_lists)
    lens = np.fromiter(map(len, token_lists), dtype=np.int64, count=n)
    ids = _map_tokens(list(chain.from_iterable(token_lists)), vocab)
    rows = np.repeat(np.arange(n, dtype=np.int64), lens)
    counts = sp.csr_matrix(
        (np.ones(len(ids), dtype=np.int32), (rows, ids)), shape=(n, max(len(vocab), 1)), dtype=np.int32
    )
    counts.sum_duplicates()
    return counts, lens


class BM25Index:
    """BM25Okapi index over a list of documents (item texts), indexed 0..n_docs-1.

    Scoring only reads the index, so concurrent scoring from several threads is safe; `add_or_update`
    replaces its arrays one by one and must not run while another thread scores (build a new index or lock).
    """

    def __init__(
        self,
        corpus: Sequence[str],
        k1: float = 1.5,
        b: float = 0.75,
        epsilon: float = 0.25,
        dense_df_frac: float | None = 0.5,
    ):
        """`dense_df_frac`: terms with df >= this fraction of the corpus (and all idf-floored terms) use the
        factorised dense path; None disables it. Scores agree across settings to ~1e-9 (grid rounding), with
        the same zeros and ties; only speed differs."""
        self.k1, self.b, self.epsilon = float(k1), float(b), float(epsilon)
        self.dense_df_frac = dense_df_frac
        self._vocab: dict[str, int] = {}
        counts, lens = _count_rows([tokenize(t) for t in corpus], self._vocab)
        self._counts = counts  # (N, V) int32 term counts, canonical CSR
        self._doc_len = lens  # (N,) int64
        self._finalise()

    # ------------------------------------------------------------------ build
    def _finalise(self) -> None:
        """(Re)derive every BM25 weight structure from the cached counts."""
        k1, b = self.k1, self.b
        counts = self._counts
        n_docs, n_vocab = counts.shape[0], max(len(self._vocab), 1)
        if counts.shape[1] < n_vocab:  # vocab grew (updates): widen the count matrix
            counts = sp.csr_matrix((counts.data, counts.indices, counts.indptr), shape=(n_docs, n_vocab))
            self._counts = counts
        self._n_docs = n_docs
        total = int(self._doc_len.sum())
        self.avgdl = total / n_docs if n_docs else 0.0

        df = np.bincount(counts.indices, minlength=n_vocab).astype(np.int64)  # (V,)
        present = df > 0
        idf = np.zeros(n_vocab, dtype=np.float64)
        idf[present] = np.log(n_docs - df[present] + 0.5) - np.log(df[present] + 0.5)
        self.average_idf = float(idf[present].sum() / present.sum()) if present.any() else 0.0
        floored = present & (idf < 0)
        idf[floored] = self.epsilon * self.average_idf  # BM25Okapi's floor
        self._df, self._idf = df, idf
        self._qidf = _on_grid(idf)  # (V,) idf on the grid, used for the dense terms' A_d

        # K_d and h1_d. avgdl == 0 only when no doc has a token (then nothing is ever scored).
        rel = self._doc_len / self.avgdl if self.avgdl > 0 else np.zeros(n_docs)
        doc_k = k1 * (1 - b + b * rel)  # (N,)
        self._h1 = (k1 + 1) / (1.0 + doc_k)  # (N,)

        # per stored (doc, term) pair: W_td, same expression order as rank_bm25
        row_len = np.diff(counts.indptr)
        rows = np.repeat(np.arange(n_docs, dtype=np.intp), row_len)  # (nnz,) doc of each stored pair
        terms = counts.indices  # (nnz,) int32 term ids
        tf = counts.data.astype(np.float64)
        weight = idf[terms] * (tf * (k1 + 1) / (tf + doc_k[rows]))
        del tf

        if self.dense_df_frac is not None and n_docs > 0:
            # floored terms all share one idf: keep them on one path so equal weights stay equal
            dense = present & ((df >= self.dense_df_frac * n_docs) | floored)
        else:
            dense = np.zeros(n_vocab, dtype=bool)
        self._is_dense = dense
        on_dense = dense[terms]
        # dense terms keep only a tf>1 correction as postings; their tf=1 part is idf_t * h1_d
        keep = ~on_dense | (counts.data > 1)
        weight[on_dense] -= self._qidf[terms[on_dense]] * self._h1[rows[on_dense]]
        kept_ptr = np.zeros(n_docs + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows[keep], minlength=n_docs), out=kept_ptr[1:])
        kept = sp.csr_matrix((_on_grid(weight[keep]), terms[keep], kept_ptr), shape=(n_docs, n_vocab))
        del weight, keep
        m = kept.tocsc()  # (N, V) by column: column t = posting list of t, docs ascending; O(nnz), no sort
        del kept
        idx_dtype = np.int32 if max(m.nnz, n_docs) < 2**31 - 1 else np.int64
        self._post_ptr = m.indptr.astype(idx_dtype)  # (V+1,)
        self._post_doc = m.indices.astype(idx_dtype)  # (P,) doc ids
        self._post_w = m.data  # (P,) float64 weights on the grid
        del m

        # complement lists of dense terms (docs NOT containing t, ascending), CSR-like over term ids
        dense_ids = np.flatnonzero(dense)
        comp_len = np.zeros(n_vocab, dtype=np.int64)
        comp_parts = []
        if len(dense_ids):
            slot = np.full(n_vocab, -1, dtype=np.int64)
            slot[dense_ids] = np.arange(len(dense_ids))
            has = np.zeros((len(dense_ids), n_docs), dtype=bool)
            has[slot[terms[on_dense]], rows[on_dense]] = True
            for j, t in enumerate(dense_ids):
                missing = np.flatnonzero(~has[j])
                comp_parts.append(missing)
                comp_len[t] = len(missing)
            del has
        self._comp_ptr = np.concatenate([[0], np.cumsum(comp_len)]).astype(idx_dtype)  # (V+1,)
        self._comp_doc = (np.concatenate(comp_parts) if comp_parts else np.zeros(0)).astype(idx_dtype)
        self._comp_one = np.ones(len(self._comp_doc), dtype=np.float64)  # unit weights for the scatter
        self._all_doc = np.arange(n_docs, dtype=idx_dtype)  # "every doc" list for row += total * h1
        self._all_span = np.array([0, n_docs], dtype=idx_dtype)

    # ------------------------------------------------------------------ info
    @property
    def n_docs(self) -> int:
        return self._n_docs

    @property
    def vocab_size(self) -> int:
        """Distinct terms currently present in the corpus."""
        return int((self._df > 0).sum())

    @property
    def doc_lengths(self) -> np.ndarray:
        return self._doc_len

    def idf(self, term: str) -> float:
        """BM25Okapi idf of a (tokenised) term after the epsilon floor; 0 for unknown terms."""
        t = self._vocab.get(term)
        return float(self._idf[t]) if t is not None and t < len(self._idf) else 0.0

    def memory_bytes(self) -> int:
        arrays = [self._post_ptr, self._post_doc, self._post_w, self._counts.data, self._counts.indices,
                  self._counts.indptr, self._doc_len, self._h1, self._idf, self._df, self._comp_ptr,
                  self._comp_doc, self._comp_one, self._qidf, self._all_doc]
        return int(sum(a.nbytes for a in arrays))

    # ------------------------------------------------------------------ scoring
    def _query_terms(self, query: str) -> tuple[list[int], list[int]]:
        """(sorted known term ids, their counts in the query). Unknown tokens are dropped."""
        vocab, n_terms = self._vocab, len(self._idf)
        counts: dict[int, int] = {}
        for tok in tokenize(query):
            t = vocab.get(tok)
            if t is not None and t < n_terms:
                counts[t] = counts.get(t, 0) + 1
        terms = sorted(counts)  # term-id order: the fixed per-doc summation order
        return terms, [counts[t] for t in terms]

    def _score_into(
        self,
        row: np.ndarray,
        terms: list[int],
        counts: list[int],
        work: np.ndarray,
        base: np.ndarray | None = None,
        skip: frozenset = frozenset(),
    ) -> None:
        """Write the (N,) scores of one query (sorted term ids, their counts) into `row`; `work`: (N,) scratch.

            row  = 0 (or `base`: the postings of the (term, count) pairs in `skip`, shared by the batch)
            row += c_t * postings_t        for every other query term (grid values: exact, order-free sums)
            A    = sum of c_t * idf_t over the query's dense terms;  A_d -= c_t * idf_t on complement(t)
            row += A * h1                  (one rounding per doc, a function of A_d and dl_d only)
        """
        if base is None:
            row[:] = 0.0
        else:
            row[:] = base
        ptr, cptr = self._post_ptr, self._comp_ptr
        is_dense, qidf = self._is_dense, self._qidf
        dense_terms, dense_coef = [], []
        for t, c in zip(terms, counts):
            if ptr[t + 1] > ptr[t] and (t, c) not in skip:
                _scatter_add(row, ptr[t:t + 2], self._post_doc, self._post_w, float(c))
            if is_dense[t]:
                dense_terms.append(t)
                dense_coef.append(c * float(qidf[t]))  # c_t * idf_t, on the grid (exact)
        if not dense_terms:
            return
        total = sum(dense_coef)  # exact (grid)
        lacking = [(t, v) for t, v in zip(dense_terms, dense_coef) if cptr[t + 1] > cptr[t]]
        if not lacking:  # every doc has every dense query term: A_d = total; row += total * h1, one pass
            _scatter_add(row, self._all_span, self._all_doc, self._h1, total)
            return
        work.fill(total)  # A_d
        for t, v in lacking:
            _scatter_add(work, cptr[t:t + 2], self._comp_doc, self._comp_one, -v)
        _add_product(row, self._h1, work)  # row += h1 * A, one pass

    def _shared_postings(self, parsed: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray | None, frozenset]:
        """Postings of the (term, count) pairs common to every query of a batch, summed once (or None)."""
        if len(parsed) < 2:
            return None, frozenset()
        ptr = self._post_ptr
        shared = set(zip(*parsed[0]))
        for terms, counts in parsed[1:]:
            shared.intersection_update(zip(terms, counts))
        shared = {(t, c) for t, c in shared if ptr[t + 1] > ptr[t]}
        volume = sum(int(ptr[t + 1] - ptr[t]) for t, _ in shared)
        # scatters saved (~2.5 ns/posting) vs a copy instead of a zero fill per query (~0.3 ns/doc)
        if volume * 8 * (len(parsed) - 1) < self._n_docs * (len(parsed) + 1):
            return None, frozenset()
        base = np.zeros(self._n_docs, dtype=np.float64)
        for t, c in sorted(shared):
            _scatter_add(base, ptr[t:t + 2], self._post_doc, self._post_w, float(c))
        return base, frozenset(shared)

    def iter_scores(
        self, queries: Sequence[str], row: np.ndarray | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (q, (N,) scores of queries[q]) one query at a time, reusing one row buffer: the row is only
        valid until the next step. Keeps the working set to a few (N,) arrays (used by QRR)."""
        queries = list(queries)
        if row is None:
            row = np.empty(self._n_docs, dtype=np.float64)
        elif row.shape != (self._n_docs,) or row.dtype != np.float64 or not row.flags.c_contiguous:
            raise ValueError(f"row must be a contiguous float64 ({self._n_docs},) array")
        parsed = [self._query_terms(q) for q in queries]
        base, skip = self._shared_postings(parsed)
        for q, (terms, counts) in enumerate(parsed):
            # the work buffer is only used inside one _score_into call, so interleaved generators may share it
            self._score_into(row, terms, counts, scratch_buffer(self._n_docs, "bm25.work"), base, skip)
            yield q, row

    def score_batch(self, queries: Sequence[str], out: np.ndarray | None = None) -> np.ndarray:
        """(Q, N) float64 BM25Okapi scores of every document for each query (written into `out` if given).

        Posting lists shared by every query of the batch (same term, same count; e.g. the category words of
        QRR samples for one user) are scattered once and copied, which is exact because sums are order-free.
        """
        queries = list(queries)
        shape = (len(queries), self._n_docs)
        if out is None:
            out = np.empty(shape, dtype=np.float64)
        elif out.shape != shape or out.dtype != np.float64 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float64 array of shape {shape}")
        if self._n_docs == 0 or not queries:
            return out
        parsed = [self._query_terms(q) for q in queries]
        base, skip = self._shared_postings(parsed)
        work = scratch_buffer(self._n_docs, "bm25.work")
        for q, (terms, counts) in enumerate(parsed):
            self._score_into(out[q], terms, counts, work, base, skip)
        return out

    def get_scores(self, query: str) -> np.ndarray:
        """(N,) float64 scores for one query string (rank_bm25's get_scores on tokenize(query))."""
        return self.score_batch([query])[0]

    def top_k(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores) of the k best documents, score descending, ties by lower index."""
        scores = self.get_scores(query)
        k = max(0, min(int(k), len(scores)))
        if k == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        if k < len(scores):
            # include every doc tied with the k-th score so the index tie-break is exact
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            cand = np.flatnonzero(scores >= kth)
        else:
            cand = np.arange(len(scores))
        order = np.lexsort((cand, -scores[cand]))[:k]
        idx = cand[order]
        return idx.astype(np.int64), scores[idx]

    # ------------------------------------------------------------------ updates
    def add_or_update(self, item_idx_to_text: Mapping[int, str]) -> None:
        """Replace the text of existing items and/or append new ones, then re-derive all weights.

        Indices < n_docs are replaced; the others must be exactly n_docs, n_docs+1, ... (no gaps).
        Only the given texts are tokenised; the rest comes from the cached term counts.
        """
        if not item_idx_to_text:
            return
        n_old = self._n_docs
        idx = np.array(sorted(int(i) for i in item_idx_to_text), dtype=np.int64)
        if idx[0] < 0:
            raise ValueError(f"negative item index {idx[0]}")
        new = idx[idx >= n_old]
        if len(new) and not np.array_equal(new, np.arange(n_old, n_old + len(new))):
            raise ValueError(f"new item indices must be contiguous from {n_old}; got {new[:10].tolist()}...")
        n_new = n_old + len(new)
        add_counts, add_lens = _count_rows([tokenize(item_idx_to_text[int(i)]) for i in idx], self._vocab)
        n_vocab = len(self._vocab)

        # assemble the new count CSR row by row (kept rows copied as they are, no sort)
        old = self._counts
        row_len = np.zeros(n_new, dtype=np.int64)
        row_len[:n_old] = np.diff(old.indptr)
        row_len[idx] = np.diff(add_counts.indptr)
        indptr = np.zeros(n_new + 1, dtype=np.int64)
        np.cumsum(row_len, out=indptr[1:])
        indices = np.empty(indptr[-1], dtype=np.int32)
        data = np.empty(indptr[-1], dtype=np.int32)
        keep_row = np.ones(n_old, dtype=bool)
        keep_row[idx[idx < n_old]] = False
        old_rows = np.repeat(np.arange(n_old, dtype=np.int64), np.diff(old.indptr))
        kept_pos = np.flatnonzero(keep_row[old_rows])  # stored pairs of the rows that stay
        r = old_rows[kept_pos]
        dest = indptr[r] + (kept_pos - old.indptr[r])
        indices[dest] = old.indices[kept_pos]
        data[dest] = old.data[kept_pos]
        add_pos = np.repeat(np.arange(len(idx), dtype=np.int64), np.diff(add_counts.indptr))
        dest = indptr[idx[add_pos]] + (np.arange(add_counts.nnz) - add_counts.indptr[add_pos])
        indices[dest] = add_counts.indices
        data[dest] = add_counts.data
        self._counts = sp.csr_matrix((data, indices, indptr), shape=(n_new, max(n_vocab, 1)))
        doc_len = np.zeros(n_new, dtype=np.int64)
        doc_len[:n_old] = self._doc_len
        doc_len[idx] = add_lens
        self._doc_len = doc_len
        self._finalise()

    def rebuild(self, corpus: Iterable[str]) -> None:
        """Full rebuild from a new corpus (same parameters)."""
        self.__init__(list(corpus), k1=self.k1, b=self.b, epsilon=self.epsilon, dense_df_frac=self.dense_df_frac)
