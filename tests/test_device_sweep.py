"""benchmarks/bench_device_sweep.py: the trial pairing, validation-only selection, and one real trial on Scientific."""
from __future__ import annotations

import time

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def sweep_mod():
    return load_benchmark("bench_device_sweep")


def test_every_shared_setting_is_run_as_both_models(sweep_mod):
    trials = sweep_mod.sample_trials(12, seed=3)
    assert len(trials) == 24
    assert trials[0] == {"model": "bert4rec", "overrides": {}, "key": "b-shipped"}
    assert trials[1]["key"] == "f-shipped" and trials[1]["overrides"] == {}
    for b, f in zip(trials[2::2], trials[3::2]):
        assert b["model"] == "bert4rec" and f["model"] == "flare" and b["key"][1:] == f["key"][1:]
        # Flare's trial is its partner's settings plus text-path keys only
        assert {k: v for k, v in f["overrides"].items() if k in b["overrides"]} == b["overrides"]
        text_keys = {k.split(".")[-1] for k in f["overrides"]} - {k.split(".")[-1] for k in b["overrides"]}
        assert text_keys == set(sweep_mod.FLARE_GRID)
        assert b["overrides"]["model.params.hidden"] == 4 * b["overrides"]["model.params.dim"]
    assert sweep_mod.sample_trials(12, seed=3) == trials  # seeded


def _rec(key, model, seed, valid, test, stopped="patience"):
    metrics = lambda v: {"ndcg@10/pes": v, "ndcg@10/opt": v, "recall@10/pes": v, "recall@10/opt": v,  # noqa: E731
                         "recall@1/pes": v, "mrr/pes": v}
    return {"key": key, "model": model, "seed": seed, "overrides": {"k": key}, "stopped": stopped,
            "valid": metrics(valid), "test": metrics(test), "test_cold": metrics(0.0), "checkpoint": f"/ck/{key}_{seed}"}


def test_selection_uses_mean_validation_of_rerun_settings_only(sweep_mod):
    records = [
        # a: best single-seed validation, but rerun on seeds 2/3 it averages 0.060
        _rec("a", "flare", 1, 0.070, 0.050), _rec("a", "flare", 2, 0.055, 0.050), _rec("a", "flare", 3, 0.055, 0.050),
        # b: mean validation 0.065 over 3 seeds; its test is the worst, which must not matter
        _rec("b", "flare", 1, 0.064, 0.040), _rec("b", "flare", 2, 0.066, 0.041), _rec("b", "flare", 3, 0.065, 0.042),
        # c: one seed only (never rerun): ranks after the rerun settings despite its validation
        _rec("c", "flare", 1, 0.069, 0.090),
        # d: cut by the deadline: never ranked
        _rec("d", "flare", 1, 0.080, 0.090, stopped="deadline"),
        {"key": "e", "model": "flare", "seed": 1, "error": "ValueError('x')"},
        _rec("z", "bert4rec", 1, 0.060, 0.055),
    ]
    out = sweep_mod.summarize(records)
    ranked = [r["key"] for r in out["ranking"]["flare"]]
    assert ranked == ["b", "a", "c"]
    pick = out["selected"]["flare"]
    assert pick["key"] == "b" and pick["valid_ndcg10"] == pytest.approx(0.065)
    assert pick["test_ndcg10"] == pytest.approx(0.041) and pick["test_ndcg10_per_seed"] == [0.04, 0.041, 0.042]
    assert pick["checkpoint"] == "/ck/b_2"  # the selected setting's best seed on validation
    assert out["selected"]["bert4rec"]["key"] == "z"


@pytest.mark.slow
@pytest.mark.parametrize("ema_decay", [None, 0.5])
def test_one_trial_trains_validates_and_saves_the_best_weights(sweep_mod, scientific_dataset, tmp_path, ema_decay):
    """A 2-step Bert4Rec trial on the real Scientific data, as the device runs it (here on the CPU): the record's
    test metrics are those of the saved best-validation checkpoint (with an EMA: of the validated average)."""
    from seqrec.eval.evaluator import EvalSettings, evaluate
    from seqrec.models.registry import load_model

    spec = {"model": "bert4rec", "key": "b-test", "seed": 1, "dataset": str(scientific_dataset.path),
            "encoder": "minilm", "device": "cpu", "deadline": time.time() + 600, "save_dir": str(tmp_path),
            "threads": torch.get_num_threads(),
            "overrides": {"model.params.dim": 32, "model.params.hidden": 64, "model.params.heads": 2},
            "extra": {"train.steps": 2, "train.eval_every": 1, "train.warmup_steps": 1, "train.ema_decay": ema_decay}}
    rec = sweep_mod.run_trial(spec)
    assert [s for s, _ in rec["curve"]] == [1, 2] and rec["stopped"] == "steps" and rec["steps_run"] == 2
    assert rec["best_step"] in (1, 2)
    assert rec["valid"]["ndcg@10/pes"] == pytest.approx(max(v for _, v in rec["curve"]), abs=1e-5)
    for split in ("valid", "test"):
        assert 0.0 <= rec[split]["ndcg@10/pes"] <= rec[split]["ndcg@10/opt"] <= 1.0
    assert rec["test_cold"]["users"] > 0
    model, _ = load_model(rec["checkpoint"])
    again = evaluate(model, scientific_dataset.eval_rows("test"), scientific_dataset.n_items, EvalSettings()).metrics
    assert again["ndcg@10/pes"] == pytest.approx(rec["test"]["ndcg@10/pes"], abs=1e-6)
