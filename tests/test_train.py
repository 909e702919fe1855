"""Ray Train end to end on the demo dataset: DDP with checkpoint reload, resume, fault tolerance, DeepSpeed ZeRO-2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seqrec.config import load_config
from seqrec.data.batching import make_batch
from seqrec.eval.evaluator import EvalSettings, evaluate
from seqrec.models.registry import build_model, load_model
from seqrec.train.config import ExperimentConfig
from seqrec.train.loop import run_experiment


def _cfg(dataset, tmp_path, **overrides) -> ExperimentConfig:
    base = {"data.path": str(dataset.path), "run.storage_path": str(tmp_path / "runs"), "train.threads_per_worker": 1}
    return load_config(ExperimentConfig, "tiny_demo", subdir="train", overrides={**base, **overrides})




def _weights(ckpt_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt_dir) / "model.safetensors"))


def test_ddp_two_workers_checkpoint_reload_and_resume(ray_session, demo_dataset, tmp_path):
    cfg = _cfg(demo_dataset, tmp_path, **{"scaling.num_workers": 2, "train.steps": 8, "train.eval_every": 4,
                                          "run.name": "ddp2"})
    summary = run_experiment(cfg)
    assert summary["final_step"] == 8
    latest = Path(summary["latest_checkpoint"])
    # every rank's part is merged into one checkpoint directory
    for name in ("model.safetensors", "config.json", "train_state.pt", "rank_state_0.pt", "rank_state_1.pt"):
        assert (latest / name).exists(), name
    # reload in this process: scores are identical across loads and metrics match the worker's validation
    model, meta = load_model(summary["best_checkpoint"])
    again, _ = load_model(summary["best_checkpoint"])
    rows = demo_dataset.eval_rows("valid")
    batch = make_batch(rows.histories[:32], rows.targets[:32], max_len=model.max_len)
    assert torch.equal(model.score_all(batch), again.score_all(batch))
    assert meta["model_name"] == "sasrec" and meta["n_items"] == demo_dataset.n_items
    reported = json.loads((Path(summary["best_checkpoint"]).parent / "summary.json").read_text())["valid"]
    assert evaluate(model, rows, demo_dataset.n_items, EvalSettings()).metrics == pytest.approx(reported, abs=1e-12)

    # resume: the step count, optimizer and scheduler continue from the checkpoint
    state = torch.load(latest / "train_state.pt", weights_only=True)
    assert state["state"]["step"] == 8 and state["optimizer"]["state"]
    cfg2 = _cfg(demo_dataset, tmp_path, **{"scaling.num_workers": 2, "train.steps": 12, "train.eval_every": 4,
                                           "run.name": "ddp2_resumed", "run.resume_from": str(latest)})
    resumed = run_experiment(cfg2)
    assert resumed["final_step"] == 12
    steps = sorted(int(p.name.split("_")[-1]) for p in (tmp_path / "runs" / "ddp2_resumed").glob("checkpoint_0*"))
    assert steps and min(steps) == 12  # no re-run of steps 1..8: the first report of the resumed run is at 12
    new_state = torch.load(Path(resumed["latest_checkpoint"]) / "train_state.pt", weights_only=True)
    assert new_state["scheduler"]["last_epoch"] == 12


def test_fault_tolerance_kill_worker_resumes_exactly(ray_session, demo_dataset, tmp_path):
    common = {"train.steps": 8, "train.eval_every": 3, "train.keep_checkpoints": 5}
    clean = run_experiment(_cfg(demo_dataset, tmp_path, **common, **{"run.name": "clean"}))
    faulty = run_experiment(_cfg(demo_dataset, tmp_path, **common, **{
        "run.name": "faulty", "train.fail_at_step": 5, "scaling.max_failures": 1}))
    assert (tmp_path / "runs" / "faulty" / ".fault_injected").exists(), "the worker was killed once"
    assert faulty["final_step"] == 8
    # restarted from step 3's checkpoint with optimizer, scheduler, RNG and data position: same final weights
    a, b = _weights(clean["latest_checkpoint"]), _weights(faulty["latest_checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_deepspeed_zero2_two_workers_cpu(ray_session, demo_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cfg = _cfg(demo_dataset, tmp_path, **{
        "scaling.num_workers": 2, "scaling.strategy": "deepspeed", "scaling.deepspeed_config": "zero2",
        "train.steps": 6, "train.eval_every": 6, "run.name": "ds_zero2",
        "model.name": "bert4rec",
        "model.params": {"max_len": 20, "dim": 16, "layers": 1, "heads": 2, "hidden": 32, "tied_output": True},
    })
    summary = run_experiment(cfg)
    assert summary["final_step"] == 6
    ckpt = Path(summary["latest_checkpoint"])
    assert (ckpt / "deepspeed" / "state").is_dir()  # ZeRO optimizer shards of both ranks
    weights = _weights(ckpt)
    assert "out_weight" not in weights  # tied: the output layer is the embedding table itself
    model, _ = load_model(ckpt)
    assert model.item_table().data_ptr() == model.encoder.item_emb.weight[1:].data_ptr()
    # the single-process reload reproduces the worker's validation exactly, and scores are deterministic
    rows = demo_dataset.eval_rows("valid")
    metrics = evaluate(model, rows, demo_dataset.n_items, EvalSettings()).metrics
    assert metrics == pytest.approx(summary["valid"], abs=1e-12)
    reported = _reported_metrics(tmp_path / "runs" / "ds_zero2", 6)
    assert metrics["ndcg@10/pes"] == pytest.approx(reported["val/ndcg@10/pes"], abs=1e-9)
    batch = make_batch(rows.histories[:16], rows.targets[:16], max_len=model.max_len)
    assert torch.equal(model.score_all(batch), load_model(ckpt)[0].score_all(batch))

    # resume under DeepSpeed: each rank reloads its ZeRO optimizer shard and the step count continues
    cfg.run.resume_from, cfg.run.name, cfg.train.steps = str(ckpt), "ds_zero2_resumed", 9
    resumed = run_experiment(cfg)
    assert resumed["final_step"] == 9
    state = torch.load(Path(resumed["latest_checkpoint"]) / "train_state.pt", weights_only=True)
    assert state["state"]["step"] == 9 and state["scheduler"]["last_epoch"] == 9


def test_deepspeed_zero3_checkpoint_holds_full_gathered_weights(ray_session, demo_dataset, tmp_path, monkeypatch):
    """ZeRO-3 partitions every parameter across ranks; the checkpoint must still hold the whole model."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    params = {"max_len": 20, "dim": 16, "layers": 1, "heads": 2, "hidden": 32, "tied_output": True}
    cfg = _cfg(demo_dataset, tmp_path, **{
        "scaling.num_workers": 2, "scaling.strategy": "deepspeed", "scaling.deepspeed_config": "zero3",
        "train.steps": 4, "train.eval_every": 4, "run.name": "ds_zero3", "model.name": "bert4rec",
        "model.params": params,
    })
    summary = run_experiment(cfg)
    assert summary["final_step"] == 4
    weights = _weights(summary["latest_checkpoint"])
    reference = build_model("bert4rec", params, demo_dataset.n_items).state_dict()
    for name, tensor in reference.items():  # every tensor at its full (unpartitioned) shape
        assert tuple(weights[name].shape) == tuple(tensor.shape), name
        assert weights[name].abs().sum() > 0, name
    model, _ = load_model(summary["latest_checkpoint"])
    metrics = evaluate(model, demo_dataset.eval_rows("valid"), demo_dataset.n_items, EvalSettings()).metrics
    assert metrics == pytest.approx(summary["valid"], abs=1e-12)  # the gathered weights are the trained ones


