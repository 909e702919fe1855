"""Dataset statistics -> model size, history length, schedule, regularisation and early stopping (`seqrec fit`).

`profile_dataset` reads the statistics once; everything else is a pure function of them, so each rule is unit
tested with hand-computed numbers (tests/test_fit.py) and explained in docs/fit.md. Every rule returns its value
and a reason, which the fit report keeps.

The constants come from validation runs, mostly on Scientific_LCRec (docs/fit.md lists them), checked on the
other datasets of benchmarks/bench_generalise.py (Scientific, the Amazon 2018 raw sample, two demo shapes); no
test split chose anything. What they encode:
  * the schedule is counted in epochs, not steps: training tokens / tokens per step gives the steps of an epoch;
    a cloze model sees a target only at its masked positions, so it needs more epochs (2.5x, measured) than a
    next-item model, which has a target at every position;
  * width grows with the catalog (an item's embedding must hold its exact successors apart from its
    neighbours': what Markov chains memorise and blurred models lose at Recall@1); a wider table also needs
    fewer epochs, so when the CPU budget binds, the steps are capped and the width kept (seqrec.fit.runner);
  * little data per item -> more dropout; plenty -> less: a small catalog with many interactions per item is
    the regime where exact transitions pay, and dropout / heavy masking blur them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from seqrec.fit.families import CLOZE, Family

MIN_EVAL_USERS = 5  # users with >= 3 events (each gives one validation and one test row)
MIN_TRAIN_TOKENS = 20  # items in the training sequences
MAX_SLOTS_PER_STEP = 2048  # packed slots (batch_size x pack_len) per optimizer step: ~0.1-0.5 s on one CPU core
MIN_STEPS_PER_EPOCH = 8  # small datasets get smaller steps rather than 1-2 updates per epoch
NEXT_ITEM_MIN_EPOCHS, NEXT_ITEM_MAX_EPOCHS = 10.0, 60.0  # bounds of a next-item schedule (epochs_for)
CLOZE_EPOCH_FACTOR = 2.5
MIN_STEPS, MAX_STEPS = 100, 20000
N_VALIDATIONS = 15  # validations per schedule (10-20: enough to catch the peak, few enough to stay cheap)
PATIENCE_SHARE = 0.3  # early stopping after this share of the schedule without improvement
MIN_DIM, MAX_DIM = 64, 256


@dataclass
class DatasetProfile:
    """The statistics the rules read (from a prepared dataset's training split and its evaluation rows)."""

    name: str
    n_items: int
    n_users: int
    n_train_seqs: int  # training sequences with >= 2 items (a next-item target or a cloze context)
    train_tokens: int  # items in all training sequences
    len_median: float  # full-sequence lengths (history + valid + test targets)
    len_p90: float
    len_p99: float
    len_max: int
    n_valid: int
    n_test: int
    items_in_train: int  # items that occur in a training sequence

    @property
    def tokens_per_item(self) -> float:
        return self.train_tokens / max(1, self.n_items)

    @property
    def density(self) -> float:
        return self.train_tokens / max(1, self.n_users * self.n_items)


@dataclass
class Decision:
    setting: str  # dotted config key (train.steps, model.params.dim, ...)
    value: Any
    statistic: str  # what it was computed from, with the numbers
    why: str


@dataclass
class Sizing:
    """The sized centre of the search: model params, train keys, and the decisions with their reasons."""

    model: dict[str, Any]
    train: dict[str, Any]
    decisions: list[Decision] = field(default_factory=list)

    def overrides(self) -> dict[str, Any]:
        """As dotted keys for the experiment config (seqrec.config.apply_overrides)."""
        return {**{f"model.params.{k}": v for k, v in self.model.items()}, **{f"train.{k}": v for k, v in self.train.items()}}

    def as_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "train": dict(self.train), "decisions": [asdict(d) for d in self.decisions]}


# ------------------------------------------------------------------------------------------- statistics
def profile_dataset(dataset) -> DatasetProfile:
    """DatasetProfile of a seqrec.data.dataset.PreparedDataset."""
    train = dataset.train_sequences()
    full = dataset.full_sequences()
    train_len = np.array([len(s) for s in train], dtype=np.int64)
    full_len = np.array([len(s) for s in full], dtype=np.int64) if full else np.zeros(1, np.int64)
    counts = dataset.train_item_counts() if len(train) else np.zeros(dataset.n_items)
    return DatasetProfile(
        name=dataset.name, n_items=int(dataset.n_items), n_users=int(dataset.n_users),
        n_train_seqs=int((train_len >= 2).sum()), train_tokens=int(train_len.sum()),
        len_median=float(np.median(full_len)), len_p90=float(np.percentile(full_len, 90)),
        len_p99=float(np.percentile(full_len, 99)), len_max=int(full_len.max()),
        n_valid=int(dataset.split("valid").num_rows), n_test=int(dataset.split("test").num_rows),
        items_in_train=int((counts > 0).sum()),
    )


