"""`seqrec fit`: the sizing rules on several dataset shapes (hand-computed), the budget plan, the text-prior grid,
bad input, and one end-to-end fit on the demo catalog whose record `seqrec evaluate --best-record` reads
(about 80 s on 2 cores; everything else here takes a few seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from seqrec.fit.families import FAMILIES
from seqrec.fit.probe import Probe
from seqrec.fit.sizing import DatasetProfile, check_fittable, profile_dataset, size


def profile(**kw) -> DatasetProfile:
    base = dict(name="x", n_items=4344, n_users=8317, n_train_seqs=8317, train_tokens=41858, len_median=6.0,
                len_p90=10.0, len_p99=20.0, len_max=78, n_valid=8317, n_test=8317, items_in_train=4327)
    return DatasetProfile(**{**base, **kw})


def sized(p: DatasetProfile, family: str) -> dict:
    s = size(p, FAMILIES[family])
    return {**s.model, **s.train}


def test_sizing_scientific_shape():
    """Scientific_LCRec's figures: 4,344 items, 41,858 training events, p99 length 20."""
    s = sized(profile(), "sasrec")
    assert s["max_len"] == 20  # p99 20, floor 20
    assert s["dim"] == 256 and s["hidden"] == 1024  # 4 sqrt(4344) = 263.6 -> 512, capped at 256
    assert s["layers"] == 1 and s["dropout"] == 0.1 == s["attn_dropout"]  # 9.6 events per item >= 8
    assert (s["pack_len"], s["batch_size"]) == (256, 8)  # 2,048 slots: 41,858 / 8 = 5,232 -> cap 2,048
    # ceil(41858 / 2048) = 21 steps an epoch x 1.5 x 2560 / 256 = 15 epochs
    assert s["steps"] == 315 and s["eval_every"] == 21 and s["warmup_steps"] == 16 and s["patience"] == 5
    b = sized(profile(), "bert4rec")
    assert b["steps"] == 788  # 21 x 37.5 epochs (cloze: 2.5 x)
    assert b["eval_every"] == 52 and b["mask_prob"] == 0.3 and b["last_only_prob"] == 0.3
    assert "mask_prob" not in s  # next-item models have no masking


def test_sizing_tiny_catalog():
    """The Amazon 2018 raw sample: 134 items, 1,491 training events in 305 sequences."""
    s = sized(profile(n_items=134, n_users=305, n_train_seqs=305, train_tokens=1491, len_p99=15.96, len_max=29,
                      n_valid=305, n_test=305, items_in_train=133), "sasrec")
    assert s["max_len"] == 20 and s["dim"] == 64  # 4 sqrt(134) = 46.3 -> 64
    # 1491 / 8 = 186 -> 128 slots a step (>= 8 steps an epoch): rows of 64 slots, 2 a step
    assert (s["pack_len"], s["batch_size"]) == (64, 2)
    assert s["steps"] == 720  # ceil(1491 / 128) = 12 steps an epoch x 60 epochs (1.5 x 2560 / 64)


def test_sizing_long_sequences_and_wide_catalog():
    long = sized(profile(n_items=500, n_users=1500, n_train_seqs=1500, train_tokens=109486, len_p99=119.0,
                         len_max=120), "sasrec")
    assert long["max_len"] == 119 and long["dim"] == 128  # 4 sqrt(500) = 89.4 -> 128
    assert long["dropout"] == 0.1 and long["pack_len"] == 256  # a 120-slot window fits a 256-slot row
    assert long["steps"] == 54 * 30  # ceil(109486 / 2048) = 54 steps an epoch x 30 epochs
    wide = sized(profile(n_items=20000, n_users=8000, n_train_seqs=8000, train_tokens=52149, len_p99=12.0,
                         len_max=12), "bert4rec")
    assert wide["dim"] == 256 and wide["dropout"] == 0.2  # 2.6 events per item < 8: more dropout
    assert wide["steps"] == round(26 * 37.5)  # ceil(52149 / 2048) = 26
    huge = sized(profile(train_tokens=600_000, n_train_seqs=50_000, len_p99=400.0, len_max=900), "sasrec")
    assert huge["layers"] == 2 and huge["max_len"] == 200 and huge["pack_len"] == 256