def _reported_metrics(run_dir: Path, step: int) -> dict:
    """Metrics the worker reported with a checkpoint, as persisted by Ray Train."""
    import ray.train

    result = ray.train.Result.from_path(str(run_dir))
    for ckpt, metrics in result.best_checkpoints:
        if metrics["step"] == step:
            return metrics
    raise AssertionError(f"no checkpoint at step {step}")


def test_weight_ema_update_by_hand_and_applied_restores_live():
    from seqrec.train.ema import WeightEMA

    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = WeightEMA(lin, decay=0.9)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0]]))
    ema.update(lin)  # t=1: d = min(0.9, 2/11) = 2/11 -> shadow = 2/11 * [1, 2] + 9/11 * [3, 0]
    expected = torch.tensor([[2 / 11 + 27 / 11, 4 / 11]])
    assert torch.allclose(ema.shadow["weight"], expected)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.0]]))
    for _ in range(200):  # past the warm-up the decay is the configured one
        ema.update(lin)
    assert ema.current_decay() == 0.9
    with ema.applied(lin):
        assert torch.equal(lin.weight, ema.shadow["weight"])
    assert torch.equal(lin.weight, torch.zeros(1, 2)), "the live weights come back after the block"
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEMA(lin, decay=1.0)


def test_ema_checkpoints_hold_the_average_and_resume_exactly(ray_session, demo_dataset, tmp_path):
    common = {"train.steps": 8, "train.eval_every": 3, "train.keep_checkpoints": 5, "train.ema_decay": 0.8}
    clean = run_experiment(_cfg(demo_dataset, tmp_path, **common, **{"run.name": "ema_clean"}))
    latest = Path(clean["latest_checkpoint"])
    state = torch.load(latest / "train_state.pt", weights_only=True)
    saved = _weights(latest)
    assert state["ema_updates"] == 8
    # model.safetensors is the average, the train state keeps the live weights to continue from
    assert any(not torch.equal(saved[k], v) for k, v in state["live_weights"].items())
    # what was validated is what was saved: the worker's reported metric from the averaged weights
    model, _ = load_model(clean["best_checkpoint"])
    reported = json.loads((Path(clean["best_checkpoint"]).parent / "summary.json").read_text())["valid"]
    assert evaluate(model, demo_dataset.eval_rows("valid"), demo_dataset.n_items, EvalSettings()).metrics == \
        pytest.approx(reported, abs=1e-12)
    # killed at step 5 and restarted from step 3's checkpoint: the same average and live weights at the end
    faulty = run_experiment(_cfg(demo_dataset, tmp_path, **common, **{
        "run.name": "ema_faulty", "train.fail_at_step": 5, "scaling.max_failures": 1}))
    assert (tmp_path / "runs" / "ema_faulty" / ".fault_injected").exists()
    again = _weights(faulty["latest_checkpoint"])
    state2 = torch.load(Path(faulty["latest_checkpoint"]) / "train_state.pt", weights_only=True)
    for k in saved:
        assert torch.equal(saved[k], again[k]), k
    for k, v in state["live_weights"].items():
        assert torch.equal(v, state2["live_weights"][k]), k


