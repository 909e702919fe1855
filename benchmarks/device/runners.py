"""The two model families of the kit: ID models (SASRec, Bert4Rec, Flare T+ID: packed sequences, train.loop's
BatchStream) and staged text models (Recformer, CALRec: the model's own sample_batch, as train.staged_loop's
worker draws it). Each: one run (the Ray path or the local path, common.py), test evaluation, one JSON."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import common as C

# Per-token training FLOPs (forward + backward = 3 x forward = 3 x 2 multiply-adds per weight): ~6 * P for the
# transformer (P = parameters outside the item/position embedding tables, whose lookups cost no matmul) plus the
# full-catalog output: 6 * dim * n_items per scored position (every position for SASRec / Flare; Bert4Rec scores
# its masked positions only, so that term is scaled by the mask rate). Attention's O(L^2) term is left out
# (L <= 51 here, small next to dim * n_items).
ID_FLOPS = "6*P_nonemb + 6*dim*n_items*scored_fraction per token (P_nonemb: parameters outside the embedding tables)"
LM_FLOPS = ("6*P_nonemb per attended token (P_nonemb: transformer parameters outside the token embedding; the vocab "
            "head counts in P_nonemb when untied; Recformer's item-matrix refreshes are not counted)")
EMBEDDINGS = ("item_emb", "pos_emb", "embed_tokens", "word_embeddings", "position_embeddings", "token_type_embeddings")


def _ray_train(cfg, staged: bool, work: Path) -> tuple[dict[str, Any], float]:
    """The project's Ray Train run of `cfg` (already set to deepspeed + GPU); (summary, wall seconds)."""
    t0 = time.perf_counter()
    if staged:
        from seqrec.train.staged_loop import run_staged

        summary = run_staged(cfg)
    else:
        from seqrec.train.loop import run_experiment

        summary = run_experiment(cfg)
    return summary, time.perf_counter() - t0


def _ray_overrides(zero_stage: int, work: Path, name: str) -> dict[str, Any]:
    return {"scaling.strategy": "deepspeed", "scaling.use_gpu": True, "scaling.zero_stage": zero_stage,
            "scaling.deepspeed_config": f"zero{zero_stage}", "run.storage_path": str(work / "runs"),
            "run.name": f"kit_{name}"}


def _start(name: str, argv):
    """What every script does first: arguments, the CUDA check, the budget, the path, threads, the dataset."""
    import torch

    C.setup_logging()
    args = C.parse_args(name, argv)
    device = C.check_cuda(args)
    C.budget_check(args)
    t_start = time.perf_counter()
    path = C.choose_path(args, device)
    torch.set_num_threads(1 if args.tiny else max(1, torch.get_num_threads()))
    work = C.workdir(args)
    dataset = C.tiny_dataset(work) if args.tiny else C.scientific_dataset(args, work)
    return args, device, t_start, path, work, dataset


