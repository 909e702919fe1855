"""Critiquing evaluation: category paths, the variant rules (a-e), metrics through the one evaluator,
adherence, the qualitative dump and `seqrec evaluate --critique` on the demo dataset."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import torch

from seqrec.eval.critique import CategoryIndex, CritiqueSettings, choose_critique, evaluate_critiques, format_critique_report
from seqrec.eval.evaluator import EvalSettings, evaluate
from seqrec.models.flare import Flare, FlareConfig, category_paths, load_flare_features

TINY = dict(dim=16, layers=1, heads=2, hidden=32, dropout=0.0, attn_dropout=0.0, perceiver_dim=16, perceiver_heads=2,
            perceiver_layers=1, perceiver_latents=2, max_text_tokens=32, max_len=20)


@dataclass
class _Items:
    items: pa.Table


def test_category_paths_from_lcrec_source(tmp_path):
    lcrec = {
        "0": {"title": "Red Widget.", "categories": "Industrial & Scientific,Tapes, Adhesives & Sealants,Tapes"},
        "1": {"title": "Blue Gizmo", "categories": "Industrial & Scientific,Lab & Scientific Products,Pipettes"},
    }
    (tmp_path / "X.item.json").write_text(json.dumps(lcrec))
    items = pa.table({
        "title": ["Red widget", "Other thing", "Odd", "No cat", "Listed"],
        "categories": [["Industrial & Scientific Tapes, Adhesives & Sealants Tapes"],  # matched by title
                       ["Industrial & Scientific Lab & Scientific Products Pipettes"],  # split into known levels
                       ["Something Unknown Here"],  # kept whole
                       [],
                       ["A", "B"]],  # already levels
    })
    paths = category_paths(_Items(items), tmp_path)
    assert paths[0] == ["Industrial & Scientific", "Tapes, Adhesives & Sealants", "Tapes"]
    assert paths[1] == ["Industrial & Scientific", "Lab & Scientific Products", "Pipettes"]
    assert paths[2] == ["Something Unknown Here"] and paths[3] == [] and paths[4] == ["A", "B"]
    with pytest.raises(FileNotFoundError):
        category_paths(_Items(items), tmp_path / "missing")


def test_variant_rules():
    paths = [["R", "A", "A1"], ["R", "A", "A1", "x"], ["R", "A", "A2"], ["R", "B", "B1"], ["R", "C", "C1"],
             ["R", "C", "C1"], ["R", "A"], []]
    index = CategoryIndex(paths)
    s = CritiqueSettings(min_depth=2, outside_min_items=2)
    rng = np.random.default_rng(0)
    hist = np.array([3, 2, 1])  # most recent last: item 1 is under the target's category, item 2 is a sibling
    assert choose_critique("a", hist, 0, index, s, rng) == ("R", "A", "A1")
    assert choose_critique("b", hist, 0, index, s, rng) == ("R", "A")
    assert choose_critique("b", hist, 6, index, s, rng) is None  # parent would be the root alone
    assert choose_critique("c", hist, 0, index, s, rng) == ("R", "A", "A1", "x")
    assert choose_critique("c", hist, 2, index, s, rng) is None  # a leaf
    assert choose_critique("d", hist, 0, index, s, rng) == ("R", "A", "A2")  # skips item 1 (same branch)
    assert choose_critique("d", np.array([1]), 0, index, s, rng) is None
    assert choose_critique("e", hist, 0, index, s, rng) == ("R", "C", "C1")  # the only unrelated leaf with >= 2 items
    assert choose_critique("a", hist, 7, index, s, rng) is None  # target without a category
    with pytest.raises(ValueError):
        choose_critique("z", hist, 0, index, s, rng)
    assert index.adherence(np.array([0, 1, 2, 3]), ("R", "A")) == 0.75


@pytest.fixture(scope="module")
def trained_tiny(demo_dataset, tmp_path_factory):
    """A tiny Flare model trained for a few steps in-process with critiques (enough to make critiques matter)."""
    from seqrec.models.packing import pack_sequences

    cache = tmp_path_factory.mktemp("crit_cache")
    torch.manual_seed(0)
    model = Flare(FlareConfig(**TINY, critique_prob=0.5), demo_dataset.n_items)
    load_flare_features(model, demo_dataset, cache_dir=cache, use_ray=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    packed = pack_sequences(demo_dataset.train_sequences(), 128, model.packed_seq_len, False, np.random.default_rng(0))
    model.train()
    for step in range(30):
        batch = packed.batch(np.arange(step * 4, step * 4 + 4) % len(packed))
        loss = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), cache


def test_critique_evaluation_on_demo(demo_dataset, trained_tiny):
    from seqrec.features.encoder import FrozenTextEncoder

    model, _ = trained_tiny
    rows = demo_dataset.eval_rows("test").subset(np.arange(120))
    enc = FrozenTextEncoder.load("minilm", max_tokens=32)
    settings = CritiqueSettings(variants=("a", "b", "d", "e"), outside_min_items=2, n_dump=2)
    result = evaluate_critiques(model, demo_dataset, rows, enc, settings)
    table = result["table"]
    # the no-critique row is exactly the shared evaluator's result
    plain = evaluate(model, rows, demo_dataset.n_items, EvalSettings()).metrics
    assert table["none"]["ndcg@10/pes"] == pytest.approx(plain["ndcg@10/pes"], abs=1e-12)
    for v in ("a", "b", "d", "e"):
        row = table[v]
        assert row["users"] + row["skipped"] == len(rows)
        assert 0.0 <= row["adherence@k"] <= 1.0 and 0.0 <= row["adherence@k (no critique)"] <= 1.0
    # variant (a) covers every user (all demo items have a category): its 'no critique' columns are the none row
    assert table["a"]["users"] == len(rows)
    assert table["a"]["recall@10/pes (no critique)"] == pytest.approx(table["none"]["recall@10/pes"])
    # trained with critiques, a category critique pulls the top-10 into that category
    assert table["e"]["adherence@k"] > table["e"]["adherence@k (no critique)"]
    assert len(result["dump"]) == 2 and set(result["dump"][0]["top"]) == {"none", "a", "b", "d", "e"}
    text = format_critique_report(result)
    assert "adherence@10" in text and "history (last 5)" in text


def test_evaluate_cli_critique_mode(demo_dataset, trained_tiny, tmp_path, capsys):
    from seqrec.cli import main
    from seqrec.models.registry import model_config_dict
    from seqrec.train.checkpoint import save_model_files

    model, cache = trained_tiny
    ckpt = tmp_path / "ckpt"
    save_model_files(model, ckpt, {"model_name": "flare", "model": model_config_dict(model), "n_items": demo_dataset.n_items})
    # the CLI reads the dataset's own feature cache: share the fixture's encoded features with it
    import shutil

    if not (demo_dataset.path / "features").exists():
        shutil.copytree(cache, demo_dataset.path / "features")
    out = tmp_path / "crit.json"
    assert main(["evaluate", "--dataset", str(demo_dataset.path), "--checkpoint", str(ckpt), "--critique", "a,b,d",
                 "--max-users", "40", "--dump-users", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "variant" in printed and "no critique" in printed
    data = json.loads(out.read_text())
    assert set(data["table"]) == {"none", "a", "b", "d"} and data["n_rows"] == 40
    with pytest.raises(SystemExit):
        main(["evaluate", "--dataset", str(demo_dataset.path), "--checkpoint", str(ckpt), "--critique", "a,q"])


def test_evaluate_cli_model_param_sets_the_text_prior(demo_dataset, trained_tiny, tmp_path, capsys):
    """--model-param overrides a checkpoint's scoring setting: text_prior_weight changes the ranking, is recorded
    in the JSON, and malformed items or unknown keys are refused."""
    import shutil

    from seqrec.cli import main
    from seqrec.models.registry import model_config_dict
    from seqrec.train.checkpoint import save_model_files

    model, cache = trained_tiny
    ckpt = tmp_path / "ckpt"
    save_model_files(model, ckpt, {"model_name": "flare", "model": model_config_dict(model), "n_items": demo_dataset.n_items})
    if not (demo_dataset.path / "features").exists():
        shutil.copytree(cache, demo_dataset.path / "features")
    results = {}
    for weight in (None, "3"):
        out = tmp_path / f"eval_{weight}.json"
        extra = ["--model-param", f"text_prior_weight={weight}"] if weight else []
        assert main(["evaluate", "--dataset", str(demo_dataset.path), "--checkpoint", str(ckpt), "--split", "valid",
                     "--out", str(out), *extra]) == 0
        results[weight] = json.loads(out.read_text())
    assert results["3"]["model_params"] == {"text_prior_weight": 3}
    assert results[None]["model_params"] == {}
    (plain,), (prior,) = (r["results"].values() for r in results.values())
    assert plain["metrics"]["mrr/pes"] != prior["metrics"]["mrr/pes"]
    capsys.readouterr()
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["evaluate", "--dataset", str(demo_dataset.path), "--checkpoint", str(ckpt), "--model-param", "oops"])
    assert main(["evaluate", "--dataset", str(demo_dataset.path), "--checkpoint", str(ckpt), "--model-param",
                 "no_such=1"]) != 0  # the CLI logs "model[flare]: unknown keys ['no_such']" and fails
