"""Ray Serve deployments: the recommender, the BM25 search replica and the catalog store.

Model and catalog are chosen by each deployment's `user_config` ({"checkpoint", "dataset"} / {"dataset"}),
so a model swap is a user_config change: Serve calls `reconfigure` on the running replicas instead of
restarting them. `reconfigure` loads the new model in a worker thread while the old one keeps serving,
then swaps one reference; a batch already running finishes on the model it started with. A failed swap
keeps the old model and reports the error in /version.

Catalog additions (POST /items) go to `CatalogStore` (one replica, the ordered list of changes since the
dataset was loaded). Recommender and BM25 replicas poll it every `catalog_sync_s` and apply new changes in
order, so every replica, including ones started later or restarted after a crash, converges to the same
item_idx assignment. The store keeps changes in memory: they survive replica restarts of the other
deployments but not a restart of the store itself (persisting them is future work).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import asdict
from typing import Any

import numpy as np
from ray import serve

from seqrec.serve.config import ServeSettings, settings_from_dict
from seqrec.serve.core import (
    Catalog,
    CatalogChange,
    LoadedModel,
    Prepared,
    RequestError,
    add_items_to_model,
    generate,
    load_for_serving,
    qrr_rank,
    rank,
)

log = logging.getLogger("seqrec.serve")


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit use)
        return f"pid-{os.getpid()}"


class _CatalogFollower:
    """Base of the model replicas (Recommender, Generator): loads the checkpoint named by Serve's user_config,
    swaps it in without dropping requests, and follows the catalog store's changes in a background task.

    A subclass calls `_init_follower` in its __init__ and may override `_accept` (refuse a loaded model of the
    wrong kind) and `_apply_changes` (what catalog changes do to its model).
    """

    store: Any
    settings: ServeSettings
    _sync_task: asyncio.Task | None = None

    def _init_follower(self, settings: dict[str, Any], store) -> None:
        self.settings = settings_from_dict(settings)
        self.store = store
        self._state: tuple[LoadedModel, Catalog] | None = None
        self._lock = threading.Lock()  # model/catalog mutation (catalog sync, swaps) vs the serving threads
        self._source: dict[str, Any] | None = None
        self._last_error: str | None = None
        self._swaps = 0

    def _accept(self, loaded: LoadedModel, user_config: dict[str, Any]) -> None:
        """Raise if this replica cannot serve `loaded` (a swap then keeps the old model in service)."""

    def _apply_changes(self, loaded: LoadedModel, catalog: Catalog, changes: list[CatalogChange]) -> None:
        with self._lock:  # ids and titles only
            for c in changes:
                if c.version > catalog.version:
                    catalog.apply(c)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the model named by user_config ({"checkpoint", "dataset"}) and swap it in. A failed swap keeps
        the old model serving (/version says why); a failed first load fails the replica with the loader's message."""
        if user_config == self._source and self._state is not None:
            return
        try:
            loaded = await asyncio.to_thread(load_for_serving, user_config["checkpoint"], user_config["dataset"],
                                             self.settings.encoder)
            self._accept(loaded, user_config)
            catalog = await asyncio.to_thread(Catalog.from_dataset, user_config["dataset"])
            changes = await self._changes_since(0)
            await asyncio.to_thread(self._apply_changes, loaded, catalog, changes)
        except Exception as e:
            if self._state is None:
                raise
            self._last_error = f"swap to {user_config.get('checkpoint')} failed: {type(e).__name__}: {e}"
            log.error("%s; still serving %s", self._last_error, self._state[0].version)
            return
        old = self._state
        with self._lock:
            self._state = (loaded, catalog)
        self._source, self._last_error = dict(user_config), None
        self._swaps += old is not None
        log.info("%s serving %s (%d items)%s", type(self).__name__, loaded.version, len(catalog),
                 f", replaced {old[0].version}" if old else "")
        self._start_sync()

    def _start_sync(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.catalog_sync_s)
            try:
                await self.sync_catalog()
            except Exception:  # the store may be restarting; try again next period
                log.warning("catalog sync failed", exc_info=True)

    async def _changes_since(self, version: int) -> list[CatalogChange]:
        rows = await self.store.changes_since.remote(version)
        return [CatalogChange(**r) for r in rows]

    async def sync_catalog(self) -> int:
        state = self._state
        if state is None:
            return 0
        changes = await self._changes_since(state[1].version)
        if changes:
            await asyncio.to_thread(self._apply_changes, state[0], state[1], changes)
        return state[1].version

    def check_health(self) -> None:
        if self._state is None:
            raise RuntimeError("no model loaded")

    def _info(self, **extra: Any) -> dict[str, Any]:
        if self._state is None:
            return {"ready": False, "error": self._last_error}
        loaded, catalog = self._state
        return {"ready": True, **loaded.info(), "catalog_version": catalog.version, "catalog_items": len(catalog),
                "replica": _replica_id(), "pid": os.getpid(), "swaps": self._swaps, "last_swap_error": self._last_error,
                **extra}