def run_id_model(name: str, preset: str, tiny_params: dict[str, Any], gpu_params: dict[str, Any] | None = None,
                 argv: list[str] | None = None, zero_stage: int = 2) -> dict[str, Any]:
    import torch

    from seqrec.config import load_config
    from seqrec.models.registry import bind_dataset, build_model
    from seqrec.train.config import ExperimentConfig

    args, device, t_start, path, work, dataset = _start(name, argv)
    params = dict(tiny_params if args.tiny else gpu_params or {})
    if "encoder" in params:  # Flare: the frozen text encoder that fills the feature cache
        params["encoder"] = C.tiny_text_encoder(work) if args.tiny else C.text_encoder(args, work)
    overrides: dict[str, Any] = {"data.path": str(dataset.path), "train.seed": args.seed,
                                 **{f"model.params.{k}": v for k, v in params.items()}}
    if args.tiny:
        overrides.update({"train.steps": 4, "train.batch_size": 4, "train.pack_len": 64, "train.warmup_steps": 1,
                          "train.ema_decay": None, "train.eval_every": 4})
    elif args.max_steps:
        overrides["train.steps"] = args.max_steps
    else:
        overrides["train.steps"] = 100_000  # the wall-clock budget stops it (the LR schedule is the preset's warmup)
    if path == "ray":
        cfg = load_config(ExperimentConfig, preset, "train", overrides={**overrides, **_ray_overrides(zero_stage, work, name)})
        summary, wall = _ray_train(cfg, False, work)
        return _ray_record(args, name, device, cfg.train, summary, wall, t_start, zero_stage)

    cfg = load_config(ExperimentConfig, preset, "train", overrides=overrides)
    C.seed_all(cfg.train.seed)
    model = build_model(cfg.model.name, cfg.model.params, dataset.n_items)
    bind_dataset(model, dataset, use_ray=False)  # Flare: encodes the catalog in-process (on the GPU there)
    model.to(device)
    dim = int(getattr(model.config, "dim"))
    scored = float(getattr(model.config, "mask_prob", 1.0)) if name == "bert4rec" else 1.0
    p_nonemb = C.count_params(model, EMBEDDINGS)
    flops_per_token = 6.0 * p_nonemb + 6.0 * dim * dataset.n_items * scored
    trained = C.local_train(model=model, dataset=dataset, tc=cfg.train, device=device, minutes=args.minutes,
                            max_steps=args.max_steps, flops_per_token=flops_per_token)
    metrics, n_eval, eval_s = C.evaluate_test(model, dataset, device, args.eval_users, args.seed)
    return C.write_result(args, C.finish_record(
        args, model_name=name, device=device, path="local", trained=trained, metrics=metrics, eval_users=n_eval,
        total_users=C.total_users(dataset), eval_s=eval_s, flops_formula=ID_FLOPS, n_params=C.count_params(model),
        t_start=t_start, extra={"preset": preset, "dataset": dataset.name, "n_items": int(dataset.n_items),
                                "flops_per_token": flops_per_token, "strategy": "single process (no DeepSpeed)"}))


