"""Reference recommenders in the common interface: MostPop, Last Item Repeater, LIR through BM25 or MiniLM text,
and the first-order item transition model (Markov).

They are cheap, deterministic and tie-heavy, which makes them the sanity floor for every run and a good
exercise of the optimistic/pessimistic distinction.
"""
from __future__ import annotations

import numpy as np
import torch

from seqrec.data.batching import last_items


class MostPop:
    """Every user gets the training popularity ranking (counts of item occurrences in training sequences)."""

    name = "mostpop"
    max_len = None

    def __init__(self, item_counts: np.ndarray):
        self.scores = torch.as_tensor(np.asarray(item_counts, dtype=np.float32))  # (N,)

    @classmethod
    def from_dataset(cls, dataset) -> "MostPop":
        return cls(dataset.train_item_counts())

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scores.to(batch["history"].device).expand(batch["history"].shape[0], -1)  # (B, N)


class LastItemRepeater:
    """Ranks the last history item first; every other item ties at 0 (so pes ranks them last)."""

    name = "lir"
    max_len = None

    def __init__(self, n_items: int):
        self.n_items = n_items

    @classmethod
    def from_dataset(cls, dataset) -> "LastItemRepeater":
        return cls(dataset.n_items)

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        last = last_items(batch)  # (B,)
        scores = torch.zeros(len(last), self.n_items, device=last.device)
        has = last >= 0
        scores[has.nonzero().squeeze(1), last[has]] = 1.0
        return scores


class LastItemBM25:
    """CALRec's LIR variant: all items ranked by BM25 similarity of their text to the last item's text."""

    name = "lir_bm25"
    max_len = None

    def __init__(self, item_texts: list[str], bm25=None):
        from seqrec.retrieval.bm25 import BM25Index

        self.item_texts = item_texts
        self.index = bm25 if bm25 is not None else BM25Index(item_texts)

    @classmethod
    def from_dataset(cls, dataset) -> "LastItemBM25":
        return cls(dataset.item_texts())

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        last = last_items(batch).tolist()
        queries = [self.item_texts[i] if i >= 0 else "" for i in last]
        # float64 as computed: BM25 ties (identical texts) stay exact ties, none are created by rounding
        return torch.from_numpy(np.asarray(self.index.score_batch(queries), dtype=np.float64))


def last_item_similarity(embeddings: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, N) dot products of each row's last history item embedding with every item's: cosines when the
    (N, D) embeddings are unit rows; 0 for an empty history. lir_text's scores and Flare's text prior."""
    last = last_items(batch)
    query = embeddings[last.clamp(min=0)] * (last >= 0).unsqueeze(1).to(embeddings.dtype)  # (B, D)
    return query @ embeddings.T  # (B, N)


class LastItemText:
    """All items ranked by cosine similarity of frozen-encoder (MiniLM) embeddings to the last item's."""

    name = "lir_text"
    max_len = None

    def __init__(self, item_embeddings: torch.Tensor):
        self.emb = torch.nn.functional.normalize(item_embeddings.float(), dim=-1)  # (N, D)

    @classmethod
    def from_dataset(cls, dataset, encoder_name: str = "minilm") -> "LastItemText":
        from seqrec.models.text_prior import catalog_table  # the text prior's table: one pooling of the cache

        return cls(catalog_table(dataset, encoder_name))

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return last_item_similarity(self.emb, batch)


class ItemTransition:
    """First-order Markov chain: items ranked by how often they followed the last history item in the training
    sequences, ties (and unseen transitions) broken by training popularity. The reference for what exact
    item-to-item memorisation alone reaches (on Scientific its Recall@1 matches Bert4Rec's: docs/evaluation.md)."""

    name = "markov"
    max_len = None

    def __init__(self, n_items: int, sequences, item_counts: np.ndarray):
        prev = np.concatenate([np.asarray(s[:-1], dtype=np.int64) for s in sequences] or [np.zeros(0, np.int64)])
        nxt = np.concatenate([np.asarray(s[1:], dtype=np.int64) for s in sequences] or [np.zeros(0, np.int64)])
        pairs, counts = np.unique(prev * n_items + nxt, return_counts=True)  # sorted by prev, then next
        self.next_items = torch.as_tensor(pairs % n_items)  # CSR by previous item: its successors and counts
        self.counts = torch.as_tensor(counts, dtype=torch.float64)
        self.offsets = torch.as_tensor(np.searchsorted(pairs // n_items, np.arange(n_items + 1)))
        pop = np.asarray(item_counts, dtype=np.float64)
        self.backoff = torch.as_tensor(pop / (pop.max(initial=0.0) + 1.0))  # < 1: never outranks one transition

    @classmethod
    def from_dataset(cls, dataset) -> "ItemTransition":
        return cls(dataset.n_items, dataset.train_sequences(), dataset.train_item_counts())

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        last = last_items(batch).cpu()  # (B,)
        scores = self.backoff.expand(len(last), -1).clone()  # (B, N) float64: counts + backoff stay exact
        rows, items, counts = self.transitions(last)
        scores[rows, items] += counts
        return scores

    def transitions(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, items, counts), flat: every training transition out of each row's last item (PAD: none).
        Shared with the transition prior (models/transition_prior.py)."""
        last = last.cpu()
        safe = last.clamp(min=0)
        lo, hi = self.offsets[safe], self.offsets[safe + 1]
        hi = torch.where(last >= 0, hi, lo)  # empty history: popularity only
        n = hi - lo
        rows = torch.repeat_interleave(torch.arange(len(last)), n)
        start = torch.repeat_interleave(n.cumsum(0) - n, n)  # where each row's run begins in the flat list
        idx = torch.repeat_interleave(lo, n) + torch.arange(int(n.sum())) - start  # (sum n,) CSR positions
        return rows, self.next_items[idx], self.counts[idx]


BASELINES = {cls.name: cls for cls in (MostPop, LastItemRepeater, LastItemBM25, LastItemText, ItemTransition)}