def test_validation_scores_with_the_text_prior(ray_session, demo_dataset, tmp_path):
    """model.params.text_prior_weight > 0 (SASRec): the driver fills the prior's feature cache, the worker binds the
    table, and validation (which selects the checkpoint) scores with the prior on: the best checkpoint, bound to
    its dataset, reproduces the worker's validation score; without the prior the same weights score otherwise."""
    summary = run_experiment(_cfg(demo_dataset, tmp_path, **{"train.steps": 4, "train.eval_every": 2,
                                                             "run.name": "prior", "model.params.text_prior_weight": 2.0}))
    best = Path(summary["best_checkpoint"])
    worker_score = torch.load(best / "train_state.pt", weights_only=True)["state"]["best_score"]
    rows = demo_dataset.eval_rows("valid")
    model, meta = load_model(best, dataset=demo_dataset, use_ray=False)
    assert meta["model"]["text_prior_weight"] == 2.0
    with_prior = evaluate(model, rows, demo_dataset.n_items, EvalSettings()).metrics["ndcg@10/pes"]
    assert with_prior == pytest.approx(worker_score, abs=1e-9)
    off, _ = load_model(best, dataset=demo_dataset, use_ray=False, params={"text_prior_weight": 0.0})
    assert evaluate(off, rows, demo_dataset.n_items, EvalSettings()).metrics["ndcg@10/pes"] != with_prior


