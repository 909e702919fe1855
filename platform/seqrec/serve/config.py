"""Typed serving config and the resolution of "which model, which catalog" into absolute paths.

A model is named by one of:
    checkpoint   a checkpoint directory written by training (model.safetensors + config.json)
    best_record  a JSON file naming a checkpoint: a Tune sweep's `best.json` ({"checkpoint": ..., "config":
                 ..., "metrics": ...}) or a training run's `summary.json` ({"best_checkpoint": ...}); a bare
                 name resolves to `<records_dir>/<name>/best.json` (then `summary.json`)
The catalog (item ids, titles, texts) is a prepared dataset; by default the one the checkpoint was trained on.
Paths are resolved once, where the app is built, so replicas on other nodes/working directories get
absolute paths (the files must be readable there: shared storage on a real cluster).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqrec.config import from_dict

API_KEY_ENV = "SEQREC_API_KEY"  # when set, every route except /healthz needs the header X-API-Key
GENERATIVE_MODELS = ("calrec",)  # served by the Generator deployment (generations -> BM25 QRR), not score_all
RECORD_CHECKPOINT_KEYS = ("checkpoint", "checkpoint_path", "best_checkpoint", "path")


@dataclass
class ModelSource:
    checkpoint: str | None = None
    best_record: str | None = None
    records_dir: str = "runs/tune"  # where bare best-record names are looked up
    dataset: str | None = None  # prepared dataset (catalog); default: the checkpoint's training data


@dataclass
class Limits:
    max_history: int = 200  # longer histories are rejected (422), not silently truncated
    max_k: int = 100
    max_critique_chars: int = 1000
    max_query_chars: int = 1000
    max_body_bytes: int = 64 * 1024  # larger bodies get 413 before parsing
    max_items_per_update: int = 1000


@dataclass
class ReplicaOptions:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # custom resources each replica asks for, e.g. {serve: 1}: replicas then land only on nodes offering them
    # (cluster.yaml's gpu_serve type), and a replica that fits nowhere makes the autoscaler add such a node
    resources: dict[str, float] = field(default_factory=dict)
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    # how long the load must stay above / below target before Serve adds / removes a replica; None keeps
    # Serve's defaults (30 s up, 600 s down). Short delays suit bursty demo traffic, long ones spare cold starts.
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None
    max_ongoing_requests: int = 64
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0


@dataclass
class ServeSettings:
    model: ModelSource = field(default_factory=ModelSource)
    limits: Limits = field(default_factory=Limits)
    recommender: ReplicaOptions = field(default_factory=ReplicaOptions)
    bm25: ReplicaOptions = field(default_factory=lambda: ReplicaOptions(num_cpus=0.5, max_replicas=2))
    ingress: ReplicaOptions = field(default_factory=lambda: ReplicaOptions(num_cpus=0.5, max_replicas=2))
    # generative models (CALRec): sampling is seconds per request, so few requests per replica
    generator: ReplicaOptions = field(default_factory=lambda: ReplicaOptions(
        num_cpus=1.0, max_replicas=1, target_ongoing_requests=2, max_ongoing_requests=16, health_check_timeout_s=60))
    generator_batch_size: int = 4  # users sampled together (each expands to n_gen rows)
    generator_batch_wait_s: float = 0.01
    generator_torch_threads: int = 1
    generation_cache: int = 4096  # cached histories per generator replica before the cache is reset
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.002  # a short wait: batching must not cost more latency than it saves
    catalog_sync_s: float = 0.5  # how often replicas pull catalog additions from the catalog store
    torch_threads: int = 1  # per replica; replicas scale out, not up (one core each on this class of machine)
    # Rank a batch in a worker thread (the event loop keeps reading requests meanwhile) or inline on the event
    # loop (no thread hop; the batch blocks the loop for its few milliseconds).
    rank_in_thread: bool = True
    # POST /recommend answered by app.RecommendFastPath (same validation and code, without FastAPI's routing);
    # turn off when FastAPI middleware or dependencies you add must see /recommend requests.
    fast_recommend_path: bool = True
    encoder: str = "minilm"  # text encoder for models that read item text features / critiques
    access_log: bool = False  # Serve's per-request log lines (proxy and each replica)
    # Rank inside the ingress replicas (score_all models only): one Serve hop fewer per request. The model is
    # then the Ingress deployment's user_config (swaps still reconfigure in place) and `ingress` sets the
    # replicas; a killed ingress replica fails the requests it holds (no replica behind it to retry on).
    score_in_ingress: bool = False


def settings_from_dict(data: dict[str, Any] | None) -> ServeSettings:
    return from_dict(ServeSettings, dict(data or {}), where="serve")


def _abs(path: str | os.PathLike, base: Path | None = None) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = (base or Path.cwd()) / p
    return str(p.resolve())


def read_best_record(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(absolute checkpoint dir, the record) from a best.json / summary.json file."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"best record {path} is not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise ValueError(f"best record {path} must be a JSON object")
    for key in RECORD_CHECKPOINT_KEYS:
        value = record.get(key)
        if isinstance(value, dict):  # {"checkpoint": {"path": ...}}
            value = value.get("path")
        if isinstance(value, str) and value:
            return _abs(value, path.parent), record
    raise ValueError(f"best record {path} names no checkpoint (expected one of {RECORD_CHECKPOINT_KEYS})")


def resolve_best_record(name_or_path: str, records_dir: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        candidates = [p / "best.json", p / "summary.json"]
    else:
        base = Path(records_dir).expanduser()
        candidates = [base / name_or_path / "best.json", base / name_or_path / "summary.json"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no best record {name_or_path!r}; looked for {[str(c) for c in candidates]}")


def checkpoint_dataset(checkpoint: str) -> str | None:
    """The prepared dataset a checkpoint was trained on, from its config.json (None if not recorded/found)."""
    try:
        meta = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    data = (meta.get("experiment") or {}).get("data") or {}
    candidates = [Path(meta["dataset_path"])] if isinstance(meta.get("dataset_path"), str) else []  # CALRec
    if data.get("path"):
        candidates.append(Path(data["path"]))
    if data.get("unisrec_dir"):  # training prepared it into cache_dir/<raw dir name>
        candidates.append(Path(data.get("cache_dir") or "runs/data") / Path(data["unisrec_dir"]).name)
    for c in candidates:
        if (Path(_abs(c)) / "meta.json").exists():
            return _abs(c)
    return None


def checkpoint_model_name(checkpoint: str) -> str | None:
    try:
        return json.loads((Path(checkpoint) / "config.json").read_text()).get("model_name")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def is_generative(checkpoint: str) -> bool:
    """Whether the checkpoint is served by the Generator deployment (CALRec) rather than the Recommender."""
    return checkpoint_model_name(checkpoint) in GENERATIVE_MODELS


def resolve_source(source: ModelSource) -> ModelSource:
    """A copy of `source` with an absolute checkpoint and dataset, or a clear error."""
    if bool(source.checkpoint) == bool(source.best_record):
        raise ValueError("give exactly one of model.checkpoint or model.best_record")
    record_dataset = None
    if source.best_record:
        record_path = resolve_best_record(source.best_record, source.records_dir)
        checkpoint, record = read_best_record(record_path)
        if isinstance(record.get("dataset"), str) and record["dataset"]:  # Tune's best.json names it
            record_dataset = _abs(record["dataset"], record_path.parent)
    else:
        checkpoint = _abs(source.checkpoint)
    ckpt = Path(checkpoint)
    for name in ("config.json", "model.safetensors"):
        if not (ckpt / name).is_file():
            raise FileNotFoundError(f"{ckpt} is not a model checkpoint (missing {name})")
    dataset = _abs(source.dataset) if source.dataset else (record_dataset or checkpoint_dataset(checkpoint))
    if dataset is None:
        raise ValueError(f"cannot tell which dataset {ckpt} was trained on; pass model.dataset (a prepared dataset)")
    if not (Path(dataset) / "meta.json").is_file():
        raise FileNotFoundError(f"{dataset} is not a prepared dataset (no meta.json)")
    validate_checkpoint(checkpoint, dataset)
    return ModelSource(checkpoint=checkpoint, best_record=None, records_dir=source.records_dir, dataset=dataset)


def validate_checkpoint(checkpoint: str, dataset: str) -> None:
    """Cheap pre-flight checks before anything is deployed (a swap to a broken checkpoint must fail here,
    not in replicas): config.json names a known model for this catalog size, the weights header parses."""
    from safetensors import safe_open

    from seqrec.models.registry import MODELS

    try:
        meta = json.loads((Path(checkpoint) / "config.json").read_text())
        name, n_items = meta["model_name"], int(meta["n_items"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{checkpoint}/config.json is not a seqrec checkpoint config: {e}") from e
    if name not in MODELS:
        raise ValueError(f"{checkpoint}: unknown model {name!r}; known: {sorted(MODELS)}")
    expected = json.loads((Path(dataset) / "meta.json").read_text())["counts"]["items"]
    if n_items != expected:
        raise ValueError(f"{checkpoint} scores {n_items} items but the catalog {dataset} has {expected}")
    try:
        with safe_open(str(Path(checkpoint) / "model.safetensors"), framework="pt") as f:
            if not list(f.keys()):
                raise ValueError("no tensors")
    except Exception as e:
        raise ValueError(f"{checkpoint}/model.safetensors is not readable: {e}") from e