def check_fittable(p: DatasetProfile) -> None:
    """A clear ValueError for a dataset that cannot be trained and selected on validation."""
    where = f"dataset {p.name!r}"
    if p.n_items < 2:
        raise ValueError(f"{where} has {p.n_items} item(s): ranking needs at least 2")
    if p.n_valid < MIN_EVAL_USERS or p.n_test < MIN_EVAL_USERS:
        raise ValueError(f"{where} is too small to split: {p.n_valid} validation / {p.n_test} test rows (users with "
                         f">= 3 events); seqrec fit needs at least {MIN_EVAL_USERS} to select a model on validation")
    if p.train_tokens < MIN_TRAIN_TOKENS or p.n_train_seqs < 1:
        raise ValueError(f"{where} has {p.train_tokens} training events in {p.n_train_seqs} sequences of 2+ items; "
                         f"seqrec fit needs at least {MIN_TRAIN_TOKENS}")


# ------------------------------------------------------------------------------------------------ rules
def pow2_ceil(x: float) -> int:
    """The smallest power of two >= x (x >= 1)."""
    return 2 ** int(math.ceil(math.log2(max(1.0, x))))


def pow2_floor(x: float) -> int:
    """The largest power of two <= x (x >= 1)."""
    return 2 ** int(math.floor(math.log2(max(1.0, x))))


def size_max_len(p: DatasetProfile) -> Decision:
    value = int(min(200, max(20, math.ceil(p.len_p99))))
    return Decision("model.params.max_len", value, f"p99 sequence length {p.len_p99:.0f} (max {p.len_max})",
                    "covers 99% of histories whole; packing makes unused length free, longer tails are cut from the "
                    "old end (bounded to 20..200)")


def size_dim(p: DatasetProfile) -> Decision:
    value = int(min(MAX_DIM, max(MIN_DIM, pow2_ceil(4 * math.sqrt(p.n_items)))))
    return Decision("model.params.dim", value, f"{p.n_items} items: 4 x sqrt = {4 * math.sqrt(p.n_items):.0f}",
                    "the width grows with the catalog so each item's embedding can hold its own successors; "
                    f"the next power of two, in {MIN_DIM}..{MAX_DIM} (the budget caps the steps, not the width)")


def size_layers(p: DatasetProfile) -> Decision:
    value = 1 if p.train_tokens < 200_000 else 2
    return Decision("model.params.layers", value, f"{p.train_tokens} training events",
                    "one block, as the Scientific-tuned presets chose in their sweeps (half the step cost of two); "
                    "two from 200k events")


def size_dropout(p: DatasetProfile) -> Decision:
    t = p.tokens_per_item
    value = 0.1 if t >= 8 else 0.2
    return Decision("model.params.dropout", value, f"{t:.1f} training events per item",
                    "enough events per item: light dropout keeps exact transitions sharp (Recall@1); sparse items "
                    "(< 8 events each) get more")


def size_mask(p: DatasetProfile) -> tuple[Decision, Decision]:
    t = p.tokens_per_item
    mask, last_only = 0.3, 0.3
    return (Decision("model.params.mask_prob", mask, f"{t:.1f} training events per item",
                     "more targets per step than BERT's 0.15 (0.2 and 0.4 measured alike on Scientific_LCRec); "
                     "searched 0.2-0.4"),
            Decision("model.params.last_only_prob", last_only, "-",
                     "a third of the sequences train exactly the inference situation (only the last item masked): "
                     "the next-item task markov chains are good at"))


