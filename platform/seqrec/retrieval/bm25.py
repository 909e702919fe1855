"""BM25 over item text: a sparse scipy index whose scores equal rank_bm25.BM25Okapi to ~1e-12.

Tokenisation (one function, used by the index, by the rank_bm25 reference in tests and by benchmarks):
    `tokenize(text)` = lowercase, then maximal runs of Unicode letters/digits (`[^\\W_]+`); everything else
    (spaces, punctuation, '_', '$', '>', ...) separates tokens. No stopwords, no stemming. So
    "Title: 4 1/2-Inch Roll" -> ['title', '4', '1', '2', 'inch', 'roll'].

Scoring (exactly BM25Okapi of rank_bm25 0.2.2, defaults k1=1.5, b=0.75, epsilon=0.25):
    N docs, dl_d = #tokens of doc d, avgdl = mean dl, df_t = #docs containing t, tf_td = count of t in d
    idf_t = log(N - df_t + 0.5) - log(df_t + 0.5)          over the terms present in the corpus
    idf_t < 0  ->  epsilon * mean_t(idf_t)                  (mean taken before the floor, over all terms)
    K_d = k1 * (1 - b + b * dl_d / avgdl)
    W_td = idf_t * tf_td * (k1 + 1) / (tf_td + K_d)           (0 where tf_td = 0)
    score(q, d) = sum over query tokens t, WITH repetition, of W_td  = sum_t c_qt * W_td
where c_qt counts t in the query. Unknown query tokens contribute 0; an empty query scores 0 everywhere.

Layout (the "production path"; no Python loop over documents or postings):
    The term weights W are precomputed once. Terms are split by document frequency:
    * sparse terms (df < dense_df_frac * N): their postings W_t. live in a CSR matrix M (V x N);
    * dense terms (df >= dense_df_frac * N, e.g. the template words 'title', 'category', 'brand', 'price',
      'unknown', 'industrial', 'scientific' that occur in nearly every item): for tf = 1 the weight factorises
      as idf_t * h1_d with h1_d = (k1 + 1) / (1 + K_d), so a query's dense terms add  A_qd * h1_d  with
      A_qd = sum of c_qt * idf_t over the query's dense terms present in d.  A_qd is the same scalar S_q for
      every doc except those in the (short) complement lists of the query's dense terms, which are stored;
      docs with tf > 1 for a dense term get the small correction W_td - idf_t * h1_d, kept as row t of M.
    A batch of Q queries is then:  Y = C_q @ M  (sparse x sparse, touches only the query terms' postings)
    + S_q * h1 (one dense pass) + a fix-up on the complement docs. Docs that share no term with the query get
    exactly 0.0 and docs with identical token multisets get bit-identical scores, so ties (which the
    evaluator's optimistic/pessimistic ranks depend on) are the same as rank_bm25's.

Weights are float64: BM25 scores of item-text queries reach a few hundred, where float32's 6e-8 relative
rounding already exceeds the 1e-6 absolute parity target. 400k items x ~35 distinct tokens costs about
12 bytes per stored posting for M and 8 for the cached counts (~250 MB).

Updates: `add_or_update({idx: text})` tokenises only the new/changed texts and re-derives every weight from
the cached term-count matrix (any change moves N, avgdl, df and the idf floor, so all BM25 weights change);
it is vectorised and costs about the same as the weight part of a build (well under the tokenisation cost).
"""
from __future__ import annotations

import re
from itertools import chain
from typing import Iterable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

_TOKEN = re.compile(r"[^\W_]+")
_MASK_BITS = 12  # dense query terms handled per lookup table (2**12 entries)


def tokenize(text: str | None) -> list[str]:
    """Lowercase, split on anything that is not a Unicode letter or digit. No stopwords. None/'' -> []."""
    if not text:
        return []
    return _TOKEN.findall(text.lower())


def _map_tokens(flat: list[str], vocab: dict[str, int], grow: bool) -> np.ndarray:
    """Term ids of `flat` (int64). grow=True adds new terms to `vocab`; otherwise unknown terms get -1."""
    if not flat:
        return np.zeros(0, dtype=np.int64)
    try:  # hash-factorise the whole token stream at C speed, then map the (few) distinct strings
        import pandas as pd

        codes, uniques = pd.factorize(np.asarray(flat, dtype=object), sort=False)
        if grow:
            lut = np.fromiter((vocab.setdefault(u, len(vocab)) for u in uniques), dtype=np.int64, count=len(uniques))
        else:
            lut = np.fromiter((vocab.get(u, -1) for u in uniques), dtype=np.int64, count=len(uniques))
        return lut[codes]
    except ImportError:  # pragma: no cover - pandas is a project dependency
        if grow:
            return np.fromiter((vocab.setdefault(t, len(vocab)) for t in flat), dtype=np.int64, count=len(flat))
        return np.fromiter((vocab.get(t, -1) for t in flat), dtype=np.int64, count=len(flat))


def _scatter_add_numpy(out, span, idx, weights, scale):
    lo, hi = int(span[0]), int(span[1])
    w = weights[lo:hi]
    out[idx[lo:hi]] += w if scale == 1.0 else w * scale  # doc ids within one list are unique