# ------------------------------------------------------------------------------------------- store
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class CatalogStore:
    """The ordered catalog changes (additions and text updates) since the dataset was loaded."""

    def __init__(self) -> None:
        self.dataset: str | None = None
        self.index: dict[str, int] = {}
        self.n_items = 0
        self.changes: list[CatalogChange] = []

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        dataset = user_config["dataset"]
        if dataset != self.dataset:  # a different catalog: earlier changes refer to other indices
            catalog = Catalog.from_dataset(dataset)
            self.dataset, self.index, self.n_items, self.changes = dataset, catalog.index, len(catalog), []

    def version(self) -> int:
        return len(self.changes)

    def changes_since(self, version: int) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.changes[int(version):]]

    def submit(self, items: list[dict[str, str]], allow_new: bool) -> dict[str, Any]:
        """Validate all items first, then append their changes (all or nothing). Items: item_id, title, text."""
        new_ids = [it["item_id"] for it in items if it["item_id"] not in self.index]
        if new_ids and not allow_new:
            shown = ", ".join(repr(i)[:40] for i in new_ids[:5])
            return RequestError(422, f"the served model cannot rank items it was not trained on (no text path); "
                                     f"unknown item_id(s) {shown}. Updating known items is allowed.").as_dict()
        added, updated = [], []
        for it in items:
            idx = self.index.get(it["item_id"])
            is_new = idx is None
            if is_new:
                idx = self.n_items
                self.index[it["item_id"]] = idx
                self.n_items += 1
            change = CatalogChange(version=len(self.changes) + 1, item_idx=idx, item_id=it["item_id"],
                                   title=it["title"], text=it["text"], is_new=is_new)
            self.changes.append(change)
            (added if is_new else updated).append({"item_idx": idx, "item_id": it["item_id"], "title": it["title"],
                                                   "score": 0.0})
        return {"added": added, "updated": updated, "catalog_version": len(self.changes)}


# ------------------------------------------------------------------------------------------- recommender
@serve.deployment
class Recommender(_CatalogFollower):
    """Ranks the catalog for a history with the model's `score_all`, batching concurrent requests."""

    def __init__(self, settings: dict[str, Any], store) -> None:
        import torch

        self._init_follower(settings, store)
        torch.set_num_threads(max(1, self.settings.torch_threads))
        self._batches = (0, 0)  # (batches ranked, requests in them) since start
        self._rank_batch.set_max_batch_size(self.settings.max_batch_size)
        self._rank_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    def _apply_changes(self, loaded: LoadedModel, catalog: Catalog, changes: list[CatalogChange]) -> None:
        new_texts = []
        with self._lock:
            for c in changes:
                if c.version <= catalog.version:
                    continue
                catalog.apply(c)
                if c.is_new:
                    new_texts.append(c.text)
            if new_texts and loaded.supports_new_items:
                add_items_to_model(loaded, new_texts)

    def info(self) -> dict[str, Any]:
        batches, ranked = self._batches
        return self._info(max_batch_size=self.settings.max_batch_size,
                          batches={"count": batches, "requests": ranked, "mean_size": ranked / max(1, batches)})

    async def recommend(self, payload: dict[str, Any]) -> dict[str, Any]:
        """payload: history (item_idx/item_id list), k, critique (str|None), exclude_history. Validated for
        shape by the ingress; here against the catalog and the model. Errors come back as {"error": ...}."""
        state = self._state
        if state is None:
            return RequestError(503, "model is loading").as_dict()
        loaded, catalog = state
        try:
            if payload.get("critique") is not None and not loaded.supports_critique:
                raise RequestError(422, f"model {loaded.name!r} does not take critiques; "
                                        "send the request without 'critique' or serve a model with text critique support")
            prepared = Prepared(history=catalog.resolve(payload["history"]), k=int(payload["k"]),
                                critique=payload.get("critique"), exclude_history=bool(payload.get("exclude_history")))
        except RequestError as e:
            return e.as_dict()
        return await self._rank_batch(prepared)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _rank_batch(self, requests: list[Prepared]) -> list[dict[str, Any]]:
        state = self._state
        loaded, catalog = state
        self._batches = (self._batches[0] + 1, self._batches[1] + len(requests))  # /version: batches, mean size
        try:
            if self.settings.rank_in_thread:
                results = await asyncio.to_thread(self._rank_locked, loaded, catalog, requests)
            else:
                results = self._rank_locked(loaded, catalog, requests)
        except Exception as e:  # a bug or a model error: every request of the batch gets the message
            log.exception("ranking failed")
            return [RequestError(500, f"ranking failed: {type(e).__name__}: {e}").as_dict()] * len(requests)
        model = {"name": loaded.name, "version": loaded.version, "checkpoint": loaded.checkpoint}
        for r in results:
            r["model"] = model
            r["catalog_version"] = catalog.version
        return results

    def _rank_locked(self, loaded: LoadedModel, catalog: Catalog, requests: list[Prepared]) -> list[dict[str, Any]]:
        with self._lock:
            return rank(loaded, catalog, requests)