def run_staged_model(name: str, preset: str, tiny_params: dict[str, Any], gpu_params: dict[str, Any],
                     argv: list[str] | None = None, zero_stage: int = 2, stage: int = -1,
                     eval_users_default: int | None = None, eval_note: str | None = None) -> dict[str, Any]:
    """Recformer / CALRec: the preset's `stage` (default its last: the recommendation objective) trained on
    Scientific alone (the tiny check: on the demo catalog), then the test split."""
    import torch

    from seqrec.models.registry import bind_dataset, build_model
    from seqrec.train.staged_loop import load_staged_config

    args, device, t_start, path, work, dataset = _start(name, argv)
    params = dict(tiny_params if args.tiny else gpu_params)
    if params.get("encoder") == "minilm" and not args.tiny:
        params["encoder"] = C.text_encoder(args, work)
    if name == "calrec" and not args.tiny and C.smollm2_tokenizer(args):
        params["tokenizer"] = C.smollm2_tokenizer(args)
    cfg = load_staged_config(preset, {f"model.params.{k}": v for k, v in params.items()})
    index = stage % len(cfg.stages)
    tc = cfg.stages[index].train
    tc.seed = args.seed
    if args.tiny:
        tc.steps, tc.batch_size, tc.warmup_steps = 3, 4, 1
    else:
        tc.steps = args.max_steps or 100_000  # the wall-clock budget stops it
    # all test users, except a model whose evaluation is sampled generation (CALRec: a seeded subset)
    eval_users = args.eval_users or (eval_users_default and (4 if args.tiny else eval_users_default))
    if path == "ray":
        from seqrec.config import from_dict

        d = asdict(cfg)
        d["stages"] = [d["stages"][index]]
        d["stages"][0]["datasets"] = [{"path": str(dataset.path)}]
        d["stages"][0]["validation"] = {"path": str(dataset.path)}
        d["eval_max_users"] = eval_users
        d["scaling"].update(strategy="deepspeed", use_gpu=True, zero_stage=zero_stage, deepspeed_config=f"zero{zero_stage}")
        d["run"].update(storage_path=str(work / "runs"), name=f"kit_{name}")
        cfg = from_dict(type(cfg), d)
        summary, wall = _ray_train(cfg, True, work)
        return _ray_record(args, name, device, tc, summary, wall, t_start, zero_stage)

    C.seed_all(tc.seed)
    model = build_model(cfg.model.name, cfg.stage_params(index), dataset.n_items)
    corpus = model.prepare_corpus(dataset)
    sequences = dataset.train_sequences()
    bind_dataset(model, dataset, use_ray=False)
    model.to(device)

    def batches():
        step, buckets, pool = 0, tc.length_buckets, []  # train.length_buckets: a pool of batches every `buckets` steps
        while True:
            if hasattr(model, "before_step"):  # Recformer: re-encodes the item matrix every item_refresh_every
                model.before_step(step)
            parts = [(corpus, sequences, tc.batch_size, 0)]
            if buckets > 1:
                if step % buckets == 0:
                    pool = model.sample_bucketed(parts, np.random.default_rng([tc.seed, 0, step // buckets]), buckets)
                yield pool[step % buckets]
            else:
                yield model.sample_batch(parts, np.random.default_rng([tc.seed, 0, step]))
            step += 1

    flops_per_token = 6.0 * C.count_params(model, EMBEDDINGS)
    trained = C.local_train(model=model, dataset=dataset, tc=tc, device=device, minutes=args.minutes,
                            max_steps=args.max_steps, flops_per_token=flops_per_token, batches=batches())
    trained["seq_per_s"] = trained["steps_per_s"] * tc.batch_size
    metrics, n_eval, eval_s = C.evaluate_test(model, dataset, device, eval_users, args.seed)
    extra = {"preset": preset, "stage": cfg.stages[index].name, "dataset": dataset.name,
             "n_items": int(dataset.n_items), "flops_per_token": flops_per_token,
             "strategy": "single process (no DeepSpeed)", "model_params": params}
    if eval_note and n_eval < C.total_users(dataset):
        extra["eval_note"] = eval_note
    return C.write_result(args, C.finish_record(
        args, model_name=name, device=device, path="local", trained=trained, metrics=metrics, eval_users=n_eval,
        total_users=C.total_users(dataset), eval_s=eval_s, flops_formula=LM_FLOPS, n_params=C.count_params(model),
        throughput_key="seq_per_s", t_start=t_start, extra=extra))


def _ray_record(args, name, device, tc, summary, wall, t_start, zero_stage) -> dict[str, Any]:
    """The Ray path's record: steps and metrics from the run's summary; its throughput is the summary's
    last reported seq/s (ID models) where present, else steps x batch over the training (or whole run's) wall
    time, a lower bound. The project's final evaluation runs in the driver, on the CPU."""
    steps = int(summary.get("final_step") or sum(s.get("final_step", 0) for s in summary.get("stages", [])))
    test = summary.get("test", {})
    metrics = test if all(isinstance(v, (int, float)) for v in test.values()) else next(iter(test.values()), {})
    metrics = metrics.get("metrics", metrics)
    train_s = float(summary.get("train_seconds") or wall)
    seq_per_s = float(summary.get("seq_per_s_last") or steps * tc.batch_size / max(train_s, 1e-9))
    trained = {"steps": steps, "train_s": round(train_s, 1), "tokens": None, "tokens_per_s": None,
               "steps_per_s": steps / max(wall, 1e-9), "seq_per_s": seq_per_s, "achieved_flops": 0.0,
               "loss_curve": [], "precision": {"dtype": "torch.bfloat16", "autocast": False, "deepspeed_bf16": True}}
    record = C.finish_record(args, model_name=name, device=device, path="ray", trained=trained,
                             metrics=C.sane_metrics(metrics), eval_users=summary.get("eval_users"),
                             total_users=None, eval_s=None, flops_formula="not measured on the Ray path",
                             n_params=0, throughput_key="seq_per_s", t_start=t_start,
                             extra={"strategy": f"deepspeed zero{zero_stage} bf16", "mfu_note": "no MFU on the Ray path"})
    record["mfu"] = None
    return C.write_result(args, record)
