"""Source formats -> the prepared layout, on the real data in ../shared/data and on the demo generator."""
import json
import subprocess
import sys

import numpy as np
import pytest

from seqrec.data.dataset import PreparedDataset, SplitOptions, leave_one_out
from seqrec.data.demo import DemoOptions, generate_demo
from seqrec.data.lcrec import LCRecOptions, prepare_lcrec, split_categories
from seqrec.data.stats import dataset_stats
from seqrec.data.unisrec import prepare_unisrec, split_unisrec_text
from seqrec.eval.baselines import ItemTransition, LastItemRepeater, MostPop
from seqrec.eval.evaluator import evaluate


def _read_inter(path):
    lines = path.read_text().splitlines()[1:]
    out = []
    for line in lines:
        u, h, t = line.split("\t")
        out.append((int(u), [int(x) for x in h.split()], int(t)))
    return out


def test_unisrec_scientific_counts_and_exact_split(scientific_dataset, shared_data):
    d = scientific_dataset
    stats = dataset_stats(d)
    assert stats["users"] == 8442 and stats["items"] == 4385 and stats["interactions"] == 59427
    assert stats["users_with_repeated_item"] == 243
    assert d.meta["report"]["rebuilt_sequences_disagreeing_with_test_history"] == 0
    for split in ("test", "valid"):
        source = _read_inter(shared_data / "Scientific" / f"Scientific.{split}.inter")
        rows = d.eval_rows(split)
        assert len(rows) == len(source) == 8442
        for i, (u, h, t) in enumerate(source):
            assert rows.user_idx[i] == u and rows.targets[i] == t and rows.histories[i].tolist() == h
    # training sequences end right before the valid target
    valid = d.eval_rows("valid")
    train = dict(zip(d.split("train").column("user_idx").to_pylist(), d.train_sequences()))
    for u, h in zip(valid.user_idx[:200], valid.histories[:200]):
        assert train[u][-len(h):].tolist() == h.tolist()


def test_unisrec_reference_figures(scientific_dataset):
    d = scientific_dataset
    rows = d.eval_rows("test")
    pop = evaluate(MostPop.from_dataset(d), rows, d.n_items).metrics
    assert pop["ndcg@10/pes"] == pytest.approx(0.0171, abs=0.0005)
    assert pop["recall@10/pes"] == pytest.approx(0.0309, abs=0.001)
    lir = evaluate(LastItemRepeater.from_dataset(d), rows, d.n_items).metrics
    assert lir["ndcg@10/pes"] == pytest.approx(0.0019, abs=0.0001)
    assert lir["recall@10/opt"] == 1.0  # everything ties with the target except the last item


def test_unisrec_text_split():
    assert split_unisrec_text("A. B. C. Cat Path. Brand. ") == ("A. B. C", "Cat Path", "Brand")


def test_unisrec_malformed_lines_are_counted(tmp_path, shared_data):
    src = shared_data / "Scientific"
    for f in src.iterdir():
        data = f.read_bytes()
        if f.name.endswith("test.inter"):
            data += b"garbage line without tabs\n12\tnot numbers\t3\n"
        (tmp_path / f.name).write_bytes(data)
    report = prepare_unisrec(tmp_path, tmp_path / "out")
    assert report["malformed_lines"] == {"Scientific.test.inter": 2}
    assert len(report["malformed_sample"]) == 2
    assert PreparedDataset.load(tmp_path / "out").split("test").num_rows == 8442


def test_lcrec_scientific(tmp_path, shared_data):
    report = prepare_lcrec(shared_data / "Scientific_LCRec", tmp_path)
    d = PreparedDataset.load(tmp_path)
    assert d.n_users == 8317 and d.n_items == 4344
    assert d.meta["counts"]["interactions"] == 58492
    assert report["malformed_total"] == 0
    seq0 = d.full_sequences()[0]
    test = d.eval_rows("test")
    assert test.targets[0] == seq0[-1] and test.histories[0].tolist() == seq0[:-1].tolist()
    cats = d.items.column("categories").to_pylist()
    assert cats[0] == ["Industrial & Scientific", "Industrial Electrical", "Passive Components", "Capacitors"]
    assert d.item_texts()[0].startswith("Title: SUPCO")


def test_lcrec_max_len_filter(tmp_path, shared_data):
    prepare_lcrec(shared_data / "Scientific_LCRec", tmp_path / "f", LCRecOptions(max_len=50, long_sequences="filter"))
    prepare_lcrec(shared_data / "Scientific_LCRec", tmp_path / "t", LCRecOptions(max_len=51))
    f, t = PreparedDataset.load(tmp_path / "f"), PreparedDataset.load(tmp_path / "t")
    assert max(len(s) for s in f.full_sequences()) <= 50 and f.n_users < 8317
    assert max(len(s) for s in t.full_sequences()) == 51 and t.n_users == 8317


def test_split_categories_keeps_commas_inside_names():
    assert split_categories("A,Tapes, Adhesives & Sealants,B") == ["A", "Tapes, Adhesives & Sealants", "B"]


def test_leave_one_out_and_min_eval_len():
    seqs = [np.array([1, 2, 3, 4]), np.array([5, 6, 7]), np.array([8, 9])]
    out = leave_one_out(np.arange(3), seqs, SplitOptions(min_eval_len=4))
    assert out["test"]["user_idx"] == [0]
    assert out["test"]["history"][0].tolist() == [1, 2, 3] and out["test"]["target"] == [4]
    assert out["valid"]["history"][0].tolist() == [1, 2] and out["valid"]["target"] == [3]
    assert [s.tolist() for s in out["train"]["items"]] == [[1, 2], [5, 6, 7], [8, 9]]
    with pytest.raises(ValueError):
        SplitOptions(min_eval_len=2)


def test_demo_is_deterministic_and_learnable(tmp_path):
    a = generate_demo(tmp_path / "a", DemoOptions(n_users=400, n_items=150, seed=3))
    b = generate_demo(tmp_path / "b", DemoOptions(n_users=400, n_items=150, seed=3))
    da, db = PreparedDataset.load(a), PreparedDataset.load(b)
    assert da.items.equals(db.items) and da.sequences.equals(db.sequences)
    # the first-order transition model beats MostPop: the sequences carry sequential signal
    n = da.n_items
    rows = da.eval_rows("test")
    markov = evaluate(ItemTransition.from_dataset(da), rows, n).metrics["ndcg@10/pes"]
    pop = evaluate(MostPop.from_dataset(da), rows, n).metrics["ndcg@10/pes"]
    assert markov > 2 * pop, (markov, pop)


def test_cli_prepare_stats_evaluate(tmp_path, shared_data):
    out = tmp_path / "sci"
    run = lambda *a: subprocess.run([sys.executable, "-m", "seqrec.cli", *a], capture_output=True, text=True, check=True)
    run("data", "prepare", "--format", "unisrec", "--input", str(shared_data / "Scientific"), "--out", str(out))
    stats = run("data", "stats", str(out)).stdout
    assert "8442" in stats and "4385" in stats
    res = run("evaluate", "--dataset", str(out), "--model", "mostpop", "--out", str(tmp_path / "r.json"))
    assert "ndcg@10/pes" in res.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["results"]["mostpop"]["metrics"]["ndcg@10/pes"] == pytest.approx(0.0171, abs=0.0005)


def test_cli_errors_are_clear(tmp_path):
    res = subprocess.run([sys.executable, "-m", "seqrec.cli", "evaluate", "--dataset", str(tmp_path), "--model", "mostpop"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "not a prepared seqrec dataset" in res.stderr
