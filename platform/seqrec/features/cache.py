"""Feature cache: token-level embeddings of every item text under a frozen encoder, encoded once.

Layout: <cache_dir>/<encoder cache id>/part-*.parquet with columns
    key (sha256 of the item text), n_tokens, emb (float16 bytes of (n_tokens, D))
Only the encoder's real tokens are stored (no padding). The cache is keyed by encoder + text hash, so an item
whose text changes gets a new key and is re-encoded; unchanged items are read back, never re-encoded.
Encoding is a Ray Data batch-inference job: `map_batches` over an actor pool, each actor holding one encoder
(a GPU per actor where the cluster has GPUs).
"""
from __future__ import annotations

import hashlib
import logging
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

log = logging.getLogger(__name__)


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _EncodeBatch:
    """Ray Data actor: loads the encoder once, encodes batches of texts."""

    def __init__(self, encoder_name: str, max_tokens: int):
        from seqrec.features.encoder import FrozenTextEncoder

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = FrozenTextEncoder.load(encoder_name, max_tokens=max_tokens, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens, mask = self.encoder.encode(list(batch["text"]))
        tokens = tokens.float().cpu().numpy().astype(np.float16)
        n_tokens = mask.sum(1).cpu().numpy()
        emb = [tokens[i, : n_tokens[i]].tobytes() for i in range(len(n_tokens))]
        return {"key": batch["key"], "n_tokens": n_tokens.astype(np.int32), "emb": np.array(emb, dtype=object)}


@dataclass
class ItemFeatures:
    """Padded token features for a catalog, aligned with item_idx."""

    tokens: torch.Tensor  # (N, T, D) float16
    mask: torch.Tensor  # (N, T) bool
    encoder_id: str

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[-1])


@dataclass
class CacheReport:
    items: int
    encoded: int
    reused: int
    seconds: float

    @property
    def items_per_second(self) -> float:
        return self.encoded / self.seconds if self.encoded and self.seconds > 0 else 0.0


class FeatureCache:
    def __init__(self, cache_dir: str | Path, encoder_name: str = "minilm", max_tokens: int = 64):
        from seqrec.features.encoder import encoder_cache_id, resolve_encoder_path

        self.encoder_name = encoder_name
        self.max_tokens = max_tokens
        # the same id as FrozenTextEncoder.cache_id, computed without loading the weights
        self.encoder_id = encoder_cache_id(encoder_name, resolve_encoder_path(encoder_name), max_tokens)
        self.dir = Path(cache_dir) / self.encoder_id

    def _existing(self) -> pa.Table | None:
        parts = sorted(self.dir.glob("part-*.parquet"))
        if not parts:
            return None
        return pa.concat_tables([pq.read_table(p) for p in parts])

    def cached_keys(self) -> set[str]:
        table = self._existing()
        return set(table.column("key").to_pylist()) if table is not None else set()

    def ensure(self, texts: list[str], batch_size: int = 64, concurrency: int = 1, use_ray: bool = True) -> CacheReport:
        """Encode the texts not yet cached. Returns how many were encoded and reused."""
        start = time.perf_counter()
        keys = [text_key(t) for t in texts]
        have = self.cached_keys()
        todo: dict[str, str] = {}
        for k, t in zip(keys, texts):
            if k not in have:
                todo.setdefault(k, t)
        if todo:
            self.dir.mkdir(parents=True, exist_ok=True)
            if use_ray:
                table = self._encode_with_ray(todo, batch_size, concurrency)
            else:
                from seqrec.console import progress

                actor = _EncodeBatch(self.encoder_name, self.max_tokens)
                items = list(todo.items())
                chunks = []
                bar = progress(total=len(items), desc="encoding item texts", unit="item")
                for lo in range(0, len(items), batch_size):
                    part = items[lo : lo + batch_size]
                    out = actor({"key": np.array([k for k, _ in part], dtype=object), "text": np.array([t for _, t in part], dtype=object)})
                    chunks.append(pa.table({"key": list(out["key"]), "n_tokens": out["n_tokens"], "emb": list(out["emb"])}))
                    bar.update(len(part))
                bar.close()
                table = pa.concat_tables(chunks)
            # write to a temp name then rename: a crash never leaves a half-written part
            final = self.dir / f"part-{int(time.time())}-{uuid.uuid4().hex[:8]}.parquet"
            tmp = final.with_suffix(".tmp")
            pq.write_table(table, tmp)
            tmp.rename(final)
        seconds = time.perf_counter() - start
        report = CacheReport(items=len(texts), encoded=len(todo), reused=len(texts) - sum(1 for k in keys if k in todo), seconds=seconds)
        log.info("feature cache %s: %d items, encoded %d (%.1f items/s), reused %d", self.encoder_id, report.items,
                 report.encoded, report.items_per_second, report.reused)
        return report

    def _encode_with_ray(self, todo: dict[str, str], batch_size: int, concurrency: int) -> pa.Table:
        import ray

        from seqrec.console import progress, quiet_ray_data
        from seqrec.ray_utils import init_ray

        init_ray()
        ds = ray.data.from_items([{"key": k, "text": t} for k, t in todo.items()])
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        with warnings.catch_warnings():
            # max_restarts has no named parameter (yet) and Ray warns about the **ray_remote_args it goes
            # through, while its own actor pool code names exactly this call as the way to turn restarts off
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(
                _EncodeBatch,
                fn_constructor_kwargs={"encoder_name": self.encoder_name, "max_tokens": self.max_tokens},
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=concurrency),
                num_gpus=1 if use_gpu else 0,
                batch_format="numpy",
                # no actor restarts: a rerun re-encodes from the cache anyway, and with restarts on Ray logs an
                # error that the constructor arguments (in the object store) might be gone by a restart
                max_restarts=0,
            )
        quiet_ray_data(ds)  # our bar below counts items; Ray Data's would count blocks beside it
        tables = []
        with progress(total=len(todo), desc="encoding item texts", unit="item") as bar:
            for part in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                tables.append(part)
                bar.update(part.num_rows)
        return pa.concat_tables(tables)

    def load(self, texts: list[str], dim: int | None = None) -> ItemFeatures:
        """Padded (N, T, D) features for `texts` (all must be cached; call `ensure` first)."""
        table = self._existing()
        if table is None:
            raise FileNotFoundError(f"feature cache {self.dir} is empty; run ensure() first")
        row_of = {k: i for i, k in enumerate(table.column("key").to_pylist())}
        n_tokens = table.column("n_tokens").to_numpy()
        embs = table.column("emb")
        keys = [text_key(t) for t in texts]
        missing = [i for i, k in enumerate(keys) if k not in row_of]
        if missing:
            raise KeyError(f"{len(missing)} item texts are not in the feature cache (e.g. item {missing[0]}); run ensure()")
        rows = [row_of[k] for k in keys]
        t_max = max(1, int(max(n_tokens[r] for r in rows)))
        first = np.frombuffer(embs[rows[0]].as_py(), dtype=np.float16)
        d = dim or first.size // max(1, int(n_tokens[rows[0]]))
        tokens = np.zeros((len(rows), t_max, d), dtype=np.float16)
        mask = np.zeros((len(rows), t_max), dtype=bool)
        for i, r in enumerate(rows):
            n = int(n_tokens[r])
            tokens[i, :n] = np.frombuffer(embs[r].as_py(), dtype=np.float16).reshape(n, d)
            mask[i, :n] = True
        return ItemFeatures(torch.from_numpy(tokens), torch.from_numpy(mask), self.encoder_id)


