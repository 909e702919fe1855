"""Typed experiment config for `seqrec train` (YAML in configs/train/, unknown keys rejected)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    path: str | None = None  # a prepared dataset directory (seqrec data prepare / demo)
    unisrec_dir: str | None = None  # or raw UniSRec atomic files (relative paths: from the working directory), prepared into cache_dir on first use
    cache_dir: str = "runs/data"


@dataclass
class ModelSection:
    name: str = "sasrec"  # key of seqrec.models.registry.MODELS
    params: dict[str, Any] = field(default_factory=dict)  # the model's own @dataclass config


FIT_ON = ("train", "train+valid")


@dataclass
class TrainConfig:
    steps: int = 1000  # total optimizer steps (the step count continues across resumes)
    # end the run at this step while the lr schedule still spans `steps` (None = steps): a refit stops where the
    # validation run it repeats was selected
    stop_step: int | None = None
    # "train" (default): fit the training sequences, select checkpoints on validation. "train+valid": the refit
    # protocol -- each user's validation target joins the training sequence (seqrec.data.dataset.refit_dataset),
    # nothing is validated (those targets are training data now) and the checkpoint at the last step is tested.
    # Take the hyperparameters and stop_step from a "train" run selected on validation.
    fit_on: str = "train"
    batch_size: int = 16  # packed rows per worker per step
    pack_len: int = 256  # slots per packed row
    packing: bool = True  # False: one sequence per row, padded to the model's max length (the baseline)
    lr: float = 1e-3
    weight_decay: float = 0.01
    beta1: float = 0.9  # FLARE
    beta2: float = 0.99  # FLARE
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant (after linear warm-up)
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    patience: int = 0  # evaluations without improvement of eval_metric before stopping; 0 = never stop early
    eval_metric: str = "ndcg@10/pes"
    valid_max_rows: int | None = None  # validate on a fixed subset to save time (None = all rows)
    # EMA of the weights (train/ema.py), e.g. 0.995: validation, checkpoints (model.safetensors) and serving use the
    # average, training continues from the live weights; None = off
    ema_decay: float | None = None
    keep_checkpoints: int = 2  # best by validation; Ray also keeps the latest for resuming
    threads_per_worker: int | None = None  # torch intra-op threads; default = CPUs per worker
    fail_at_step: int | None = None  # fault-injection for tests: rank 0 SIGKILLs itself once at this step

    def __post_init__(self) -> None:
        if self.fit_on not in FIT_ON:
            raise ValueError(f"train.fit_on must be one of {FIT_ON}, got {self.fit_on!r}")
        if self.stop_step is not None and not 0 < self.stop_step <= self.steps:
            raise ValueError(f"train.stop_step must be in 1..train.steps ({self.steps}), got {self.stop_step}")

    @property
    def last_step(self) -> int:
        """The step the run ends at (stop_step, else steps)."""
        return self.stop_step or self.steps

    @property
    def refit(self) -> bool:
        return self.fit_on == "train+valid"


@dataclass
class ScalingSection:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    strategy: str = "ddp"  # ddp | deepspeed
    deepspeed_config: str = "zero2"  # named config in configs/deepspeed/ or a YAML path
    zero_stage: int | None = None  # overrides the YAML's zero_optimization.stage
    max_failures: int = 0  # Ray Train FailureConfig: restarts from the latest checkpoint


@dataclass
class RunSection:
    storage_path: str = "runs/train"
    name: str | None = None  # default: the experiment name
    resume_from: str | None = None  # a checkpoint directory to continue from (step, optimizer, RNG)
    address: str | None = None  # Ray address (None: RAY_ADDRESS or a private local instance)
    test: bool = True  # evaluate the best checkpoint on the test split at the end


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
