"""Shared parts of the GPU run kit (benchmarks/device/run_<model>.py): arguments, data, the training paths,
timing, peak memory, the MFU estimate and the one JSON each script writes.

Two training paths, picked by `--path` (default `auto`):
* `ray`: the project's own Ray Train path (train.loop.run_experiment / train.staged_loop.run_staged) with
  scaling.strategy=deepspeed, scaling.use_gpu=true, bf16 (DeepSpeed's bf16 section) and ZeRO-2 (ZeRO-3 for
  CALRec, configs/deepspeed/). Needs ray and deepspeed importable and CUDA.
* `local`: one process, the same pieces the Ray workers call (models.registry build_model / bind_dataset,
  train.loop setup_training / BatchStream / optimizer_step, the model's own sample_batch for the staged models,
  the bf16 choice of train.deepspeed_utils.select_precision, the shared evaluator), with only Ray's plumbing
  (workers, checkpoints, reports) and DeepSpeed absent. The lent GPU machine has torch but neither Ray nor
  DeepSpeed (/work/.library/device/KINDS.md; a Ray wheel is larger than the 64 MiB a call may carry), so
  `auto` takes this path there and says so in one line. The CPU check (`--tiny`) always takes it.

On a machine without CUDA and without --tiny a script prints exactly one line
("CUDA not available: run with --tiny for the CPU check") and exits with status 2 (EXIT_NO_CUDA), so run_all.sh
can tell "not run" from "failed" (1) and "ran" (0).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform as _platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXIT_NO_CUDA = 2
NO_CUDA_LINE = "CUDA not available: run with --tiny for the CPU check"
DEFAULT_BUNDLE = ROOT / "runs" / "device_bundle"  # benchmarks/bench_device_sweep.py bundle (+ kit_bundle below)
DEFAULT_RAW = Path(os.environ.get("SEQREC_SHARED_DATA", ROOT.parent / "shared" / "data")) / "Scientific"

# Dense bf16 peak (no sparsity) of the GPUs this project is lent, from the vendors' data sheets (SXM parts). The
# H200 is the same Hopper die as the H100 (only the memory differs), so the same peak. Unknown GPU: no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


# ----------------------------------------------------------------------------------------------- arguments
def parse_args(model: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"GPU run kit: {model} (see benchmarks/device/common.py)")
    p.add_argument("--tiny", action="store_true", help="CPU check: tiny model on a demo catalog, a few steps")
    p.add_argument("--out", default=str(ROOT / "runs" / "device_kit"), help="directory for <model>.json")
    p.add_argument("--minutes", type=float, default=4.0,
                   help="training wall-clock budget (GPU); evaluation comes after it, the total is capped at 8 min")
    p.add_argument("--max-steps", type=int, default=None, help="stop earlier than --minutes after this many steps")
    p.add_argument("--path", choices=("auto", "ray", "local"), default="auto", help="training path (see module doc)")
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE),
                   help="prepared Scientific + float16 MiniLM (+ SmolLM2 tokenizer) carried to the device")
    p.add_argument("--eval-users", type=int, default=None, help="test users to evaluate (default: all; CALRec: 512)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def check_cuda(args) -> "torch.device":
    """cuda, or cpu under --tiny; otherwise the one no-CUDA line and exit EXIT_NO_CUDA."""
    import torch

    if args.tiny:
        return torch.device("cpu")  # the CPU check runs on the CPU even where a GPU is present: its figures are CI's
    if not torch.cuda.is_available():
        print(NO_CUDA_LINE, flush=True)
        raise SystemExit(EXIT_NO_CUDA)
    return torch.device("cuda")


def ray_stack_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("ray", "deepspeed"))


def choose_path(args, device) -> str:
    if args.tiny or args.path == "local":
        return "local"
    if args.path == "ray":
        if not ray_stack_available():
            raise SystemExit("--path ray: ray and deepspeed must be importable here")
        return "ray"
    if ray_stack_available():
        return "ray"
    print("Ray/DeepSpeed not installed here: single-process path (same model, step, bf16 autocast and evaluator; "
          "no Ray workers, no DeepSpeed)", flush=True)
    return "local"


# -------------------------------------------------------------------------------------------------- data
def tiny_dataset(work: Path):
    """A small synthetic catalog with texts (the tests' demo options): seconds to make, nothing downloaded."""
    from seqrec.data.dataset import PreparedDataset
    from seqrec.data.demo import DemoOptions, generate_demo

    out = work / "demo"
    generate_demo(out, DemoOptions(n_users=300, n_items=120, seed=7))
    return PreparedDataset.load(out)


def scientific_dataset(args, work: Path):
    """The real Scientific data: the bundle's prepared copy (copied: the carried one may be read-only and Flare
    writes its feature cache beside it), else prepared from the shared raw files."""
    from seqrec.data.dataset import PreparedDataset
    from seqrec.data.unisrec import prepare_unisrec

    out = work / "Scientific"
    src = Path(args.bundle) / "Scientific"
    if src.exists():
        shutil.copytree(src, out)
    else:
        prepare_unisrec(DEFAULT_RAW, out)
    return PreparedDataset.load(out)


def text_encoder(args, work: Path) -> str:
    """MiniLM for Flare / Recformer: the bundle's float16 copy cast back to float32, else the installed package."""
    bundle = Path(args.bundle)
    if (bundle / "minilm_fp16").exists():
        from bench_device_sweep import float32_encoder

        return str(float32_encoder(bundle, work / "minilm"))
    return "minilm"


def tiny_text_encoder(work: Path) -> str:
    """A random 1-layer, 32-wide BERT with MiniLM's tokenizer, saved as an encoder folder (the CPU check's Flare:
    encoding the demo catalog with the real MiniLM takes ~25 s on a loaded 2-core machine)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from seqrec.features.encoder import resolve_encoder_path

    out = work / "tiny_encoder"
    tok = AutoTokenizer.from_pretrained(resolve_encoder_path("minilm"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def smollm2_tokenizer(args) -> str | None:
    """SmolLM2's tokenizer folder: the bundle's (the 98 MiB GGUF cannot travel), else None (CALRec converts the
    installed GGUF's)."""
    path = Path(args.bundle) / "smollm2_tokenizer"
    return str(path) if (path / "tokenizer.json").exists() else None


def workdir(args) -> Path:
    """A private scratch folder (data copy, feature cache, encoder), removed when the process exits."""
    import atexit

    path = Path(tempfile.mkdtemp(prefix="seqrec_kit_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------------------- measurement
def gpu_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_flops(name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def count_params(model, exclude: tuple[str, ...] = ()) -> int:
    return int(sum(p.numel() for n, p in model.named_parameters() if not any(e in n for e in exclude)))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def sane_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in metrics.items() if isinstance(v, (int, float))}


def write_result(args, record: dict[str, Any]) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record['model']}.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"[kit] {record['model']}: {record['steps']} steps, {record['throughput']:.1f} {record['throughput_unit']}, "
          f"MFU {record['mfu']}, peak {record['peak_gpu_mib']} MiB, test {record['metrics'].get('ndcg@10/pes')} "
          f"ndcg@10/pes -> {path}", flush=True)
    return record


# ----------------------------------------------------------------------------------------- local path
def seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)


def local_train(*, model, dataset, tc, device, minutes: float, max_steps: int | None,
                flops_per_token: float, batches: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Train `model` in this process until `minutes` or the step cap (tc.steps, or max_steps), as a Ray worker
    does (train.loop.setup_training / optimizer_step, select_precision's autocast). `batches`: an iterator of
    batches (the staged models' sample_batch); default train.loop.BatchStream over the training split.
    Returns steps, train seconds, tokens and the loss curve ends."""
    import torch

    from seqrec.models.packing import PAD
    from seqrec.train.config import ScalingSection
    from seqrec.train.deepspeed_utils import select_precision
    from seqrec.train.loop import BatchStream, optimizer_step, setup_training

    sc = ScalingSection(num_workers=1, use_gpu=device.type == "cuda", strategy="ddp")
    precision = select_precision(sc.use_gpu, sc.strategy)
    state = {"step": 0}
    optimizer, scheduler, engine, train_module = setup_training(model, tc, sc, 1, device, None, state)
    stream = batches if batches is not None else iter(BatchStream(dataset.train_sequences(), model, tc, 0))
    cap = min(tc.steps, max_steps) if max_steps else tc.steps
    deadline = time.perf_counter() + 60.0 * minutes
    losses, tokens, step, train_s = [], 0, 0, 0.0
    warm_s, warm_tokens = None, 0  # the first steps (CUDA kernels' first launches) are left out of the rate
    model.train()
    while step < cap and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
        n_tok = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int((batch["items"] != PAD).sum())
        loss = optimizer_step(batch, model, train_module, optimizer, scheduler, engine, tc.grad_clip,
                              precision.autocast())
        if step % 20 == 0 or step + 1 == cap:
            losses.append([step + 1, round(float(loss.detach()), 4)])
        step += 1
        tokens += n_tok
        if step == min(3, cap):
            sync(device)
            warm_s, warm_tokens = time.perf_counter(), tokens
        train_s += time.perf_counter() - t0
    sync(device)
    print(f"[kit] trained {step} steps in {train_s:.1f}s ({'step cap' if step >= cap else 'time budget'}), "
          f"last loss {float(loss.detach()):.4f}; evaluating", flush=True)
    rate_s = time.perf_counter() - warm_s if warm_s is not None and step > 3 else train_s
    rate_tokens = tokens - warm_tokens if warm_s is not None and step > 3 else tokens
    rate_steps = step - 3 if step > 3 else step
    if not all(math.isfinite(v) for _, v in losses):
        raise RuntimeError(f"non-finite training loss: {losses}")
    return {"steps": step, "train_s": round(train_s, 2), "tokens": tokens,
            "tokens_per_s": rate_tokens / max(rate_s, 1e-9), "steps_per_s": rate_steps / max(rate_s, 1e-9),
            "achieved_flops": flops_per_token * rate_tokens / max(rate_s, 1e-9), "loss_curve": losses,
            "precision": {"dtype": str(precision.dtype), "autocast": precision.use_autocast}}


def evaluate_test(model, dataset, device, max_users: int | None, seed: int) -> tuple[dict[str, float], int, float]:
    """Test metrics (the shared evaluator), on all test users or a seeded subset of `max_users`."""
    import torch

    from seqrec.eval.evaluator import EvalSettings, evaluate

    rows = dataset.eval_rows("test")
    if max_users and len(rows) > max_users:
        rows = rows.subset(np.sort(np.random.default_rng(seed).permutation(len(rows))[:max_users]))
    model.eval()
    if hasattr(model, "before_validation"):  # Recformer: encode the item matrix with the trained encoder
        model.before_validation(distributed=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        metrics = evaluate(model, rows, dataset.n_items, EvalSettings(), device).metrics
    sync(device)
    return sane_metrics(metrics), len(rows), round(time.perf_counter() - t0, 2)


def finish_record(args, *, model_name: str, device, path: str, trained: dict[str, Any], metrics: dict[str, float],
                  eval_users: int, total_users: int, eval_s: float, flops_formula: str, n_params: int,
                  throughput_key: str = "tokens_per_s", extra: dict[str, Any] | None = None,
                  t_start: float) -> dict[str, Any]:
    import torch

    name = gpu_name(device)
    peak = peak_flops(name) if device.type == "cuda" else None
    record = {
        "model": model_name, "device": device.type, "device_name": name, "torch": torch.__version__,
        "python": _platform.python_version(), "path": path, "tiny": bool(args.tiny),
        "budget_minutes": None if args.tiny else args.minutes, "steps": trained["steps"], "train_s": trained["train_s"], "tokens": trained["tokens"],
        "throughput": round(trained[throughput_key], 2),
        "throughput_unit": "tokens/s" if throughput_key == "tokens_per_s" else "seq/s",
        "tokens_per_s": _rounded(trained["tokens_per_s"], 1), "steps_per_s": round(trained["steps_per_s"], 3),
        "params": n_params, "flops_formula": flops_formula,
        "achieved_tflops": round(trained["achieved_flops"] / 1e12, 4),
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "mfu": round(trained["achieved_flops"] / peak, 5) if peak else None,
        "peak_gpu_mib": peak_memory_mib(device),
        "precision": trained["precision"], "loss_curve": trained["loss_curve"],
        "metrics": metrics, "eval_split": "test", "eval_users": eval_users, "test_users": total_users,
        "eval_s": eval_s, "wall_s": round(time.perf_counter() - t_start, 1),
    }
    record.update(extra or {})
    return record


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def total_users(dataset) -> int:
    return len(dataset.eval_rows("test"))


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def budget_check(args) -> None:
    """The whole script (training + evaluation) must stay inside 8 minutes on the device."""
    if not args.tiny and args.minutes > 6.0:
        raise SystemExit(f"--minutes {args.minutes}: at most 6 (training) so that evaluation fits the 8-minute cap")