def size_batch(p: DatasetProfile, max_len: int) -> tuple[Decision, Decision]:
    """pack_len (slots per packed row) and batch_size (rows per step)."""
    window = pow2_ceil(max_len + 1)  # the smallest power-of-two row that holds the longest training window
    slots = min(MAX_SLOTS_PER_STEP, max(2 * window, pow2_floor(p.train_tokens / MIN_STEPS_PER_EPOCH)))
    pack_len = min(max(256, window), max(window, slots // 2))  # 256 unless the data is tiny, >= 2 rows a step
    # a step must not ask for more rows than an epoch packs: there are at least (inputs / pack_len) rows
    inputs = p.train_tokens - p.n_train_seqs  # next-item inputs (a cloze model reads all tokens: more)
    batch = max(1, min(slots // pack_len, inputs // pack_len))
    return (Decision("train.pack_len", pack_len, f"max_len {max_len}, {slots} slots a step",
                     "rows of several sequences with block-diagonal attention: 256 slots, shorter for tiny data"),
            Decision("train.batch_size", batch, f"{p.train_tokens} training events",
                     f"{batch * pack_len} slots a step: at most {MAX_SLOTS_PER_STEP} (CPU step time) and at least "
                     f"{MIN_STEPS_PER_EPOCH} steps an epoch"))


def epochs_for(family: Family, dim: int) -> float:
    """Schedule length in epochs. Measured on Scientific_LCRec (SASRec, lr 1e-3, cosine): validation peaks after
    ~40 epochs at width 64, ~20 at 128, ~10 at 256 (a wider table memorises transitions in fewer passes), so a
    next-item schedule spans 1.5 x 2560 / dim epochs (the peak lands late in the cosine decay; early stopping
    ends it sooner). A cloze model has targets only at its masked positions: Bert4Rec at width 256 peaked after
    ~35 epochs at mask 0.2 and 0.4 alike, 2.5x the next-item figure."""
    epochs = min(NEXT_ITEM_MAX_EPOCHS, max(NEXT_ITEM_MIN_EPOCHS, 1.5 * 2560 / max(dim, 1)))
    return epochs * (CLOZE_EPOCH_FACTOR if family.objective == CLOZE else 1.0)


def size_schedule(p: DatasetProfile, family: Family, slots_per_step: int, dim: int) -> list[Decision]:
    per_epoch = max(1, math.ceil(p.train_tokens / slots_per_step))
    epochs = epochs_for(family, dim)
    steps = int(min(MAX_STEPS, max(MIN_STEPS, round(per_epoch * epochs))))
    kind = f"cloze: {CLOZE_EPOCH_FACTOR:g} x" if family.objective == CLOZE else "next-item:"
    return schedule_decisions(steps, f"{per_epoch} steps an epoch x {epochs:.0f} epochs",
                              f"{kind} 1.5 x 2560 / dim {dim} epochs of {p.train_tokens} training events")


def schedule_decisions(steps: int, statistic: str, why: str, validations: int = N_VALIDATIONS) -> list[Decision]:
    """train.steps and what follows from it: validation interval, warm-up, patience, log interval."""
    eval_every = max(1, steps // validations)
    warmup = int(min(200, max(10, round(0.05 * steps))))
    patience = max(3, math.ceil(PATIENCE_SHARE * validations))
    return [
        Decision("train.steps", steps, statistic, why + f" (bounded to {MIN_STEPS}..{MAX_STEPS})"),
        Decision("train.eval_every", eval_every, f"{steps} steps", f"~{validations} validations per schedule"),
        Decision("train.warmup_steps", warmup, f"{steps} steps", "5% of the schedule (10..200)"),
        Decision("train.patience", patience, f"{validations} validations",
                 f"stop after {PATIENCE_SHARE:.0%} of the schedule without a better validation NDCG@10"),
        Decision("train.log_every", eval_every, f"{steps} steps", "one log line per validation"),
    ]


def size(p: DatasetProfile, family: Family, seed: int = 0) -> Sizing:
    """The sized centre configuration of `family` for a dataset with profile `p`."""
    decisions = [size_max_len(p), size_dim(p), size_layers(p), size_dropout(p)]
    if family.objective == CLOZE:
        decisions += list(size_mask(p))
    max_len, dim = decisions[0].value, decisions[1].value
    pack, batch = size_batch(p, max_len)
    decisions += [pack, batch]
    decisions += size_schedule(p, family, pack.value * batch.value, dim)
    decisions.append(Decision("train.lr", 1e-3, "-", "AdamW at 1e-3 after warm-up, cosine decay; searched x/3..x3"))
    decisions.append(Decision("train.weight_decay", 0.01, "-", "decoupled weight decay on matrices only; searched"))
    model = dict(family.fixed)
    train: dict[str, Any] = {"seed": int(seed), "schedule": "cosine", "min_lr_ratio": 0.05, "grad_clip": 1.0,
                             "threads_per_worker": 1, "keep_checkpoints": 2, "eval_metric": "ndcg@10/pes"}
    for d in decisions:
        section, key = d.setting.split(".", 1)
        if section == "model":
            model[key.split(".", 1)[1]] = d.value
        else:
            train[key] = d.value
    model["attn_dropout"] = model["dropout"]
    model["hidden"] = 4 * model["dim"]
    return Sizing(model=model, train=train, decisions=decisions)
