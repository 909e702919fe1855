"""DeepSpeed under Ray Train, without the `deepspeed` launcher.

* The accelerator is picked when deepspeed is first imported: on CPU DS_ACCELERATOR=cpu must be set before
  that import (we set it in the worker and in the workers' runtime env). Its CPU accelerator uses gloo
  unless oneCCL is installed.
* Ray Train's TorchConfig already ran `init_process_group` (gloo on CPU, nccl on GPU) with RANK/WORLD_SIZE/
  MASTER_ADDR/MASTER_PORT in the environment, so deepspeed.initialize(dist_init_required=False) adopts it.
* The optimizer is torch's AdamW passed as a client optimizer (zero_allow_untested_optimizer), so nothing
  has to be JIT-compiled (DeepSpeed's CPUAdam/FusedAdam would build C++/CUDA ops on first use).
* Weights for model.safetensors: ZeRO-1/2 keep full parameters on every rank, so rank 0's module is complete;
  ZeRO-3 partitions them and they are gathered (collectively) before rank 0 writes.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from seqrec.config import read_yaml, resolve_config_path


@dataclass(frozen=True)
class Precision:
    """How a worker's training step runs: the device type, the compute dtype, and who applies it. Under
    DeepSpeed the engine's bf16 section casts the module (and its ZeRO shards) to bf16, so no autocast is added on
    top; under DDP / one process the weights stay fp32 and torch.autocast runs the matmuls in bf16."""

    device_type: str  # "cuda" or "cpu"
    dtype: torch.dtype  # compute dtype of the forward pass
    deepspeed_bf16: bool  # the `bf16.enabled` of a DeepSpeed config
    use_autocast: bool  # wrap the forward in torch.autocast(device_type, dtype)

    def autocast(self):
        """The forward's autocast context, or None (fp32, or DeepSpeed's own bf16)."""
        return torch.autocast(self.device_type, dtype=self.dtype) if self.use_autocast else None


def select_precision(use_gpu: bool, strategy: str = "ddp") -> Precision:
    """bf16 on a GPU (the bf16 section under strategy=deepspeed, else autocast), fp32 on the CPU (bf16 autocast
    on CPU is slower than fp32 there and DeepSpeed's CPU accelerator has no bf16 path we rely on). The one place
    the training loops, the DeepSpeed config and the device kit (benchmarks/device/) take it from."""
    if strategy not in ("ddp", "deepspeed"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if not use_gpu:
        return Precision("cpu", torch.float32, deepspeed_bf16=False, use_autocast=False)
    deepspeed = strategy == "deepspeed"
    return Precision("cuda", torch.bfloat16, deepspeed_bf16=deepspeed, use_autocast=not deepspeed)


def ensure_env(use_gpu: bool) -> None:
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions"))


def build_config(name_or_path: str, *, batch_size: int, grad_clip: float, use_gpu: bool,
                 zero_stage: int | None) -> dict[str, Any]:
    cfg = read_yaml(resolve_config_path(name_or_path, "deepspeed"))
    cfg["train_micro_batch_size_per_gpu"] = batch_size
    cfg.setdefault("gradient_accumulation_steps", 1)
    cfg["gradient_clipping"] = float(grad_clip) if grad_clip else 0.0
    cfg["bf16"] = {"enabled": select_precision(use_gpu, "deepspeed").deepspeed_bf16}  # bf16 on GPU; CPU stays fp32
    cfg.setdefault("zero_optimization", {})
    if zero_stage is not None:
        cfg["zero_optimization"]["stage"] = int(zero_stage)
    return cfg


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]):
    import deepspeed

    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    return engine, ds_optimizer


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if engine is not None else 0


@contextmanager
def full_parameters(engine, module: torch.nn.Module):
    """Inside: every rank's `module` has its full parameters (a no-op below ZeRO-3). Collective: all ranks."""
    if zero_stage(engine) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        with nullcontext():
            yield