def test_refit_dataset_moves_validation_targets_into_training(demo_dataset):
    from seqrec.data.dataset import _list_column, refit_dataset

    out = Path(demo_dataset.path).parent / "demo_refit_unit"
    refit = refit_dataset(demo_dataset, out)
    train = dict(zip(demo_dataset.split("train").column("user_idx").to_pylist(),
                     _list_column(demo_dataset.split("train"), "items")))
    refit_train = dict(zip(refit.split("train").column("user_idx").to_pylist(),
                           _list_column(refit.split("train"), "items")))
    valid, test = demo_dataset.eval_rows("valid"), demo_dataset.eval_rows("test")
    assert len(valid) > 0 and set(refit_train) == set(train)
    for u, target in zip(valid.user_idx.tolist(), valid.targets.tolist()):
        assert refit_train[u].tolist() == train[u].tolist() + [target]
    evaluated = set(valid.user_idx.tolist())
    for u in set(train) - evaluated:  # training-only users are unchanged
        assert refit_train[u].tolist() == train[u].tolist()
    # the demo's histories are not truncated: each refit sequence is exactly that user's test history
    for u, history in zip(test.user_idx.tolist(), test.histories):
        assert refit_train[u].tolist() == history.tolist()
    for split in ("valid", "test"):
        assert refit.split(split).equals(demo_dataset.split(split))
    counts = refit.train_item_counts() - demo_dataset.train_item_counts()
    assert counts.sum() == len(valid) and np.array_equal(counts, np.bincount(valid.targets, minlength=refit.n_items))
    assert refit.meta["fit_on"] == "train+valid" and refit.meta["source_counts"] == demo_dataset.meta["counts"]
    assert (out / "features").resolve() == (Path(demo_dataset.path) / "features").resolve()
    # written once: a second call reuses it
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert refit_dataset(demo_dataset, out).path == out and (out / "meta.json").stat().st_mtime_ns == stamp


def test_train_config_rejects_bad_fit_on_and_stop_step(demo_dataset, tmp_path):
    with pytest.raises(ValueError, match="fit_on"):
        _cfg(demo_dataset, tmp_path, **{"train.fit_on": "valid"})
    with pytest.raises(ValueError, match="stop_step"):
        _cfg(demo_dataset, tmp_path, **{"train.steps": 10, "train.stop_step": 11})


def test_refit_run_stops_at_stop_step_without_validation(ray_session, demo_dataset, tmp_path):
    from seqrec.train.loop import lr_lambda

    cfg = _cfg(demo_dataset, tmp_path, **{"train.fit_on": "train+valid", "train.steps": 12, "train.stop_step": 8,
                                          "train.eval_every": 4, "train.patience": 1, "run.name": "refit"})
    summary = run_experiment(cfg)
    # no validation (patience cannot stop it), the run ends at stop_step and tests the last checkpoint
    assert summary["final_step"] == 8 and summary["best_step"] == 8 and summary["fit_on"] == "train+valid"
    assert "valid" not in summary and summary["test"]["ndcg@10/pes"] >= 0
    assert Path(summary["best_checkpoint"]).name == "checkpoint_00000008"
    reported = _reported_metrics(tmp_path / "runs" / "refit", 8)
    assert not any(k.startswith("val/") for k in reported)
    # the lr schedule spans train.steps (12), not the stop step: the step-8 lr is mid-decay, not the floor
    assert reported["lr"] == pytest.approx(cfg.train.lr * lr_lambda(cfg.train)(8))
    assert reported["lr"] > cfg.train.lr * cfg.train.min_lr_ratio * 1.5
    # it trained on the refit copy, whose training sequences hold the validation targets
    assert Path(str(demo_dataset.path) + "+valid", "meta.json").exists()
    model, _ = load_model(summary["best_checkpoint"])
    res = evaluate(model, demo_dataset.eval_rows("test"), demo_dataset.n_items, EvalSettings())
    assert res.metrics == pytest.approx(summary["test"], abs=1e-12)