def test_profile_reads_the_prepared_dataset(demo_dataset):
    p = profile_dataset(demo_dataset)
    counts = demo_dataset.meta["counts"]
    assert (p.n_items, p.n_users, p.n_valid) == (counts["items"], counts["users"], counts["valid_rows"])
    # every evaluated user's last two events are the valid and test targets, not training events
    assert p.train_tokens == counts["interactions"] - 2 * counts["valid_rows"]
    check_fittable(p)


def write_dataset(out: Path, sequences: list[list[int]], n_items: int) -> Path:
    from seqrec.data.dataset import SplitOptions, leave_one_out, split_tables, write_prepared

    users = np.arange(len(sequences), dtype=np.int32)
    seqs = [np.asarray(s, dtype=np.int32) for s in sequences]
    items = pa.table({"item_idx": np.arange(n_items, dtype=np.int32), "item_id": [f"I{i}" for i in range(n_items)],
                      "title": [f"item {i}" for i in range(n_items)], "brand": [""] * n_items,
                      "categories": [[]] * n_items, "price": [""] * n_items, "description": [""] * n_items,
                      "text": [f"Title: item {i}" for i in range(n_items)]})
    table = pa.table({"user_idx": users, "user_id": [f"U{u}" for u in users], "items": seqs,
                      "timestamps": [np.arange(len(s), dtype=np.int64) for s in seqs]})
    write_prepared(out, items, table, split_tables(leave_one_out(users, seqs, SplitOptions())), {"name": out.name})
    return out


def test_bad_input_gets_a_clear_error(tmp_path, capsys):
    from seqrec.cli import main
    from seqrec.data.dataset import PreparedDataset

    few = write_dataset(tmp_path / "few", [[0, 1, 2, 3]] * 3 + [[1, 2]] * 20, n_items=4)
    with pytest.raises(ValueError, match="too small to split: 3 validation"):
        check_fittable(profile_dataset(PreparedDataset.load(few)))
    one = write_dataset(tmp_path / "one", [[0, 0, 0]] * 10, n_items=1)
    with pytest.raises(ValueError, match="1 item"):
        check_fittable(profile_dataset(PreparedDataset.load(one)))
    short = write_dataset(tmp_path / "short", [[0, 1]] * 30, n_items=2)  # nobody has 3 events: no validation
    with pytest.raises(ValueError, match="0 validation"):
        check_fittable(profile_dataset(PreparedDataset.load(short)))
    # through the command line: exit code 2 and the message, nothing started
    assert main(["fit", "--dataset", str(few), "--model", "sasrec", "--out", str(tmp_path / "f")]) == 2
    assert main(["fit", "--dataset", str(tmp_path / "missing"), "--model", "sasrec"]) == 2
    assert not (tmp_path / "f").exists()
    with pytest.raises(SystemExit):
        main(["fit", "--dataset", str(few), "--model", "gru4rec"])