def _make_scatter_add():
    """out[idx[lo:hi]] += scale * weights[lo:hi] for one posting list, accumulating in place.

    scipy's compiled csc_matvec does exactly this for a one-column CSC matrix whose column pointer is
    span = [lo, hi] into the shared posting arrays: no copy, no temporary, ~2x faster than numpy fancy-index
    add. It is scipy-internal, so it is checked once here and numpy is used if it is missing or differs.
    """
    try:
        from scipy.sparse import _sparsetools

        kernel = _sparsetools.csc_matvec
        probe = np.zeros(4)
        kernel(4, 1, np.array([1, 3], dtype=np.int32), np.array([9, 0, 2, 9], dtype=np.int32),
               np.array([5.0, 1.0, 2.0, 5.0]), np.array([3.0]), probe)
        if not np.array_equal(probe, [3.0, 0.0, 6.0, 0.0]):
            raise RuntimeError("unexpected csc_matvec semantics")
    except Exception:  # pragma: no cover - depends on the scipy build
        return _scatter_add_numpy

    def scatter_add(out, span, idx, weights, scale):
        kernel(len(out), 1, span, idx, weights, np.array([scale]), out)

    return scatter_add


_scatter_add = _make_scatter_add()


def _count_rows(token_lists: Sequence[list[str]], vocab: dict[str, int]) -> tuple[sp.csr_matrix, np.ndarray]:
    """Term-count CSR (len(token_lists) x len(vocab)) int32 and the doc lengths; grows `vocab`."""
    n = len(token_lists)
    lens = np.fromiter(map(len, token_lists), dtype=np.int64, count=n)
    ids = _map_tokens(list(chain.from_iterable(token_lists)), vocab, grow=True)
    rows = np.repeat(np.arange(n, dtype=np.int64), lens)
    counts = sp.csr_matrix(
        (np.ones(len(ids), dtype=np.int32), (rows, ids)), shape=(n, max(len(vocab), 1)), dtype=np.int32
    )
    counts.sum_duplicates()
    return counts, lens


