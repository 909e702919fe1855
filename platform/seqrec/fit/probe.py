"""A throughput probe: seconds per training step and per validation pass of a configuration, measured in-process.

The fit's budget is wall-clock seconds, but the sizing rules speak in epochs. The probe turns one into the other
before anything is launched: it runs a few real optimizer steps of the centre configuration on real packed
batches (the training loop's own BatchStream / optimizer_step, one torch thread as a trial gets) and scores a
sample of validation rows with the shared evaluator, so the search can cap the schedule (or the width) to what
the budget trains. It costs a few seconds; its figures go into the fit report as the per-step throughput.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)
PROBE_EVAL_ROWS = 512
PROBE_SMALL_ROWS = 32


@dataclass
class Probe:
    dim: int
    step_s: float  # one optimizer step, one thread
    slots_per_step: int
    eval_s: float  # one validation pass over every validation row (its catalog tables included)
    table_s: float  # of which the fixed part: Flare's text table of the whole catalog; ~0 for ID models
    steps_timed: int

    @property
    def tokens_per_s(self) -> float:
        return self.slots_per_step / max(self.step_s, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 1)}


def probe(experiment: dict[str, Any], dataset, min_seconds: float = 3.0, max_steps: int = 30,
          warm_steps: int = 2) -> Probe:
    """Time `experiment` (an ExperimentConfig dict) on `dataset`: warm-up steps first (allocations, lazy caches),
    then steps until `min_seconds` have passed or `max_steps` ran."""
    from seqrec.config import from_dict
    from seqrec.eval.evaluator import EvalSettings, evaluate
    from seqrec.models.registry import bind_dataset, build_model
    from seqrec.train.config import ExperimentConfig
    from seqrec.train.loop import BatchStream, lr_lambda, make_optimizer, optimizer_step

    cfg = from_dict(ExperimentConfig, experiment)
    tc = cfg.train
    threads = torch.get_num_threads()
    torch.set_num_threads(tc.threads_per_worker or 1)
    try:
        torch.manual_seed(tc.seed)
        model = bind_dataset(build_model(cfg.model.name, cfg.model.params, dataset.n_items), dataset, use_ray=False)
        optimizer = make_optimizer(model, tc)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
        stream = iter(BatchStream(dataset.train_sequences(), model, tc, rank=0))
        model.train()
        for _ in range(warm_steps):
            optimizer_step(next(stream), model, model, optimizer, scheduler, None, tc.grad_clip)
        n, t0 = 0, time.perf_counter()
        while n < max_steps and (n == 0 or time.perf_counter() - t0 < min_seconds):
            optimizer_step(next(stream), model, model, optimizer, scheduler, None, tc.grad_clip)
            n += 1
        step_s = (time.perf_counter() - t0) / n
        rows = dataset.eval_rows("valid")
        sample = rows.subset(np.arange(min(len(rows), PROBE_EVAL_ROWS)))
        # a pass costs a fixed part (Flare builds its catalog text table at every evaluate: eval() drops it) plus a
        # part per row: two passes of different sizes separate them, and only the per-row part is extrapolated
        passes = {}
        for size in sorted({min(len(rows), PROBE_SMALL_ROWS), min(len(rows), PROBE_EVAL_ROWS)}):
            t1 = time.perf_counter()
            evaluate(model, rows.subset(np.arange(size)), dataset.n_items, EvalSettings())
            passes[size] = time.perf_counter() - t1
    finally:
        torch.set_num_threads(threads)
    (small, t_small), (large, t_large) = min(passes.items()), max(passes.items())
    per_row = (t_large - t_small) / (large - small) if large > small else t_large / max(1, large)
    table_s = max(0.0, t_small - small * per_row)
    result = Probe(dim=int(cfg.model.params.get("dim", 0)), step_s=step_s, slots_per_step=tc.batch_size * tc.pack_len,
                   eval_s=table_s + per_row * len(rows), table_s=table_s, steps_timed=n)
    log.info("probe %s dim %d: %.3f s/step (%d slots, %.0f tokens/s), validation pass %.1f s", cfg.model.name,
             result.dim, step_s, result.slots_per_step, result.tokens_per_s, result.eval_s)
    return result