def test_budget_plan():
    from seqrec.fit.search import plan_budget

    probe = Probe(dim=256, step_s=0.1, slots_per_step=2048, eval_s=2.0, table_s=0.0, steps_timed=10)
    # reserve = 45 + 2 x (4 + 4 prior passes) x 2 = 77 s; search = 600 - 20 - 77 = 503 s
    # a trial: 20 + 1.25 x (1000 x 0.1 + ceil(1000 / 66) = 16 validations x 2) = 185 s <= 0.6 x 503: not capped
    plan = plan_budget(600, 20, 1000, 66, probe, concurrency=2, n_prior_evals=4)
    assert (plan.reserve_s, plan.search_s, plan.trial_s, plan.capped) == (77.0, 503.0, 185.0, False)
    assert plan.num_samples == 12  # 503 / (0.45 x 185) = 6.04 rounds of 2, at most MAX_TRIALS
    # 3,000 steps (a 432 s trial) do not fit 60% of the search: a trial's work is (0.6 x 503 - 20) / 1.25 = 225.4 s,
    # of which 15 validations take 30 s: (225.4 - 30) / 0.1 = 1954 steps; that trial takes 304 s, 3 rounds of 2
    plan = plan_budget(600, 20, 3000, 200, probe, concurrency=2, n_prior_evals=4)
    assert plan.capped and (plan.steps, plan.validations, plan.num_samples) == (1954, 15, 6)
    assert "3000 -> 1954" in plan.notes[0]
    # validations of 10 s (Flare's text table): reserve 45 + 2 x 8 x 10 = 205 s, search 675 s, a trial's work
    # (0.6 x 675 - 20) / 1.25 = 308 s; 15 validations would take 150 s: only 9 (30% of it), 2180 steps
    slow_eval = Probe(dim=256, step_s=0.1, slots_per_step=2048, eval_s=10.0, table_s=9.0, steps_timed=10)
    plan = plan_budget(900, 20, 3000, 200, slow_eval, concurrency=2, n_prior_evals=4)
    assert plan.capped and (plan.validations, plan.steps) == (9, 2180)
    assert not plan_budget(600, 20, 3000, 200, probe, 2, 4, fixed_steps=True).capped  # --set train.steps
    with pytest.raises(ValueError, match="budget-s"):
        plan_budget(100, 20, 1000, 66, probe, concurrency=2, n_prior_evals=4)


def test_search_grid_is_centred_on_the_sizing(tmp_path):
    from seqrec.fit.search import BudgetPlan, build_grid, search_space
    from seqrec.tune.config import base_data, check_grid_points, fixed_overrides, swept_space

    sizing = size(profile(), FAMILIES["bert4rec"])
    space, centre = search_space(FAMILIES["bert4rec"], sizing, capped=False)
    assert space["model.params.dim"]["choice"] == [128, 256] and centre["model.params.dim"] == 256
    assert space["train.lr"]["loguniform"] == pytest.approx([1e-3 / 3, 3e-3])
    assert centre["model.params.mask_prob"] in space["model.params.mask_prob"]["choice"]
    sas_space, _ = search_space(FAMILIES["sasrec"], size(profile(n_items=500), FAMILIES["sasrec"]), capped=False)
    assert sas_space["model.params.dim"]["choice"] == [64, 128, 256] and "model.params.mask_prob" not in sas_space
    capped, _ = search_space(FAMILIES["sasrec"], size(profile(n_items=500), FAMILIES["sasrec"]), capped=True)
    assert capped["model.params.dim"]["choice"] == [64, 128]  # no wider trial when the budget already binds

    import yaml

    from seqrec.fit.search import experiment_base

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(experiment_base(FAMILIES["bert4rec"], sizing, str(tmp_path), "b")))
    plan = BudgetPlan(budget_s=600, spent_s=10, reserve_s=50, search_s=540, concurrency=2, steps=788, validations=15,
                      trial_s=200, num_samples=6, capped=False)
    grid = build_grid(FAMILIES["bert4rec"], sizing, plan, base, tmp_path, seed=3)
    assert grid.tune.time_budget_s == 540 and grid.tune.num_samples == 6 and grid.tune.seed == 3
    assert grid.tune.scheduler.grace_period == 788 // 4 and grid.tune.metric == "ndcg@10/pes"
    # every point of the space (and the centre) is a valid experiment for the registered model
    check_grid_points(grid, base_data(grid), fixed_overrides(grid), swept_space(grid))


