"""ID models: chunked softmax numerics, Bert4Rec masking rules, packing masks/positions, per-model smoke tests."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seqrec.data.batching import make_batch
from seqrec.models.bert4rec import cloze_mask, positions_from_end
from seqrec.models.chunked_softmax import chunked_cross_entropy
from seqrec.models.layers import attention_mask, keep_recent
from seqrec.models.packing import pack_sequences, padding_stats, split_windows
from seqrec.models.registry import MODELS, build_model

TINY = {"max_len": 12, "dim": 16, "layers": 2, "heads": 2, "hidden": 32, "dropout": 0.0, "attn_dropout": 0.0}


def _seqs(n=80, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    # learnable structure: item i is followed by i+1 (mod n_items)
    return [(rng.integers(0, n_items) + np.arange(rng.integers(1, 16))) % n_items for _ in range(n)]


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_cross_entropy_matches_plain(with_bias):
    torch.manual_seed(0)
    h = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(101, dtype=torch.float64, requires_grad=True) if with_bias else None
    t = torch.randint(0, 101, (37,))
    t[:5] = 3  # repeated targets exercise index_add in the backward
    plain = F.cross_entropy(h @ w.t() + (b if b is not None else 0), t)
    grads_plain = torch.autograd.grad(plain, [h, w] + ([b] if b is not None else []))
    chunked = chunked_cross_entropy(h, w, t, b, chunk_items=10, max_logit_elems=0)  # forces 11 chunks
    grads_chunked = torch.autograd.grad(chunked, [h, w] + ([b] if b is not None else []))
    assert torch.allclose(plain, chunked, atol=1e-10)
    for a, c in zip(grads_plain, grads_chunked):
        assert torch.allclose(a, c, atol=1e-10)


def test_chunked_cross_entropy_hand_computed():
    h = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    # logits = [1, 0, 0], target 0: nll = log(e + 2) - 1
    got = chunked_cross_entropy(h, w, torch.tensor([0]), chunk_items=1, max_logit_elems=0)
    assert got.item() == pytest.approx(np.log(np.e + 2) - 1, abs=1e-6)


def test_cloze_mask_rules():
    gen = torch.Generator().manual_seed(0)
    seg = torch.zeros(64, 50, dtype=torch.long)
    seg[:, :20], seg[:, 20:23], seg[:, 23:45] = 1, 2, 3  # 5 padding slots at the end
    mask = cloze_mask(seg, 0.15, 0.0, gen)
    assert not mask[seg == 0].any(), "padding is never masked"
    for s in (1, 2, 3):
        assert ((mask & (seg == s)).sum(1) >= 1).all(), "every sequence has at least one masked item"
    rate = mask[:, :20].float().mean().item()  # long segment: the at-least-one rule barely matters
    assert 0.12 < rate < 0.19
    only_last = cloze_mask(seg, 0.15, 1.0, gen)
    expected = torch.zeros_like(only_last)
    expected[:, [19, 22, 44]] = True
    assert torch.equal(only_last, expected)
    mixed = cloze_mask(seg, 0.15, 0.5, gen)
    seqs_last_only = ((mixed & (seg == 1)).sum(1) == 1) & mixed[:, 19]
    assert 0.2 < seqs_last_only.float().mean().item() < 0.8


def test_packing_masks_and_positions():
    rng = np.random.default_rng(0)
    seqs = [np.arange(n) + 100 * i for i, n in enumerate([3, 5, 2, 7, 4, 1])]
    packed = pack_sequences(seqs, pack_len=8, max_seq_len=8, causal=False, rng=rng)
    assert packed.items.shape[1] == 8
    total = sum(len(s) for s in seqs)
    assert (packed.segments > 0).sum() == total
    assert len(packed) == int(np.ceil(total / 8))  # 22 items -> 3 rows: best fit leaves 2 slots
    for r in range(len(packed)):
        for s in set(packed.segments[r]) - {0}:
            sel = packed.segments[r] == s
            assert np.array_equal(packed.positions[r][sel], np.arange(sel.sum())), "positions restart at 0"
            items = packed.items[r][sel]
            assert np.array_equal(items, items[0] + np.arange(len(items))), "a segment is one contiguous sequence"
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    m = attention_mask(seg, causal=False)[0, 0]
    assert m[0, 1] and not m[0, 2] and m[2, 4] and not m[4, 5] and m[5, 5]
    c = attention_mask(seg, causal=True)[0, 0]
    assert not c[2, 3] and c[3, 2] and not c[2, 1]
    # causal windows: input s[:-1], target s[1:], long sequences cut into windows from the recent end
    inputs, targets = split_windows([np.arange(10)], max_seq_len=4, causal=True)
    assert [x.tolist() for x in inputs] == [[5, 6, 7, 8], [1, 2, 3, 4], [0]]
    assert [x.tolist() for x in targets] == [[6, 7, 8, 9], [2, 3, 4, 5], [1]]
    stats = padding_stats(_seqs(), pack_len=32, max_seq_len=12, causal=True)
    assert stats["padding_packed"] < 0.1 < stats["padding_fixed"]


def test_keep_recent():
    hist = torch.tensor([[1, 2, 3, 4, 5], [7, 8, -1, -1, -1]])
    h, n = keep_recent(hist, torch.tensor([5, 2]), 3)
    assert h.tolist() == [[3, 4, 5], [7, 8, -1]] and n.tolist() == [3, 2]


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_packed_equals_alone(name):
    """A sequence packed next to others gets the same representation as when encoded alone."""
    torch.manual_seed(0)
    model = build_model(name, TINY, 40).eval()
    a, b = np.array([3, 4, 5, 6]), np.array([10, 11, 12])
    from seqrec.models.packing import build_rows

    inputs, targets = split_windows([a, b], model.packed_seq_len, causal=True)
    packed = build_rows(inputs, targets, [[0, 1]], width=10).batch(np.arange(1))
    alone = build_rows(inputs, targets, [[1]], width=10).batch(np.arange(1))
    if name == "sasrec":
        hp = model.encode(packed["items"], packed["positions"], packed["segments"])[0, 3:5]
        ha = model.encode(alone["items"], alone["positions"], alone["segments"])[0, 0:2]
    else:
        from seqrec.models.layers import attention_mask as am

        tok = lambda x: (x["items"] + 1).clamp(min=0)
        hp = model.encoder(tok(packed), packed["positions"], am(packed["segments"], False))[0, 3:5]
        ha = model.encoder(tok(alone), alone["positions"], am(alone["segments"], False))[0, 0:2]
    assert torch.allclose(hp, ha, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layers", [0, 1, 3])
def test_query_rows_only_equal_full_encoder_output(causal, layers):
    """Inference computes the last block for the one wanted position per row (run_blocks' `query`); it must
    equal that row of the full (B, L, D) output, for bidirectional (Bert4Rec) and causal (SASRec) masks."""
    from seqrec.models.layers import Encoder

    torch.manual_seed(0)
    enc = Encoder(30, 12, 16, 4, 32, layers, 0.1, 0.1, 0.02).eval()
    tokens, positions = torch.randint(1, 30, (5, 11)), torch.arange(11).expand(5, -1)
    query = torch.tensor([0, 4, 10, 7, 3])
    mask = attention_mask((positions <= query[:, None]).long(), causal)
    full = enc(tokens, positions, mask)  # (B, L, D)
    fast = enc(tokens, positions, mask, query=query)  # (B, D)
    assert fast.shape == (5, 16)
    assert torch.allclose(fast, full[torch.arange(5), query], atol=1e-6)


def test_query_packing_layout_hand_computed():
    """Users laid end to end in rows of `capacity` slots (greedy, batch order), queries per row, and back."""
    from seqrec.models.layers import QueryPacking

    spans, queries = torch.tensor([3, 2, 5]), torch.tensor([2, 1, 4])
    pk = QueryPacking.plan(spans, width=6, queries=queries, capacity=5, min_slots=0)  # 2 rows x 5 vs 3 x 6
    assert pk.index.tolist() == [[0, 1, 2, 6, 7], [12, 13, 14, 15, 16]]
    assert pk.segments.tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1]]
    assert pk.query.tolist() == [[2, 4], [4, 0]]  # row 1 has one user: its second query slot repeats slot 0
    assert pk.order.tolist() == [0, 1, 2]  # flat (R * Q) outputs: [u0, u1, u2, (row 1 filler)]
    padded = torch.arange(18).view(3, 6) * 10
    assert pk.pack(padded).tolist() == [[0, 10, 20, 60, 70], [120, 130, 140, 150, 160]]
    assert pk.unpack(torch.tensor([[[1.0], [2.0]], [[3.0], [9.0]]])).tolist() == [[1.0], [2.0], [3.0]]
    # no saving (one long user per row anyway) or an empty history: None, the caller pads
    assert QueryPacking.plan(torch.tensor([6, 6]), width=6, queries=torch.tensor([5, 5]), capacity=6, min_slots=0) is None
    assert QueryPacking.plan(torch.tensor([0, 2]), width=6, queries=torch.tensor([0, 1]), min_slots=0) is None
    assert QueryPacking.plan(spans, width=6, queries=queries, capacity=5) is None  # 18 slots: too small to pay


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_packed_inference_equals_padded(name, packed_and_padded_scores):
    """score_all packs short histories into shared rows (QueryPacking); the scores must equal the padded
    computation's, for a batch mixing one long history with short ones (so the plan packs)."""
    from seqrec.models.layers import QueryPacking

    torch.manual_seed(0)
    model = build_model(name, {**TINY, "max_len": 30}, 60).eval()
    rng = np.random.default_rng(0)
    history = [rng.integers(0, 60, n) for n in (30, 2, 5, 1, 3, 7, 2, 4) * 2]  # 16 x 31 slots padded
    batch = make_batch(history, max_len=model.max_len)
    assert QueryPacking.plan(batch["lengths"] + 1, 31, batch["lengths"]) is not None
    packed, padded = packed_and_padded_scores(model, batch)
    assert torch.allclose(packed, padded, atol=1e-5)


def test_positions_from_end_hand_computed():
    segments = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert positions_from_end(positions, segments).tolist() == [[2, 1, 0, 1, 0, 0], [5, 4, 3, 2, 1, 0]]


@pytest.mark.parametrize("from_end", [False, True])
def test_bert4rec_inference_equals_training_view_of_masked_last_item(from_end):
    """score_all's query (history + mask token) is exactly the training input whose last item is masked."""
    torch.manual_seed(0)
    model = build_model("bert4rec", {**TINY, "positions_from_end": from_end}, 40).eval()
    history = [np.array([3, 4, 5, 6]), np.array([10, 11])]
    batch = make_batch(history, np.array([7, 12]), max_len=model.max_len)
    query = model.user_vectors(batch)  # (2, D)
    from seqrec.models.layers import attention_mask as am
    from seqrec.models.packing import build_rows

    inputs, targets = split_windows([np.array([3, 4, 5, 6, 7]), np.array([10, 11, 12])], model.packed_seq_len,
                                    causal=False)
    packed = build_rows(inputs, targets, [[0, 1]], width=10).batch(np.arange(1))
    tokens = (packed["items"] + 1).clamp(min=0)
    tokens[0, 4] = tokens[0, 7] = model.mask_token  # the last item of each packed sequence
    positions = positions_from_end(packed["positions"], packed["segments"]) if from_end else packed["positions"]
    h = model.encoder(tokens, positions, am(packed["segments"], False))[0]
    assert torch.allclose(h[[4, 7]], query, atol=1e-5)


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_model_smoke_learns(name):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    seqs = _seqs()
    model = build_model(name, TINY, 40)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    packed = pack_sequences(seqs, 32, model.packed_seq_len, model.causal, rng)
    losses = []
    for step in range(150):
        batch = packed.batch(np.arange(len(packed))[step % 4 :: 4])
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    model.eval()
    hist = [np.array([20, 21, 22, 23]), np.array([20]), np.arange(30) % 40]
    batch = make_batch(hist, np.array([24, 21, 30]), max_len=None)
    scores = model.score_all(batch)
    assert scores.shape == (3, 40) and torch.isfinite(scores).all()
    # padding and truncation do not change a row's scores
    alone = model.score_all(make_batch(hist[:1], np.array([24])))
    assert torch.allclose(scores[0], alone[0], atol=1e-5)
    trunc = model.score_all(make_batch([hist[2][-12:]], np.array([30])))
    assert torch.allclose(scores[2], trunc[0], atol=1e-5)
    assert 24 in scores[0].topk(3).indices.tolist()  # learnt "i -> i+1"


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_text_prior_adds_the_last_items_encoder_cosine(name, demo_dataset, tmp_path):
    """text_prior_weight w (models/text_prior.py): score_all = score_all at weight 0 + w * cos(mean-pooled MiniLM
    features of the last history item, of every item) = + w * lir_text's scores; an empty history adds nothing.
    Off, score_all is untouched. The table is catalog data: load_model's params attach it to a checkpoint saved
    at weight 0, from the feature cache (a second binding encodes nothing), and it is never saved. ~4 s each."""
    from safetensors.torch import load_file

    from seqrec.eval.baselines import LastItemText
    from seqrec.features.cache import FeatureCache, dataset_features
    from seqrec.models.chunked_softmax import chunked_scores
    from seqrec.models.registry import load_model, model_config_dict
    from seqrec.train.checkpoint import save_model_files

    n = demo_dataset.n_items
    torch.manual_seed(0)
    model = build_model(name, TINY, n).eval()
    rows = demo_dataset.eval_rows("test")
    batch = make_batch(rows.histories[:6] + [np.zeros(0, dtype=np.int64)], None, max_len=model.max_len)
    plain = model.score_all(batch)
    assert torch.equal(plain, chunked_scores(model.user_vectors(batch), model.item_table(), model.out_bias))
    save_model_files(model, tmp_path / "ckpt", {"model_name": name, "model": model_config_dict(model), "n_items": n})

    again, meta = load_model(tmp_path / "ckpt", dataset=demo_dataset, use_ray=False, params={"text_prior_weight": 2.5})
    assert meta["model"]["text_prior_weight"] == 2.5 and again.text_prior.table.shape == (n, 384)
    prior = again.score_all(batch)
    feats = dataset_features(demo_dataset, "minilm", 64, use_ray=False)  # the cache the binding filled
    x = feats.tokens.float() * feats.mask.unsqueeze(-1)  # hand-pooled: mean over real tokens, unit norm
    x = torch.nn.functional.normalize(x.sum(1) / feats.mask.sum(1, keepdim=True), dim=-1)
    for i, h in enumerate(rows.histories[:6]):
        assert torch.allclose(prior[i], plain[i] + 2.5 * (x @ x[int(h[-1])]), atol=1e-5)
    assert torch.equal(prior[6], plain[6])  # empty history: no prior
    assert torch.allclose(prior - plain, 2.5 * LastItemText(x).score_all(batch), atol=1e-5)
    assert set(again.state_dict()) == set(model.state_dict())
    assert not any("prior" in k for k in load_file(str(tmp_path / "ckpt" / "model.safetensors")))

    cache = FeatureCache(demo_dataset.path / "features", "minilm", 64)
    parts = sorted(cache.dir.glob("part-*.parquet"))
    other, _ = load_model(tmp_path / "ckpt", dataset=demo_dataset, use_ray=False, params={"text_prior_weight": 1.0})
    assert sorted(cache.dir.glob("part-*.parquet")) == parts  # re-binding read the cache, encoded nothing
    assert torch.allclose(other.score_all(batch) - plain, (prior - plain) / 2.5, atol=1e-5)
    # seqrec evaluate --model-param: the same binding (the cache is full, so no Ray job starts)
    import json

    from seqrec.cli import main
    from seqrec.eval.evaluator import EvalSettings, evaluate

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--dataset", str(demo_dataset.path), "--checkpoint", str(tmp_path / "ckpt"), "--split",
                 "valid", "--model-param", "text_prior_weight=2.5", "--out", str(out)]) == 0
    (cli,) = json.loads(out.read_text())["results"].values()
    expected = evaluate(again, demo_dataset.eval_rows("valid"), n, EvalSettings()).metrics
    assert cli["metrics"] == pytest.approx(expected, abs=1e-12)
    # serving binds through load_model too: a checkpoint saved with the weight ranks with the prior
    from seqrec.serve.core import load_for_serving

    save_model_files(again, tmp_path / "ckpt_prior", {"model_name": name, "model": model_config_dict(again), "n_items": n})
    served = load_for_serving(str(tmp_path / "ckpt_prior"), str(demo_dataset.path))
    assert torch.equal(served.model.score_all(batch), prior)
    unbound, _ = load_model(tmp_path / "ckpt", params={"text_prior_weight": 1.0})
    with pytest.raises(RuntimeError, match="bind"):
        unbound.score_all(batch)
    with pytest.raises(ValueError, match="text_prior_weight"):
        build_model(name, {**TINY, "text_prior_weight": -1.0}, n)


