"""Typed experiment config for `seqrec train` (YAML in configs/train/, unknown keys rejected)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    path: str | None = None  # a prepared dataset directory (seqrec data prepare / demo), or its URI (s3://...)
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
    # staged text models (Recformer): draw this many batches at once and group them by input length, so each
    # batch pads to its own longest input (1 = off)
    length_buckets: int = 1
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
        if self.length_buckets < 1:
            raise ValueError(f"train.length_buckets must be >= 1, got {self.length_buckets}")
        if self.stop_step is not None and not 0 < self.stop_step <= self.steps:
            raise ValueError(f"train.stop_step must be in 1..train.steps ({self.steps}), got {self.stop_step}")

    @property
    def last_step(self) -> int:
        """The step the run ends at (stop_step, else steps)."""
        return self.stop_step or self.steps

    @property
    def refit(self) -> bool:
        return self.fit_on == "train+valid"


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class ScalingSection:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    strategy: str = "ddp"  # ddp | deepspeed
    deepspeed_config: str = "zero2"  # named config in configs/deepspeed/ or a YAML path
    zero_stage: int | None = None  # overrides the YAML's zero_optimization.stage
    max_failures: int = 0  # Ray Train FailureConfig: restarts from the latest checkpoint (a lost node included)
    # how Ray places the workers (ScalingConfig.placement_strategy): PACK fills as few nodes as it can (the
    # default, as before); STRICT_SPREAD puts every worker on its own node (a multi-node run of one worker per
    # node); SPREAD spreads where it can; STRICT_PACK keeps all on one node
    placement_strategy: str = "PACK"
    # custom resources each worker asks for on top of CPU/GPU, e.g. {train: 1}: workers only land on nodes that
    # offer them (cluster.yaml's gpu_train nodes offer `train`, one unit per GPU)
    custom_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"scaling.placement_strategy must be one of {PLACEMENT_STRATEGIES}, "
                             f"got {self.placement_strategy!r}")
        reserved = {"CPU", "GPU", "cpu", "gpu"} & set(self.custom_resources)
        if reserved:
            raise ValueError(f"scaling.custom_resources: {sorted(reserved)} come from cpus_per_worker / use_gpu")
        for key, value in self.custom_resources.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"scaling.custom_resources.{key} must be a number > 0, got {value!r}")

    def resources_per_worker(self) -> dict[str, float]:
        """What each Ray Train worker reserves: its CPUs, one GPU when use_gpu, and the custom resources."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {}),
                **{k: float(v) for k, v in self.custom_resources.items()}}


@dataclass
class RunSection:
    # the runs' root: a local path (a shared mount on a multi-node cluster) or a URI, file:// s3:// gs://
    # (seqrec.storage); Ray Train writes the checkpoints there through pyarrow
    storage_path: str = "runs/train"
    name: str | None = None  # default: the experiment name
    resume_from: str | None = None  # a checkpoint directory (or its URI) to continue from (step, optimizer, RNG)
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
