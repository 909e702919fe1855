"""The Ray-free serving logic: the catalog, the loaded model and ranking. Deployments (deployments.py) wrap it.

Ranking is the offline path: `make_batch(histories, max_len=model.max_len)` -> `model.score_all(batch)` ->
(B, n_items) scores, exactly what `seqrec.eval.evaluator.evaluate` ranks. Top-k is exact (one `topk` over
the full score row, ties broken by lower item index like `BM25Index.top_k`). At Scientific's 4,385 items
the (B, D) x (D, V) product and the top-k take well under a millisecond on one core, so an ANN index would
only add approximation error (served rankings must equal offline ones); it starts to pay off around 10^6
items, where `score_all`'s chunked scoring still keeps memory bounded.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from seqrec.data.batching import make_batch

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A client error with its HTTP status (4xx) and a message meant for the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def as_dict(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "message": self.message}}


# ------------------------------------------------------------------------------------------- catalog
@dataclass
class CatalogChange:
    """One added or updated item, as kept by the catalog store (ordered by `version`)."""

    version: int
    item_idx: int
    item_id: str
    title: str
    text: str
    is_new: bool


@dataclass
class Catalog:
    """Item ids (ASINs), titles and texts aligned with item_idx, plus the changes applied since loading."""

    item_ids: list[str]
    titles: list[str]
    texts: list[str]
    version: int = 0  # version of the last catalog change applied
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.index:
            self.index = {item_id: i for i, item_id in enumerate(self.item_ids)}

    @classmethod
    def from_dataset(cls, dataset_path: str) -> "Catalog":
        from seqrec.data.dataset import PreparedDataset

        ds = PreparedDataset.load(dataset_path)
        items = ds.items
        titles = [t or "" for t in items.column("title").to_pylist()]
        return cls(item_ids=ds.item_ids(), titles=titles, texts=ds.item_texts())

    def __len__(self) -> int:
        return len(self.item_ids)

    def apply(self, change: CatalogChange) -> None:
        if change.is_new:
            if change.item_idx != len(self.item_ids):
                raise RuntimeError(f"catalog out of sync: new item {change.item_idx} but {len(self.item_ids)} items")
            self.item_ids.append(change.item_id)
            self.titles.append(change.title)
            self.texts.append(change.text)
            self.index[change.item_id] = change.item_idx
        else:
            self.titles[change.item_idx] = change.title
            self.texts[change.item_idx] = change.text
        self.version = change.version

    def resolve(self, history: Sequence[int | str]) -> np.ndarray:
        """Item indices of a history given as item_idx ints and/or ASIN strings; unknown items -> 422."""
        out = np.empty(len(history), dtype=np.int64)
        unknown = []
        n = len(self.item_ids)
        for pos, item in enumerate(history):
            if isinstance(item, bool):  # JSON true/false are not item indices
                unknown.append(item)
                continue
            if isinstance(item, int):
                if 0 <= item < n:
                    out[pos] = item
                    continue
            elif isinstance(item, str):
                idx = self.index.get(item)
                if idx is not None:
                    out[pos] = idx
                    continue
            unknown.append(item)
        if unknown:
            shown = ", ".join(repr(u)[:40] for u in unknown[:5])
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise RequestError(422, f"unknown items in history: {shown}{more}; use item_idx 0..{n - 1} or a known item_id")
        return out

    def describe(self, idx: int, score: float) -> dict[str, Any]:
        return {"item_idx": int(idx), "item_id": self.item_ids[idx], "title": self.titles[idx], "score": float(score)}


def top_k_rows(scores: torch.Tensor, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row: (item indices, scores) of the k best finite scores, score descending, ties by lower index.

    `topk` alone does not define the order among equal scores. One batched `topk`, then its k entries are
    ordered by (score desc, index asc); a row where more items tie with its k-th score than fit (topk's cut
    among them is arbitrary) is redone by `_top_k_row`, which gathers every tied item. Either way the result
    equals a stable sort of the whole row.
    """
    b, n = scores.shape
    k = max(0, min(int(k), n))
    if k == 0 or b == 0:
        return [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)) for _ in range(b)]
    vals, idx = torch.topk(scores, k, dim=1)  # (B, k)
    order = torch.argsort(idx, dim=1)  # index ascending, then a stable sort by score: (score desc, index asc)
    idx, vals = idx.gather(1, order), vals.gather(1, order)
    order = torch.argsort(vals, dim=1, descending=True, stable=True)
    idx, vals = idx.gather(1, order), vals.gather(1, order)
    cut_ties = (scores >= vals[:, -1:]).sum(1) > k  # (B,)
    idx_np, vals_np = idx.numpy(), vals.double().numpy()
    out = []
    for row in range(b):
        if bool(cut_ties[row]):
            out.append(_top_k_row(scores[row], k))
            continue
        keep = np.isfinite(vals_np[row])  # excluded (history) items are -inf
        out.append((idx_np[row][keep].astype(np.int64), vals_np[row][keep]))
    return out