def test_untied_bert4rec_has_own_output():
    model = build_model("bert4rec", {**TINY, "tied_output": False}, 40)
    assert model.item_table().data_ptr() != model.encoder.item_emb.weight.data_ptr()
    tied = build_model("bert4rec", TINY, 40)
    assert tied.item_table().data_ptr() == tied.encoder.item_emb.weight[1:].data_ptr()


def test_state_dict_roundtrip_keeps_tied_and_flat_views(tmp_path):
    from seqrec.models.registry import load_state_dict_into, save_state_dict

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.out = torch.nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight  # classic tying: one tensor, two state-dict names
            self.b = torch.nn.Parameter(torch.zeros(5))

    m = Tied()
    flat = torch.randn(15 + 5)  # DeepSpeed-style: params are views into one flat buffer
    m.emb.weight.data = flat[:15].view(5, 3)
    m.b.data = flat[15:]
    save_state_dict(m, tmp_path / "w.safetensors")
    fresh = Tied()
    load_state_dict_into(fresh, tmp_path / "w.safetensors")
    assert torch.equal(fresh.emb.weight, m.emb.weight) and torch.equal(fresh.b, m.b)
    assert fresh.out.weight is fresh.emb.weight


def test_shipped_train_configs_parse_and_build():
    """Every shipped training config is a valid ExperimentConfig whose model builds (tiny catalog)."""
    from seqrec.config import CONFIG_DIR, load_config, read_yaml, resolve_config_path
    from seqrec.train.config import ExperimentConfig

    names = sorted(p.stem for p in (CONFIG_DIR / "train").glob("*.yaml"))
    assert {"sasrec_scientific", "bert4rec_scientific", "flare_tid_scientific", "tiny_demo"} <= set(names)
    for family in ("flare_id", "flare_tid"):  # the FLARE paper's per-dataset tables
        assert {f"{family}_paper_{d}" for d in ("games", "office", "scientific", "music", "arts", "pets")} <= set(names)
    from seqrec.train.staged_loop import is_staged_config, load_staged_config

    for name in names:
        if is_staged_config(name):  # multi-stage LM configs: typed parse only (building loads an LM)
            assert load_staged_config(name).stages
            continue
        cfg = load_config(ExperimentConfig, name, subdir="train")
        model = build_model(cfg.model.name, cfg.model.params, 10)
        assert hasattr(model, "loss") and hasattr(model, "score_all")
    for name in names:  # a shipped config's name is its file's (runs and records are named after it)
        assert read_yaml(resolve_config_path(name, "train")).get("name", name) == name, name
    pets = load_config(ExperimentConfig, "flare_id_paper_pets", subdir="train")
    assert (pets.model.params["dim"], pets.train.batch_size, pets.train.steps, pets.train.lr) == (1024, 32, 10000, 1e-4)