def pooled(features: ItemFeatures) -> torch.Tensor:
    """Mean over real tokens, L2-normalised: (N, D) float32 sentence embeddings."""
    return pooled_tokens(features.tokens, features.mask)


def pooled_tokens(tokens: torch.Tensor, mask: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(N, T, D) token features with a (N, T) mask -> (N, D) float32 unit means over the real tokens, `chunk`
    items at a time (the float32 copy of a whole catalog's tokens would be ~10x the fp16 features)."""
    out = []
    for lo in range(0, tokens.shape[0], chunk):
        m = mask[lo : lo + chunk].unsqueeze(-1).float()
        mean = (tokens[lo : lo + chunk].float() * m).sum(1) / m.sum(1).clamp(min=1.0)
        out.append(torch.nn.functional.normalize(mean, dim=-1))
    return torch.cat(out) if out else tokens.new_zeros(0, tokens.shape[-1], dtype=torch.float32)


def dataset_features(dataset, encoder_name: str = "minilm", max_tokens: int = 64, cache_dir=None, use_ray: bool = True,
                     texts: list[str] | None = None) -> ItemFeatures:
    """Features for a prepared dataset's item texts (or `texts`, one per item), cached under <dataset>/features
    unless told otherwise."""
    texts = dataset.item_texts() if texts is None else texts
    return ensure_dataset_features(dataset, encoder_name, max_tokens, cache_dir, use_ray, texts).load(texts)


def ensure_dataset_features(dataset, encoder_name: str = "minilm", max_tokens: int = 64, cache_dir=None,
                            use_ray: bool = True, texts: list[str] | None = None) -> FeatureCache:
    """Encode what the dataset's cache lacks and return the cache, without loading the features (a driver that
    only fills the cache for its workers)."""
    cache = FeatureCache(cache_dir or Path(dataset.path) / "features", encoder_name, max_tokens)
    texts = dataset.item_texts() if texts is None else texts
    if len(texts) != dataset.n_items:
        raise ValueError(f"{len(texts)} texts for {dataset.n_items} items")
    cache.ensure(texts, use_ray=use_ray)
    return cache