def test_prior_grid_helpers():
    from seqrec.fit.prior import best_entry, round_sig, supported_priors, supports_prior, weight_grid

    assert [w for _, w in weight_grid(10.0)] == [1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0]
    assert weight_grid(0.7)[0] == (0.125, 0.0875)
    assert round_sig(0.012345) == 0.0123 and round_sig(0.0) == 0.0
    grid = [{"multipliers": {"a": 0.0, "b": 0.0}, "valid": {"m": 0.5}},
            {"multipliers": {"a": 1.0, "b": 0.0}, "valid": {"m": 0.5}},
            {"multipliers": {"a": 0.5, "b": 2.0}, "valid": {"m": 0.4}}]
    assert best_entry(grid, "m") is grid[0]  # a tie keeps the least prior (none)
    assert supports_prior("flare") and not supports_prior("calrec")
    assert supported_priors("sasrec") == ["text_prior_weight", "transition_prior_weight"] == supported_priors("flare")
    assert supported_priors("recformer") == [] == supported_priors("no_such_model")


@pytest.fixture(scope="module")
def trained_tiny(demo_dataset, tmp_path_factory):
    """A tiny SASRec trained in-process for 40 steps on the demo catalog, saved as a checkpoint (weight 0 priors)."""
    import numpy as np
    import torch

    from seqrec.models.packing import pack_sequences
    from seqrec.models.registry import build_model, model_config_dict
    from seqrec.train.checkpoint import save_model_files

    torch.manual_seed(0)
    model = build_model("sasrec", {"max_len": 12, "dim": 32, "layers": 1, "heads": 2, "hidden": 64, "dropout": 0.0,
                                   "attn_dropout": 0.0}, demo_dataset.n_items)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    packed = pack_sequences(demo_dataset.train_sequences(), 64, model.packed_seq_len, True, np.random.default_rng(0))
    model.train()
    for step in range(40):
        loss = model(packed.batch(np.arange(step * 8, step * 8 + 8) % len(packed)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("prior_ckpt")
    save_model_files(model.eval(), out, {"model_name": "sasrec", "model": model_config_dict(model),
                                         "n_items": demo_dataset.n_items})
    return out


def test_prior_choice_matches_the_evaluator(demo_dataset, trained_tiny):
    """choose_priors' one-pass grid gives, at every point, the metrics `seqrec evaluate` computes for the checkpoint
    loaded with those weights (the same float operations, the same ranking code), and it picks the best point."""
    from seqrec.eval.evaluator import EvalSettings, evaluate
    from seqrec.fit.prior import choose_priors
    from seqrec.models.registry import load_model

    choice = choose_priors(str(trained_tiny), "sasrec", demo_dataset)
    assert set(choice.weights) == {"text_prior_weight", "transition_prior_weight"} and choice.passes in (1, 2)
    assert len(choice.grid) >= 64 or len(choice.scales) < 2  # 8 x 8 (0 and 7 octaves each), then the refinement
    rows = demo_dataset.eval_rows("valid")
    best = max(e["valid"]["ndcg@10/pes"] for e in choice.grid)
    for entry in [choice.grid[0], choice.grid[9], next(e for e in choice.grid if e["weights"] == choice.weights)]:
        model, _ = load_model(str(trained_tiny), dataset=demo_dataset, use_ray=False, params=entry["weights"])
        assert evaluate(model, rows, demo_dataset.n_items, EvalSettings()).metrics == pytest.approx(entry["valid"], abs=1e-12)
    assert next(e for e in choice.grid if e["weights"] == choice.weights)["valid"]["ndcg@10/pes"] == best


def test_fit_end_to_end(ray_session, demo_dataset, tmp_path):
    """The demo catalog (300 users, 120 items): a budgeted search, the prior on validation, the record read by
    `seqrec evaluate --best-record` (same metrics) and by serving's source resolution (the same checkpoint, whose
    config carries the chosen prior weight)."""
    from seqrec.cli import main
    from seqrec.fit.runner import FitOptions, fit
    from seqrec.serve.config import ModelSource, resolve_source

    out = tmp_path / "fit"
    report = fit(FitOptions(dataset=str(demo_dataset.path), model="sasrec", budget_s=120, seed=1, out=str(out),
                            overrides={"train.steps": 24}))
    record = json.loads((out / "best.json").read_text())
    ckpt_config = json.loads((Path(record["checkpoint"]) / "config.json").read_text())
    prior = report["priors"]
    for key, weight in prior["weights"].items():  # the chosen weights travel in the checkpoint's config
        assert ckpt_config["model"][key] == record["prior_weights"][key] == weight
    assert set(prior["weights"]) == {"text_prior_weight", "transition_prior_weight"} and prior["scales"]
    chosen = next(e for e in prior["grid"] if e["weights"] == prior["weights"])
    assert chosen["valid"]["ndcg@10/pes"] == max(e["valid"]["ndcg@10/pes"] for e in prior["grid"])  # on validation
    assert record["metrics"]["valid"]["ndcg@10/pes"] == pytest.approx(chosen["valid"]["ndcg@10/pes"], abs=1e-12)
    if any(prior["weights"].values()):  # the model alone on test, reported beside the chosen scoring
        assert set(record["metrics"]["test_without_priors"]) == set(record["metrics"]["test"])
    assert 2 <= len(report["trials"]) <= report["plan"]["num_samples"]
    assert report["time_s"]["budgeted"] < 120 + 30  # the budget is kept (stopping and writing overrun a little)
    assert report["memory"]["peak_pss_mb"] > 100 and report["throughput"]["probe_s_per_step"] > 0
    assert {d["setting"] for d in report["sizing"]["decisions"]} >= {"model.params.dim", "train.steps"}

    # `seqrec evaluate --best-record` scores the record's checkpoint with its prior weight: the record's figures
    result = tmp_path / "eval.json"
    assert main(["evaluate", "--best-record", str(out / "best.json"), "--split", "test", "--out", str(result)]) == 0
    evaluated = next(iter(json.loads(result.read_text())["results"].values()))["metrics"]
    assert evaluated == record["metrics"]["test"]
    # serving resolves the same checkpoint and dataset from the record
    source = resolve_source(ModelSource(best_record=str(out / "best.json")))
    assert source.checkpoint == record["checkpoint"] and source.dataset == str(Path(demo_dataset.path).resolve())
    from seqrec.serve.core import load_for_serving

    served = load_for_serving(source.checkpoint, source.dataset)  # what a Serve replica loads
    assert served.model.config.text_prior_weight == record["prior_weights"]["text_prior_weight"]
    assert served.model.config.transition_prior_weight == record["prior_weights"]["transition_prior_weight"]
    with pytest.raises(ValueError, match="already holds a fit"):
        fit(FitOptions(dataset=str(demo_dataset.path), model="sasrec", out=str(out)))


def test_bench_generalise_tables():
    """The benchmark's per-dataset table and verdict lines from finished cells (no fit is run)."""
    from conftest import load_benchmark

    bench = load_benchmark("bench_generalise")
    metrics = {"ndcg@10/pes": 0.08, "recall@10/pes": 0.12, "recall@1/pes": 0.05}
    cells = {("d", "sasrec"): [{"seed": s, "budget_s": 300.0, "metrics": {"valid": metrics, "test": {**metrics,
                                "ndcg@10/pes": 0.07 + s / 100}}, "n_trials": 4,
                                "prior_weights": {"text_prior_weight": 2.0, "transition_prior_weight": 0.0},
                                "time_s": {"budgeted": 290.0}, "throughput": {"probe_s_per_step": 0.4,
                                "probe_tokens_per_s": 5000.0}, "memory": {"peak_pss_mb": 4000.0},
                                "sized": {"model.params.dim": 256, "train.steps": 315}} for s in (0, 1)]}
    base = {"markov": {"valid": metrics, "test": {**metrics, "ndcg@10/pes": 0.074}},
            "lir_text": {"valid": metrics, "test": {**metrics, "ndcg@10/pes": 0.05}}}
    text = bench.dataset_table("d", cells, base, ["sasrec", "bert4rec"])
    assert "s0 0.0700 (text=2)" in text and "s1 0.0800" in text and "bert4rec" in text and "not run yet" in text
    assert "sasrec test NDCG@10 0.0750: markov beaten, lir_text beaten" in text
    assert "0.400 s/step" in text and "4000 MB" in text