# ------------------------------------------------------------------------------------------- bm25
@serve.deployment
class BM25Search(_CatalogFollower):
    """BM25 over the item texts (`seqrec.retrieval.bm25.BM25Index`): text search for the API and the
    retrieval step of generative recommenders.

    Generative recommenders: the `Generator` deployment sends a batch's sampled texts and log-probs to
    `qrr_rank`, which merges them with `seqrec.retrieval.qrr.qrr_batch` over this index (the catalog as the
    store has it, text updates included) and returns the top-k items; `top_k_batch` / `score_queries` give
    the raw per-text rankings / BM25 rows.
    """

    def __init__(self, settings: dict[str, Any], store) -> None:
        self.settings = settings_from_dict(settings)
        self.store = store
        self._state = None  # (BM25Index, Catalog)
        self._lock = threading.Lock()  # add_or_update must not run while another thread scores
        self._dataset: str | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        dataset = user_config["dataset"]
        if dataset == self._dataset and self._state is not None:
            return
        state = await asyncio.to_thread(self._build, dataset)
        changes = await self._changes_since(0)
        await asyncio.to_thread(self._apply_changes, *state, changes)
        self._state, self._dataset = state, dataset
        self._start_sync()

    @staticmethod
    def _build(dataset: str):
        from seqrec.retrieval.bm25 import BM25Index

        catalog = Catalog.from_dataset(dataset)
        return BM25Index(catalog.texts), catalog

    def _apply_changes(self, index, catalog: Catalog, changes: list[CatalogChange]) -> None:
        with self._lock:
            todo = {}
            for c in changes:
                if c.version <= catalog.version:
                    continue
                catalog.apply(c)
                todo[c.item_idx] = c.text
            index.add_or_update(todo)

    def check_health(self) -> None:
        if self._state is None:
            raise RuntimeError("index not built")

    def info(self) -> dict[str, Any]:
        if self._state is None:
            return {"ready": False}
        index, catalog = self._state
        return {"ready": True, "n_docs": index.n_docs, "vocab": index.vocab_size, "catalog_version": catalog.version,
                "replica": _replica_id(), "pid": os.getpid()}

    def search(self, query: str, k: int) -> dict[str, Any]:
        from seqrec.retrieval.bm25 import tokenize

        if not tokenize(query):
            return RequestError(422, "query has no searchable words (letters or digits)").as_dict()
        index, catalog = self._state
        with self._lock:
            idx, scores = index.top_k(query, k)
            version = catalog.version
            items = [catalog.describe(i, s) for i, s in zip(idx, scores) if s > 0]
        return {"items": items, "catalog_version": version}

    def top_k_batch(self, queries: list[str], k: int) -> list[tuple[list[int], list[float]]]:
        """Per query: (item indices, BM25 scores) of the k best items (ties by lower index)."""
        index, _ = self._state
        with self._lock:
            return [tuple(a.tolist() for a in index.top_k(q, k)) for q in queries]

    def score_queries(self, queries: list[str]) -> np.ndarray:
        """(Q, n_items) float64 BM25 scores, the input of quasi-round-robin merging."""
        index, _ = self._state
        with self._lock:
            return index.score_batch(queries)

    def qrr_rank(self, samples: list[tuple[list[str], list[float]]], requests: list[Prepared], n_preds: int,
                 epsilon: float) -> dict[str, Any]:
        """Per request: top-k items by quasi-round-robin over its generations (see core.qrr_rank)."""
        index, catalog = self._state
        with self._lock:
            return {"results": qrr_rank(index, catalog, samples, requests, n_preds, epsilon),
                    "catalog_version": catalog.version}