class BM25Index:
    """BM25Okapi-exact index over a fixed list of documents (item texts), indexed 0..n_docs-1."""

    def __init__(
        self,
        corpus: Sequence[str],
        k1: float = 1.5,
        b: float = 0.75,
        epsilon: float = 0.25,
        dense_df_frac: float | None = 0.5,
    ):
        """`dense_df_frac`: terms with df >= this fraction of the corpus use the factorised dense path
        (None disables it; scores are the same either way, only speed differs)."""
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
        n_docs, n_vocab = counts.shape[0], len(self._vocab)
        if counts.shape[1] < n_vocab:  # vocab grew (updates): widen the count matrix
            counts = sp.csr_matrix((counts.data, counts.indices, counts.indptr), shape=(n_docs, n_vocab))
            self._counts = counts
        n_vocab = counts.shape[1]
        self._n_docs = n_docs
        total = int(self._doc_len.sum())
        self.avgdl = total / n_docs if n_docs else 0.0

        df = np.bincount(counts.indices, minlength=n_vocab).astype(np.int64)  # (V,)
        present = df > 0
        idf = np.zeros(n_vocab, dtype=np.float64)
        idf[present] = np.log(n_docs - df[present] + 0.5) - np.log(df[present] + 0.5)
        self.average_idf = float(idf[present].sum() / present.sum()) if present.any() else 0.0
        idf[present & (idf < 0)] = self.epsilon * self.average_idf  # BM25Okapi's floor
        self._df, self._idf = df, idf

        # K_d and h1_d = tfc at tf=1. avgdl == 0 only when no doc has a token (then nothing is ever scored).
        rel = self._doc_len / self.avgdl if self.avgdl > 0 else np.zeros(n_docs)
        doc_k = k1 * (1 - b + b * rel)  # (N,)
        self._h1 = (k1 + 1) / (1.0 + doc_k)  # (N,)

        # per stored (doc, term) pair: W_td
        rows = np.repeat(np.arange(n_docs, dtype=np.int64), np.diff(counts.indptr))  # (nnz,)
        terms = counts.indices.astype(np.int64)
        tf = counts.data.astype(np.float64)
        weight = idf[terms] * (tf * (k1 + 1) / (tf + doc_k[rows]))  # same expression order as rank_bm25

        if self.dense_df_frac is not None and n_docs > 0:
            dense = present & (df >= self.dense_df_frac * n_docs)
        else:
            dense = np.zeros(n_vocab, dtype=bool)
        self._is_dense = dense
        on_dense = dense[terms]
        # dense terms keep only a tf>1 correction in M; their tf=1 part is idf_t * h1_d
        keep = ~on_dense | (counts.data > 1)
        value = weight
        value[on_dense] -= idf[terms[on_dense]] * self._h1[rows[on_dense]]
        m = sp.csr_matrix(
            (value[keep], (terms[keep], rows[keep])), shape=(n_vocab, n_docs), dtype=np.float64
        )  # (V, N): row t = postings of t, docs ascending (input is doc-major)
        n_post = m.nnz
        idx_dtype = np.int32 if max(n_post, n_docs) < 2**31 - 1 else np.int64
        self._post_ptr = m.indptr.astype(idx_dtype)  # (V+1,)
        self._post_doc = m.indices.astype(idx_dtype)  # (P,) doc ids
        self._post_w = m.data  # (P,) float64 weights
        del m, weight, value, keep

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
                  self._comp_doc, self._comp_one]
        return int(sum(a.nbytes for a in arrays))

    # ------------------------------------------------------------------ scoring
    def _query_terms(self, queries: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (sorted known term ids, their counts in the query). Unknown tokens are dropped."""
        token_lists = [tokenize(q) for q in queries]
        lens = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
        ids = _map_tokens(list(chain.from_iterable(token_lists)), self._vocab, grow=False)
        out = []
        for q_ids in np.split(ids, np.cumsum(lens)[:-1]) if len(token_lists) else []:
            q_ids = q_ids[(q_ids >= 0) & (q_ids < len(self._idf))]
            terms, counts = np.unique(q_ids, return_counts=True)  # sorted: the canonical summation order
            out.append((terms, counts))
        return out

    def _score_into(self, row: np.ndarray, terms: np.ndarray, counts: np.ndarray, work: np.ndarray) -> None:
        """Write the (N,) scores of one query (sorted term ids, counts) into `row`; `work` is (N,) scratch."""
        row[:] = 0.0
        # (1) sparse terms' postings and dense terms' tf>1 corrections: row_d += c_t * M_td, term by term in
        #     id order (the per-doc summation order is fixed, so equal docs get bit-identical sums)
        ptr = self._post_ptr
        for t, c in zip(terms.tolist(), counts.tolist()):
            if ptr[t + 1] > ptr[t]:
                _scatter_add(row, ptr[t:t + 2], self._post_doc, self._post_w, float(c))
        # (2) dense terms, tf=1 part: row_d += A_d * h1_d with A_d = sum of c_t * idf_t over the query's dense
        #     terms present in d, computed as  total - D_d,  D_d = sum of c_t * idf_t over those ABSENT from d
        #     (scattered over the short complement lists). total and every D_d are summed in the same term
        #     order, so a doc missing all of them gets exactly 0 and equal absence patterns give equal A_d.
        dense = self._is_dense[terms]
        if not dense.any():
            return
        d_terms = terms[dense]
        coef = (counts[dense] * self._idf[d_terms]).tolist()  # c_t * idf_t
        total = 0.0
        for v in coef:
            total += v
        cptr = self._comp_ptr
        if all(cptr[t + 1] == cptr[t] for t in d_terms.tolist()):
            row += total * self._h1  # every doc contains every dense query term
            return
        work[:] = 0.0
        for t, v in zip(d_terms.tolist(), coef):
            if cptr[t + 1] > cptr[t]:
                _scatter_add(work, cptr[t:t + 2], self._comp_doc, self._comp_one, v)
        np.subtract(total, work, out=work)  # A_d
        work *= self._h1
        row += work

    def score_batch(self, queries: Sequence[str], out: np.ndarray | None = None) -> np.ndarray:
        """(Q, N) float64 BM25Okapi scores of every document for each query (written into `out` if given)."""
        queries = list(queries)
        shape = (len(queries), self._n_docs)
        if out is None:
            out = np.empty(shape, dtype=np.float64)
        elif out.shape != shape or out.dtype != np.float64:
            raise ValueError(f"out must be float64 {shape}, got {out.dtype} {out.shape}")
        if self._n_docs == 0 or not queries:
            return out
        work = np.empty(self._n_docs, dtype=np.float64)
        for q, (terms, counts) in enumerate(self._query_terms(queries)):
            self._score_into(out[q], terms, counts, work)
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

        old = self._counts
        keep_row = np.ones(n_old, dtype=bool)
        keep_row[idx[idx < n_old]] = False
        old_rows = np.repeat(np.arange(n_old, dtype=np.int64), np.diff(old.indptr))
        keep = keep_row[old_rows]
        add_rows = idx[np.repeat(np.arange(len(idx), dtype=np.int64), np.diff(add_counts.indptr))]
        rows = np.concatenate([old_rows[keep], add_rows])
        cols = np.concatenate([old.indices[keep].astype(np.int64), add_counts.indices.astype(np.int64)])
        data = np.concatenate([old.data[keep], add_counts.data])
        self._counts = sp.csr_matrix((data, (rows, cols)), shape=(n_new, max(n_vocab, 1)), dtype=np.int32)
        self._counts.sum_duplicates()
        doc_len = np.zeros(n_new, dtype=np.int64)
        doc_len[:n_old] = self._doc_len
        doc_len[idx] = add_lens
        self._doc_len = doc_len
        self._finalise()

    def rebuild(self, corpus: Iterable[str]) -> None:
        """Full rebuild from a new corpus (same parameters)."""
        self.__init__(list(corpus), k1=self.k1, b=self.b, epsilon=self.epsilon, dense_df_frac=self.dense_df_frac)