def test_cli_register_adds_train_subcommand():
    import argparse

    from seqrec.train import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", "tiny_demo", "--set", "train.steps=3"])
    assert args.func is cli.run and args.overrides == ["train.steps=3"]


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_transition_prior_adds_log_transition_counts(name, tmp_path):
    """transition_prior_weight w (models/transition_prior.py): score_all = score_all at weight 0 + w * log(1 + how
    often j followed the last history item in training), hand-counted on a 5-item catalog; an empty history and
    unseen transitions add nothing; weight 0 is bit-identical; bound by load_model's params, never saved."""
    from safetensors.torch import load_file

    from seqrec.models.registry import bind_dataset, load_model, model_config_dict
    from seqrec.train.checkpoint import save_model_files

    class Tiny:  # the two things bind_dataset's transition binding reads from a dataset
        n_items = 5

        @staticmethod
        def train_sequences():
            return [np.array([0, 1, 2]), np.array([0, 1]), np.array([3, 1, 0]), np.array([4])]

        @staticmethod
        def train_item_counts():
            return np.array([3, 3, 1, 1, 1])

    torch.manual_seed(0)
    model = build_model(name, TINY, 5).eval()
    batch = make_batch([np.array([2, 0]), np.array([1]), np.array([4]), np.zeros(0, dtype=np.int64)], None,
                       max_len=model.max_len)
    plain = model.score_all(batch)
    save_model_files(model, tmp_path / "ckpt", {"model_name": name, "model": model_config_dict(model), "n_items": 5})
    again, meta = load_model(tmp_path / "ckpt", params={"transition_prior_weight": 2.0})
    bind_dataset(again, Tiny, use_ray=False)
    got = again.score_all(batch) - plain
    expected = torch.zeros(4, 5)
    expected[0, 1] = 2.0 * math.log(3)  # last item 0: followed by 1 twice
    expected[1, 2] = expected[1, 0] = 2.0 * math.log(2)  # last item 1: followed by 2 once, by 0 once
    assert torch.allclose(got, expected, atol=1e-5)  # rows 2 (item 4: no successor) and 3 (empty): nothing
    again.config.transition_prior_weight = 0.0
    assert torch.equal(again.score_all(batch), plain)
    save_model_files(again, tmp_path / "ckpt2", {"model_name": name, "model": model_config_dict(again), "n_items": 5})
    assert not any("prior" in k for k in load_file(str(tmp_path / "ckpt2" / "model.safetensors")))
    unbound, _ = load_model(tmp_path / "ckpt", params={"transition_prior_weight": 1.0})
    with pytest.raises(RuntimeError, match="bind"):
        unbound.score_all(batch)
    with pytest.raises(ValueError, match="transition_prior_weight"):
        build_model(name, {**TINY, "transition_prior_weight": -1.0}, 5)
