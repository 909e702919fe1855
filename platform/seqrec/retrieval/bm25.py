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
        value = weight.copy()
        value[on_dense] -= idf[terms[on_dense]] * self._h1[rows[on_dense]]
        self._M = sp.csr_matrix(
            (value[keep], (terms[keep], rows[keep])), shape=(n_vocab, n_docs), dtype=np.float64
        )  # (V, N): row t = postings of t
        self._M.sum_duplicates()

        # complement lists of dense terms: docs NOT containing t (sorted), as CSR-like arrays over dense slots
        dense_ids = np.flatnonzero(dense)
        self._dense_slot = np.full(n_vocab, -1, dtype=np.int64)
        self._dense_slot[dense_ids] = np.arange(len(dense_ids))
        comp_ptr = [0]
        comp_idx = []
        if len(dense_ids):
            by_term = counts.tocsc()
            for t in dense_ids:
                has = np.zeros(n_docs, dtype=bool)
                has[by_term.indices[by_term.indptr[t]:by_term.indptr[t + 1]]] = True
                missing = np.flatnonzero(~has)
                comp_idx.append(missing)
                comp_ptr.append(comp_ptr[-1] + len(missing))
        self._comp_ptr = np.asarray(comp_ptr, dtype=np.int64)
        self._comp_idx = np.concatenate(comp_idx) if comp_idx else np.zeros(0, dtype=np.int64)

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
        arrays = [self._M.data, self._M.indices, self._M.indptr, self._counts.data, self._counts.indices,
                  self._counts.indptr, self._doc_len, self._h1, self._idf, self._df, self._comp_idx]
        return int(sum(a.nbytes for a in arrays))

    # ------------------------------------------------------------------ scoring
    def _query_matrix(self, queries: Sequence[str]) -> sp.csr_matrix:
        """(Q, V) float64 term counts of the queries, unknown tokens dropped, columns sorted."""
        token_lists = [tokenize(q) for q in queries]
        lens = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
        ids = _map_tokens(list(chain.from_iterable(token_lists)), self._vocab, grow=False)
        rows = np.repeat(np.arange(len(token_lists), dtype=np.int64), lens)
        ok = (ids >= 0) & (ids < self._M.shape[0])
        qm = sp.csr_matrix(
            (np.ones(int(ok.sum()), dtype=np.float64), (rows[ok], ids[ok])),
            shape=(len(token_lists), self._M.shape[0]),
        )
        qm.sum_duplicates()  # canonical: sorted term ids per row, counts summed
        return qm

    def score_batch(self, queries: Sequence[str]) -> np.ndarray:
        """(Q, N) float64 BM25Okapi scores of every document for each query."""
        queries = list(queries)
        n_q, n_docs = len(queries), self._n_docs
        if n_q == 0 or n_docs == 0:
            return np.zeros((n_q, n_docs), dtype=np.float64)
        qm = self._query_matrix(queries)
        # sparse terms' postings and dense terms' tf>1 corrections: (Q, V) @ (V, N)
        out = (qm @ self._M).toarray()  # (Q, N) float64
        if not self._is_dense.any():
            return out
        idf, h1, slot = self._idf, self._h1, self._dense_slot
        for q in range(n_q):
            lo, hi = qm.indptr[q], qm.indptr[q + 1]
            terms = qm.indices[lo:hi]
            sel = self._is_dense[terms]
            if not sel.any():
                continue
            d_terms = terms[sel]  # sorted term ids: the canonical summation order
            coef = qm.data[lo:hi][sel] * idf[d_terms]  # c_qt * idf_t
            slots = slot[d_terms]
            comps = [self._comp_idx[self._comp_ptr[s]:self._comp_ptr[s + 1]] for s in slots]
            union = np.unique(np.concatenate(comps)) if any(len(c) for c in comps) else None
            total = 0.0
            a_union = np.zeros(len(union)) if union is not None else None
            for v, comp in zip(coef.tolist(), comps):
                total += v
                if a_union is not None:
                    # doc in union has the term unless it is in this term's complement list
                    missing = np.zeros(len(union), dtype=bool)
                    if len(comp):
                        missing[np.searchsorted(union, comp)] = True
                    a_union += np.where(missing, 0.0, v)
            row = out[q]
            if union is not None:
                base = row[union]  # sparse part of the complement docs (copy)
                row += total * h1
                row[union] = base + a_union * h1[union]
            else:
                row += total * h1
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