def _top_k_row(row: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One row, every item tied with the k-th score gathered and ordered explicitly."""
    kth = torch.topk(row, k).values[-1]
    cand = torch.nonzero(row >= kth).squeeze(1).numpy()
    vals = row[cand].double().numpy()
    order = np.lexsort((cand, -vals))[:k]
    idx, val = cand[order], vals[order]
    keep = np.isfinite(val)
    return idx[keep].astype(np.int64), val[keep]


# ------------------------------------------------------------------------------------------- model
def file_digest(path: Path, n_hex: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n_hex]


@dataclass
class LoadedModel:
    """A model ready to rank, with everything serving needs to know about it."""

    model: torch.nn.Module
    meta: dict[str, Any]
    checkpoint: str
    dataset: str
    version: str  # <model name>@<checkpoint dir name>#<weights sha256 prefix>
    loaded_at: float
    encoder: Any = None  # frozen text encoder, for critiques / text-only new items (feature models only)
    critique_cache: Any = None  # flare.CritiqueCache of this model's encoder (models with an encoder)

    @property
    def name(self) -> str:
        return str(self.meta.get("model_name"))

    @property
    def n_scored(self) -> int:
        return int(getattr(self.model, "n_items"))

    @property
    def supports_critique(self) -> bool:
        flag = getattr(self.model, "supports_critique", None)
        if flag is not None:
            return bool(flag)
        return bool(getattr(self.model, "needs_item_features", False))  # Flare T+ID reads critique text

    @property
    def is_generator(self) -> bool:
        """Generative recommenders (CALRec) write item texts (`generations`) that BM25 + QRR turn into items."""
        return callable(getattr(self.model, "generations", None))

    @property
    def supports_new_items(self) -> bool:
        """New items become rankable from their text alone (no retraining): models with text features."""
        return hasattr(self.model, "add_items") and bool(getattr(self.model, "needs_item_features", False))

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "checkpoint": self.checkpoint, "dataset": self.dataset,
                "n_items": self.n_scored, "critique": self.supports_critique, "new_items": self.supports_new_items,
                "generator": self.is_generator,
                **({"critique_cache": {"hits": self.critique_cache.hits, "misses": self.critique_cache.misses}}
                   if self.critique_cache is not None else {})}


def serving_device() -> torch.device:
    """Where a replica scores: its GPU when Ray gave it one (num_gpus > 0 sets CUDA_VISIBLE_DEVICES to it; with
    num_gpus 0 Ray hides every GPU, so torch sees none), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_serving(checkpoint: str, dataset: str, encoder_name: str = "minilm",
                     device: str | torch.device | None = None) -> LoadedModel:
    """Load a checkpoint (the same `registry.load_model` as evaluation) onto `device` (default
    serving_device()), attach text features when the model reads them, and check it matches the catalog."""
    from seqrec.models.registry import WEIGHTS_FILE, load_model

    from seqrec.data.dataset import PreparedDataset

    prepared = PreparedDataset.load(dataset)
    # the same catalog binding as training/evaluation; features encoded in-process (a replica is one small actor)
    model, meta = load_model(checkpoint, device=device or serving_device(), dataset=prepared, use_ray=False)
    encoder = critique_cache = None
    if getattr(model, "needs_item_features", False):
        from seqrec.features.encoder import FrozenTextEncoder
        from seqrec.models.flare import CritiqueCache

        cfg = model.config  # critiques and new items must go through the encoder the features came from
        encoder = FrozenTextEncoder.load(getattr(cfg, "encoder", None) or encoder_name,
                                         max_tokens=int(getattr(cfg, "max_text_tokens", 64)))
        critique_cache = CritiqueCache()  # per loaded model: a swap to another encoder starts empty
    n_items = prepared.n_items
    if int(getattr(model, "n_items")) != n_items:
        raise ValueError(f"checkpoint {checkpoint} scores {model.n_items} items but dataset {dataset} has {n_items}")
    ckpt = Path(checkpoint)
    version = f"{meta.get('model_name')}@{ckpt.name}#{file_digest(ckpt / WEIGHTS_FILE)}"
    return LoadedModel(model=model.eval(), meta=meta, checkpoint=str(ckpt), dataset=dataset, version=version,
                       loaded_at=time.time(), encoder=encoder, critique_cache=critique_cache)


def add_items_to_model(loaded: LoadedModel, texts: list[str]) -> None:
    """Append new catalog items to a text-feature model from their text (FLARE's item path: frozen encoder
    token features -> the model's own item tower), in catalog order."""
    if not texts:
        return
    with torch.no_grad():
        tokens, mask = loaded.encoder.encode(texts)  # (N, T, D), (N, T)
    loaded.model.add_items(tokens.to(torch.float16), mask)  # fp16, like the feature cache


@dataclass
class Prepared:
    """One validated /recommend request in item-index space."""

    history: np.ndarray  # (L,) int64
    k: int
    critique: str | None
    exclude_history: bool


@torch.no_grad()
def rank(loaded: LoadedModel, catalog: Catalog, requests: Sequence[Prepared]) -> list[dict[str, Any]]:
    """Top-k items for a batch of requests through `score_all` (critique requests in their own sub-batch)."""
    results: list[dict[str, Any] | None] = [None] * len(requests)
    model = loaded.model
    max_len = getattr(model, "max_len", None)
    groups = {False: [], True: []}
    for i, r in enumerate(requests):
        groups[r.critique is not None].append(i)
    for with_critique, rows in groups.items():
        if not rows:
            continue
        batch = make_batch([requests[i].history for i in rows], max_len=max_len)
        if with_critique:
            texts = [requests[i].critique for i in rows]
            if loaded.critique_cache is not None and hasattr(model, "critique_hints"):
                batch["critique_hint"] = loaded.critique_cache.hints(texts, loaded.encoder, model)  # (B, D)
            else:
                from seqrec.models.flare import encode_critiques

                tokens, mask = encode_critiques(texts, loaded.encoder, cache=loaded.critique_cache)
                batch["critique_tokens"], batch["critique_mask"] = tokens, mask  # (B, Tc, D), (B, Tc)
        device = next(model.parameters()).device
        if device.type != "cpu":  # a GPU replica: inputs to its device, scores back for the top-k and JSON
            batch = {k: v.to(device) for k, v in batch.items()}
        scores = model.score_all(batch).cpu()  # (B, n_items)
        if scores.dtype not in (torch.float32, torch.float64):
            scores = scores.float()
        n = min(scores.shape[1], len(catalog))
        scores = scores[:, :n]
        for j, i in enumerate(rows):
            if requests[i].exclude_history:
                hist = torch.from_numpy(requests[i].history)
                scores[j, hist[hist < n]] = float("-inf")
        for j, (idx, val) in enumerate(top_k_rows(scores, max(requests[i].k for i in rows))):
            r = requests[rows[j]]
            results[rows[j]] = {"items": [catalog.describe(a, b) for a, b in zip(idx[: r.k], val[: r.k])]}
    return results  # type: ignore[return-value]



# ------------------------------------------------------------------------------------------- generators
@torch.no_grad()
def generate(loaded: LoadedModel, requests: Sequence[Prepared]) -> list[tuple[list[str], list[float]]]:
    """Per request: (sampled item texts, their sequence log-probs) from the model's own `generations`
    (CALRec: prompt template, KV-cached temperature sampling, untempered log-probs; cached per history)."""
    model = loaded.model
    batch = make_batch([r.history for r in requests], max_len=getattr(model, "max_len", None))
    return model.generations(batch)


def qrr_rank(index, catalog: Catalog, samples: Sequence[tuple[list[str], list[float]]], requests: Sequence[Prepared],
             n_preds: int, epsilon: float) -> list[dict[str, Any]]:
    """Top-k catalog items per request from its generations: `seqrec.retrieval.qrr.qrr_batch` over the BM25
    index (what offline CALRec `score_all` ranks with retrieval="qrr"), then the exact top-k of `rank`."""
    from seqrec.retrieval.qrr import qrr_batch

    scores = torch.from_numpy(qrr_batch([s for s, _ in samples], [lp for _, lp in samples], index, n_preds, epsilon))
    n = min(scores.shape[1], len(catalog))
    scores = scores[:, :n]
    for j, r in enumerate(requests):
        if r.exclude_history:
            hist = torch.from_numpy(r.history)
            scores[j, hist[hist < n]] = float("-inf")
    out = []
    for r, (idx, val) in zip(requests, top_k_rows(scores, max(r.k for r in requests))):
        out.append({"items": [catalog.describe(a, b) for a, b in zip(idx[: r.k], val[: r.k])]})
    return out
