"""Quasi-round-robin (QRR): CALRec's retrieval of catalog items from sampled generations (Algorithm 1, 3.5).

The LLM samples several item texts for a user, each with a sequence log-probability. Each sample is turned
into a BM25 score vector over the whole catalog; QRR merges those vectors so that the most likely sample's
best item comes first, then the items BM25 ranks highly for any likely sample:

    samples (S texts), logprobs (S,)
      1. dedupe: samples with the same BM25 token sequence are one sample (they give identical BM25 vectors);
         it keeps the max logprob of its copies
      2. sort by logprob descending (ties: first occurrence first), keep the top n_preds  -> P <= n_preds
      3. X = BM25(kept samples, corpus)                                                   -> (P, N)
      4. min-max scale each row over the corpus:  X'_p = (X_p - min X_p) / (max X_p - min X_p)  in [0, 1];
         a constant row (e.g. a sample with no known token) becomes all zeros
      5. weight each row by the sample's probability, softened:  Y_p = exp(epsilon * logprob_p) * X'_p
      6. max-pool over samples:  score_d = max_p Y_pd                                        -> (N,)
    The ranking is by `score` (descending); the evaluator turns it into optimistic/pessimistic ranks.

Property: each row's maximum maps exactly to its multiplier (see `_merge_row`), so the best sample's BM25
top-1 item(s) score exactly exp(epsilon * max logprob), which no other value can exceed: it stays first.
Since the multipliers follow the logprob order, the samples' top-1 items tend to come first, in order of
likelihood (the "round"), and the remaining items interleave by normalised BM25 score; with epsilon = 1/5000
the multipliers are all close to 1, so likelihood only nudges near-ties - hence "quasi" round robin.

Cost: the index scores only the samples' posting lists (lists shared by all samples, e.g. category words,
once) plus a few dense passes, and each sample's (N,) row is merged right after it is scored (five more
passes while it is still in cache), so memory is O(N) besides the output.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from seqrec.retrieval.bm25 import BM25Index, scratch_buffer, tokenize

DEFAULT_N_PREDS = 10
DEFAULT_EPSILON = 1.0 / 5000.0


def select_samples(
    samples: Sequence[str], logprobs: Sequence[float], n_preds: int = DEFAULT_N_PREDS
) -> tuple[list[str], np.ndarray]:
    """Steps 1-2: (kept texts, their logprobs (P,) float64), best first, P <= n_preds.

    Two samples are the same when their BM25 token sequences are equal; the kept text is the first copy's.
    """
    if len(samples) != len(logprobs):
        raise ValueError(f"{len(samples)} samples but {len(logprobs)} logprobs")
    best: dict[tuple[str, ...], list] = {}  # token key -> [logprob, first position, text]
    for pos, (text, lp) in enumerate(zip(samples, logprobs)):
        lp = float(lp)
        if math.isnan(lp):
            raise ValueError(f"logprob of sample {pos} is NaN")
        key = tuple(tokenize(text))
        entry = best.get(key)
        if entry is None:
            best[key] = [lp, pos, text]
        elif lp > entry[0]:
            entry[0] = lp
    ranked = sorted(best.values(), key=lambda e: (-e[0], e[1]))[: max(0, int(n_preds))]
    return [e[2] for e in ranked], np.array([e[0] for e in ranked], dtype=np.float64)


def _unit_scale(span: float, mult: float) -> float | None:
    """A factor s with span * s == mult exactly (so (x - lo) * s maps the row maximum exactly to mult and,
    rounding being monotone, nothing above it), or None if no neighbour of mult / span does that."""
    s = mult / span
    for cand in (s, math.nextafter(s, math.inf), math.nextafter(s, -math.inf)):
        if span * cand == mult:
            return cand
    return None


def _merge_row(row: np.ndarray, logprob: float, epsilon: float, out: np.ndarray, first: bool) -> bool:
    """Steps 4-6 for one sample's (N,) BM25 row (overwritten): out = max(out, scaled row), or out = scaled
    row when `first`. Returns whether `out` now holds values (False: the row was constant, still first)."""
    lo, hi = float(row.min()), float(row.max())
    span = hi - lo
    mult = math.exp(epsilon * float(logprob))
    if not (span > 0.0 and math.isfinite(span)) or mult == 0.0:
        return not first  # constant row: scaled to zeros, adds nothing to a max over values >= 0
    dest = out if first else row
    np.subtract(row, lo, out=dest)
    scale = _unit_scale(span, mult)
    if scale is not None:
        dest *= scale  # row max -> exactly mult
    else:
        dest /= span  # row max -> exactly 1.0
        dest *= mult
    if not first:
        np.maximum(out, row, out=out)
    return True


def _qrr_into(texts: list[str], lps: np.ndarray, index: BM25Index, epsilon: float, out: np.ndarray,
              row: np.ndarray | None = None) -> np.ndarray:
    """Steps 3-6, one sample at a time (its row stays in cache for the min/max/scale/max passes)."""
    if out.size == 0:
        return out
    if row is None:  # safe to share per thread: this loop finishes with it before returning
        row = scratch_buffer(out.size, "qrr.row")
    filled = False
    for p, scores in index.iter_scores(texts, row):
        filled = _merge_row(scores, lps[p], epsilon, out, first=not filled)
    if not filled:
        out[:] = 0.0
    return out


def quasi_round_robin(
    samples: Sequence[str],
    logprobs: Sequence[float],
    index: BM25Index,
    n_preds: int = DEFAULT_N_PREDS,
    epsilon: float = DEFAULT_EPSILON,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """(N,) float64 QRR item scores for one user's sampled generations (higher is better).

    No usable sample (empty list) gives all zeros (every item ties).
    """
    n_docs = index.n_docs
    if out is None:
        out = np.empty(n_docs, dtype=np.float64)
    elif out.shape != (n_docs,) or out.dtype != np.float64:
        raise ValueError(f"out must be a float64 array of shape ({n_docs},)")
    texts, lps = select_samples(samples, logprobs, n_preds)
    return _qrr_into(texts, lps, index, epsilon, out)


def qrr_batch(
    samples_per_user: Sequence[Sequence[str]],
    logprobs_per_user: Sequence[Sequence[float]],
    index: BM25Index,
    n_preds: int = DEFAULT_N_PREDS,
    epsilon: float = DEFAULT_EPSILON,
    dtype=np.float64,
) -> np.ndarray:
    """(B, N) QRR scores for B users; two (N,) work rows are reused, so memory is the output plus O(N).
    `dtype=np.float32` halves the output (scores in [0, 1]; float32 may merge scores closer than ~6e-8)."""
    if len(samples_per_user) != len(logprobs_per_user):
        raise ValueError("samples_per_user and logprobs_per_user differ in length")
    n_docs = index.n_docs
    result = np.empty((len(samples_per_user), n_docs), dtype=dtype)
    row = np.empty(n_docs, dtype=np.float64)
    merged = np.empty(n_docs, dtype=np.float64)
    for u, (samples, logprobs) in enumerate(zip(samples_per_user, logprobs_per_user)):
        texts, lps = select_samples(samples, logprobs, n_preds)
        result[u] = _qrr_into(texts, lps, index, epsilon, merged, row)
    return result