# ------------------------------------------------------------------------------------------- generator
@serve.deployment
class Generator(_CatalogFollower):
    """Generative recommender (CALRec): the model samples item texts for a history with its own
    `generations` (core.generate), and the `BM25Search` deployment ranks the catalog from them with
    quasi-round-robin (`BM25Search.qrr_rank` -> `seqrec.retrieval.qrr.qrr_batch`): offline CALRec's
    `score_all(retrieval="qrr")` path, split over two deployments. Replaces `Recommender` in the app when
    the served checkpoint is a CALRec model; /recommend answers carry the generated texts.

    Samples are cached per history by the model (the same history gets the same generations until the cache
    is reset after `generation_cache` entries or a model swap); the sampling RNG is seeded per model load.
    """

    def __init__(self, settings: dict[str, Any], store, bm25) -> None:
        import torch

        self._init_follower(settings, store)
        self.bm25 = bm25
        torch.set_num_threads(max(1, self.settings.generator_torch_threads))
        self._generate_batch.set_max_batch_size(self.settings.generator_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.settings.generator_batch_wait_s)

    def _accept(self, loaded: LoadedModel, user_config: dict[str, Any]) -> None:
        if not loaded.is_generator:
            raise ValueError(f"{user_config['checkpoint']} is a {loaded.name!r} model, not a generator "
                             "(it ranks with score_all: serve it with the Recommender deployment)")

    def info(self) -> dict[str, Any]:
        cfg = self._state[0].model.config if self._state else None
        return self._info(**({"n_gen": cfg.n_gen, "max_new_tokens": cfg.max_new_tokens} if cfg else {}))

    async def recommend(self, payload: dict[str, Any]) -> dict[str, Any]:
        state = self._state
        if state is None:
            return RequestError(503, "model is loading").as_dict()
        loaded, catalog = state
        try:
            if payload.get("critique") is not None:
                raise RequestError(422, f"model {loaded.name!r} does not take critiques; send the request without 'critique'")
            n = loaded.n_scored  # the model prompts with the item texts it was trained on
            prepared = Prepared(history=catalog.resolve(payload["history"]), k=int(payload["k"]), critique=None,
                                exclude_history=bool(payload.get("exclude_history")))
            if (prepared.history >= n).any():
                raise RequestError(422, f"history items must be among the model's {n} catalog items")
        except RequestError as e:
            return e.as_dict()
        return await self._generate_batch(prepared)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, requests: list[Prepared]) -> list[dict[str, Any]]:
        loaded, _ = self._state
        cfg = loaded.model.config
        try:
            samples = await asyncio.to_thread(self._generate_locked, loaded, requests)
            ranked = await self.bm25.qrr_rank.remote(samples, requests, cfg.n_preds, cfg.epsilon)
        except Exception as e:
            log.exception("generation failed")
            return [RequestError(500, f"generation failed: {type(e).__name__}: {e}").as_dict()] * len(requests)
        model = {"name": loaded.name, "version": loaded.version, "checkpoint": loaded.checkpoint}
        out = []
        for r, (texts, lps) in zip(ranked["results"], samples):
            r["generations"] = [{"text": t, "logprob": float(lp)} for t, lp in zip(texts, lps)]
            r["model"], r["catalog_version"] = model, ranked["catalog_version"]
            out.append(r)
        return out

    def _generate_locked(self, loaded: LoadedModel, requests: list[Prepared]):
        with self._lock:
            samples = generate(loaded, requests)
            cache = getattr(loaded.model, "_gen_cache", None)
            if cache is not None and len(cache) > self.settings.generation_cache:
                loaded.model.reset_samples()  # bounded memory; also restarts the seeded sampling RNG
            return samples
