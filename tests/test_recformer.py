"""Recformer: input builder, embedding sum, MLM masking, both contrastive losses against hand computations, the
frozen stage-2 item matrix, checkpoints, and the staged run on the real Scientific data (tiny random encoder)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from seqrec.data.batching import make_batch
from seqrec.models.recformer import (
    IGNORE,
    TYPE_CLS,
    TYPE_KEY,
    TYPE_VALUE,
    InputBuilder,
    Recformer,
    RecformerConfig,
    info_nce,
    load_tokenizer,
    mask_tokens,
)

ITEMS = [
    {"title": "red pen", "brand": "acme", "category": "office > pens"},
    {"title": "blue pen", "brand": "acme", "category": "office > pens"},
    {"title": "lab glove", "brand": "", "category": "lab"},
    {"title": "beaker", "brand": "pyrex", "category": "lab > glass"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(RecformerConfig(encoder="tiny"))


def tiny(n_items=len(ITEMS), **kw) -> Recformer:
    torch.manual_seed(0)
    cfg = RecformerConfig(encoder="tiny", tiny_dim=16, tiny_layers=1, tiny_heads=2, max_seq_tokens=48, max_attr_tokens=6,
                          max_items=5, **kw)
    return Recformer(cfg, n_items).attach_items(ITEMS)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_item_sentence_keys_values_and_truncation(tokenizer):
    b = InputBuilder(tokenizer, ["title", "brand", "category"], max_attr_tokens=2, max_seq_tokens=64, max_items=5)
    s_ids, s_types = b.item_sentence({"title": "lab glove box", "brand": "", "category": "lab"})
    title, lab = ids(tokenizer, "lab glove box"), ids(tokenizer, "lab")
    # title key, first 2 title tokens, (empty brand left out), category key, its value
    assert s_ids == ids(tokenizer, "title") + title[:2] + ids(tokenizer, "category") + lab
    assert s_types == [TYPE_KEY] * len(ids(tokenizer, "title")) + [TYPE_VALUE] * 2 + \
        [TYPE_KEY] * len(ids(tokenizer, "category")) + [TYPE_VALUE] * len(lab)


def test_user_input_order_types_positions_and_budget(tokenizer):
    b = InputBuilder(tokenizer, ["title"], max_attr_tokens=8, max_seq_tokens=64, max_items=5)
    s = [b.item_sentence({"title": t}) for t in ("aa", "bb", "cc")]
    x_ids, x_types, x_pos = b.user_input(s)  # history oldest first: aa, bb, cc
    expect = [b.cls_id] + s[2][0] + s[1][0] + s[0][0]  # most recent first
    assert x_ids == expect
    assert x_types[0] == TYPE_CLS and x_types[1:] == s[2][1] + s[1][1] + s[0][1]
    assert x_pos == [0] + [1] * len(s[2][0]) + [2] * len(s[1][0]) + [3] * len(s[0][0])
    # budget: only whole items fit, most recent kept
    tight = InputBuilder(tokenizer, ["title"], 8, max_seq_tokens=1 + len(s[2][0]) + len(s[1][0]) + 1, max_items=5)
    t_ids, _, t_pos = tight.user_input(s)
    assert t_ids == [b.cls_id] + s[2][0] + s[1][0] and max(t_pos) == 2
    # the most recent item alone is cut to the budget
    cut = InputBuilder(tokenizer, ["title"], 8, max_seq_tokens=3, max_items=5)
    assert cut.user_input(s)[0] == [b.cls_id] + s[2][0][:2]
    # max_items: only the 2 most recent items
    few = InputBuilder(tokenizer, ["title"], 8, max_seq_tokens=64, max_items=2)
    assert few.user_input(s)[0] == [b.cls_id] + s[2][0] + s[1][0]
    batch = b.collate([b.user_input(s), b.user_input(s[:1])])
    assert batch["attention_mask"].sum(1).tolist() == [len(x_ids), 1 + len(s[0][0])]
    assert (batch["input_ids"][1, 1 + len(s[0][0]):] == b.pad_id).all()


def test_embedding_is_layernorm_of_the_four_sums():
    model = tiny().eval()
    with torch.no_grad():  # non-zero new tables so each term is visible
        model.token_type.weight.normal_()
        model.item_position.weight.normal_()
    rows = [model.builder.user_input([model.catalog[0], model.catalog[3]])]
    batch = model.builder.collate(rows)
    captured = {}
    handle = model.encoder.embeddings.register_forward_hook(lambda m, i, o: captured.setdefault("emb", o))
    model.encode(batch)
    handle.remove()
    e = model.encoder.embeddings
    x = batch["input_ids"]
    manual = e.LayerNorm(e.word_embeddings(x) + e.position_embeddings(torch.arange(x.shape[1]))[None]
                         + e.token_type_embeddings(torch.zeros_like(x)) + model.token_type(batch["token_types"])
                         + model.item_position(batch["item_positions"]))
    assert torch.allclose(captured["emb"], manual, atol=1e-6)
    # the ablation drops C and D
    off = tiny(token_type_embedding=False, item_position_embedding=False).eval()
    off.load_state_dict(model.state_dict())
    captured.clear()
    handle = off.encoder.embeddings.register_forward_hook(lambda m, i, o: captured.setdefault("emb", o))
    off.encode(batch)
    handle.remove()
    plain = e.LayerNorm(e.word_embeddings(x) + e.position_embeddings(torch.arange(x.shape[1]))[None]
                        + e.token_type_embeddings(torch.zeros_like(x)))
    assert torch.allclose(captured["emb"], plain, atol=1e-6)


def test_mlm_masking_proportions():
    g = torch.Generator().manual_seed(0)
    n, cls, pad, mask_id, vocab = 200_000, 101, 0, 103, 1000
    x = torch.randint(200, vocab, (1, n))
    x[0, 0] = cls
    attn = torch.ones_like(x)
    attn[0, -1000:] = 0
    x[0, -1000:] = pad
    corrupted, labels = mask_tokens(x, attn, 0.15, mask_id, vocab, [cls, pad], g)
    chosen = labels != IGNORE
    assert not chosen[0, 0] and not chosen[0, -1000:].any()  # [CLS] and padding never chosen
    assert (labels[chosen] == x[chosen]).all()
    assert abs(chosen.float().sum().item() / (n - 1001) - 0.15) < 0.005
    to_mask = (corrupted == mask_id) & chosen
    kept = (corrupted == x) & chosen
    share = chosen.sum().item()
    assert abs(to_mask.sum().item() / share - 0.8) < 0.01
    assert abs(kept.sum().item() / share - 0.1) < 0.01  # (+ the rare random draw of the same token)
    assert abs((chosen & ~to_mask & ~kept).sum().item() / share - 0.1) < 0.01
    assert (corrupted[~chosen] == x[~chosen]).all()


def test_info_nce_against_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    tau = 0.5
    c = 1 / math.sqrt(2)  # cos(q0, k0) = cos(q1, k0) = 1/sqrt2; cos(q0, k1) = 0; cos(q1, k1) = 1
    l0 = -math.log(math.exp(c / tau) / (math.exp(c / tau) + math.exp(0 / tau)))
    l1 = -math.log(math.exp(1 / tau) / (math.exp(c / tau) + math.exp(1 / tau)))
    assert info_nce(q, k, tau).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # a duplicate positive is no negative: both rows see only their own key
    same = torch.tensor([[True, True], [True, True]])
    assert info_nce(q, k, tau, same).item() == pytest.approx(0.0, abs=1e-7)


def test_finetune_loss_is_softmax_over_the_item_matrix():
    model = tiny(objective="finetune", temperature=0.1).eval()
    model.refresh_item_matrix()
    batch = model.sample_batch([(model.catalog, [np.array([0, 1, 2]), np.array([3, 2])], 3, 0)], np.random.default_rng(0))
    loss = model.loss(batch)
    h = torch.nn.functional.normalize(model.encode(batch)[:, 0], dim=-1)
    logits = h @ model.item_matrix.t() / 0.1
    manual = -(logits.gather(1, batch["target"][:, None]).squeeze(1) - torch.logsumexp(logits, 1)).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    # item matrix rows are the normalised [CLS] outputs of each item alone
    one = model.builder.collate([model.builder.item_input(model.catalog[2])])
    assert torch.allclose(model.item_matrix[2], torch.nn.functional.normalize(model.encode(one)[0, 0], dim=-1), atol=1e-5)


def test_length_buckets_group_by_length_and_keep_every_example():
    """sample_bucketed: the same draw as one big sample_batch, split by user-input length into batches that each
    pad to their own longest input; pretraining's (B, B) same-target mask follows its rows."""
    seqs = [np.array([0, 1, 2, 3]), np.array([3, 2]), np.array([1, 0, 2]), np.array([2, 3, 1, 0])]
    for objective in ("finetune", "pretrain"):
        model = tiny(objective=objective)
        big = model.sample_batch([(model.catalog, seqs, 12, 0)], np.random.default_rng(5))
        parts = model.sample_bucketed([(model.catalog, seqs, 4, 0)], np.random.default_rng(5), 3)
        assert [len(b["input_ids"]) for b in parts] == [4, 4, 4]
        lengths = big["attention_mask"].sum(1)
        got = sorted(int(n) for b in parts for n in b["attention_mask"].sum(1))
        assert got == sorted(lengths.tolist())  # every example once, none truncated
        for b in parts:
            n = b["attention_mask"].sum(1)
            assert b["input_ids"].shape[1] == int(n.max())  # padded to its own longest row
            assert (b["input_ids"][b["attention_mask"] == 0] == model.builder.pad_id).all()
        spans = sorted((int(b["attention_mask"].sum(1).min()), int(b["attention_mask"].sum(1).max())) for b in parts)
        assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))  # grouped: no overlap of lengths
        if objective == "pretrain":
            for b in parts:
                assert b["target_same"].shape == (4, 4) and b["target_same"].diagonal().all()
                assert b["target_input_ids"].shape[1] == int(b["target_attention_mask"].sum(1).max())
                model.loss(b)  # the losses run on a bucket
        else:
            targets = sorted(int(t) for b in parts for t in b["target"])
            assert targets == sorted(big["target"].tolist())


def test_pretrain_loss_terms():
    model = tiny(objective="pretrain", mlm_prob=0.5).eval()  # no dropout: two forwards agree
    batch = model.sample_batch([(model.catalog, [np.array([0, 1])] * 3, 4, 0)], np.random.default_rng(1))
    assert (batch["mlm_labels"] != IGNORE).any() and batch["target_same"].shape == (4, 4)
    assert batch["target_same"].all()  # every example has next item 1: no negatives are left
    terms = model.loss_terms(batch)
    assert terms["iic"].item() == pytest.approx(0.0, abs=1e-6)
    assert model.loss(batch).item() == pytest.approx((terms["iic"] + 0.1 * terms["mlm"]).item(), rel=1e-6)
    model.train().loss(batch).backward()
    assert model.mlm_head.dense.weight.grad is not None and model.item_position.weight.grad is not None


def test_stage2_item_matrix_is_frozen_and_stage1_refreshes():
    frozen = tiny(objective="finetune", item_refresh_every=0).train()
    frozen.before_step(0)  # encodes once
    start = frozen.item_matrix.clone()
    opt = torch.optim.SGD(frozen.parameters(), lr=1.0)
    seqs = [np.array([0, 1, 2, 3]), np.array([3, 2, 1])]
    for step in range(1, 4):
        frozen.before_step(step)
        opt.zero_grad()
        frozen.loss(frozen.sample_batch([(frozen.catalog, seqs, 4, 0)], np.random.default_rng(step))).backward()
        opt.step()
    frozen.before_step(4)
    frozen.before_validation(distributed=False)
    assert torch.equal(frozen.item_matrix, start)  # frozen through steps and validation
    assert frozen.item_matrix.grad is None and not frozen.item_matrix.requires_grad
    assert not torch.allclose(frozen.encode_sentences(frozen.catalog), start)  # the weights did move

    moving = tiny(objective="finetune", item_refresh_every=2).train()
    moving.before_step(0)
    first = moving.item_matrix.clone()
    opt = torch.optim.SGD(moving.parameters(), lr=1.0)
    opt.zero_grad()
    moving.loss(moving.sample_batch([(moving.catalog, seqs, 4, 0)], np.random.default_rng(0))).backward()
    opt.step()
    moving.before_step(1)
    assert torch.equal(moving.item_matrix, first)
    moving.before_step(2)
    assert not torch.allclose(moving.item_matrix, first)


def test_freeze_layers_stops_the_gradient_below_the_trained_layers():
    torch.manual_seed(0)
    cfg = RecformerConfig(encoder="tiny", tiny_dim=16, tiny_layers=2, tiny_heads=2, max_seq_tokens=48, max_attr_tokens=6,
                          max_items=5, objective="finetune", freeze_layers=1)
    model = Recformer(cfg, len(ITEMS)).attach_items(ITEMS).train()
    model.before_step(0)
    model.loss(model.sample_batch([(model.catalog, [np.array([0, 1, 2, 3])], 4, 0)], np.random.default_rng(0))).backward()
    lower, upper = model.encoder.encoder.layer
    frozen = [*model.encoder.embeddings.parameters(), model.token_type.weight, model.item_position.weight,
              *lower.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in upper.parameters())
    with pytest.raises(ValueError, match="freeze_layers 3"):
        Recformer(RecformerConfig(encoder="tiny", tiny_dim=16, tiny_layers=2, tiny_heads=2, freeze_layers=3), 4)


def test_checkpoint_round_trip_reuses_the_item_matrix(tmp_path):
    from seqrec.models.registry import load_model
    from seqrec.train.checkpoint import save_model_files

    model = tiny().eval()
    model.refresh_item_matrix()
    batch = make_batch([np.array([0, 1]), np.array([3])], np.array([2, 2]))
    scores = model.score_all(batch)
    assert scores.shape == (2, len(ITEMS))
    save_model_files(model, tmp_path, {"model_name": "recformer", "model": model.config.__dict__, "n_items": len(ITEMS)})
    loaded, _ = load_model(tmp_path)
    loaded.attach_items(ITEMS)
    assert loaded.item_matrix_is_current()  # same catalog: no re-encoding
    assert torch.allclose(loaded.score_all(batch), scores, atol=1e-6)
    changed = [dict(ITEMS[0], title="green pen")] + ITEMS[1:]
    loaded.attach_items(changed)
    assert not loaded.item_matrix_is_current()  # a changed text invalidates it
    with pytest.raises(ValueError, match="catalog has"):
        loaded.attach_items(ITEMS[:2])


def test_staged_run_on_scientific(ray_session, scientific_dataset, demo_dataset, tmp_path, capsys):
    """`seqrec train --config recformer_tiny`: pretraining on a demo catalog validated on Scientific, finetuning
    stage 1 and stage 2 on Scientific, a test subset; stage 2's item matrix is the best stage-1 checkpoint's."""
    from safetensors.torch import load_file

    from seqrec.cli import main

    sci, demo = str(scientific_dataset.path), str(demo_dataset.path)
    rc = main(["train", "--config", "recformer_tiny",
               "--set", f"stages.0.datasets=[{{path: {demo}}}]", "--set", f"stages.0.validation={{path: {sci}}}",
               "--set", f"stages.1.datasets=[{{path: {sci}}}]", "--set", f"stages.2.datasets=[{{path: {sci}}}]",
               "--set", "stages.1.train.length_buckets=2",
               "--set", "eval_max_users=12", "--set", f"run.storage_path={tmp_path}", "--set", "run.name=r"])
    assert rc == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    pre, ft1, ft2 = summary["stages"]
    assert pre["datasets"] == [demo] and pre["validation"] == sci and ft2["final_step"] == 3
    out = capsys.readouterr().out
    assert f"initialised from {ft1['best_checkpoint']}" in out
    m1 = load_file(str(Path(ft1["best_checkpoint"]) / "model.safetensors"))
    m2 = load_file(str(Path(ft2["best_checkpoint"]) / "model.safetensors"))
    assert torch.equal(m1["item_matrix"], m2["item_matrix"])  # frozen across stage 2
    assert not torch.equal(m1["encoder.embeddings.word_embeddings.weight"], m2["encoder.embeddings.word_embeddings.weight"])
    test = summary["test"]
    assert len(test) == 2 and "mostpop" in test  # the checkpoint (named after its directory) and the baseline
    for r in test.values():
        assert r["n_rows"] == 12 and r["metrics"]["ndcg@10/opt"] >= r["metrics"]["ndcg@10/pes"]
    meta = json.loads((Path(ft2["best_checkpoint"]) / "config.json").read_text())
    assert meta["model_name"] == "recformer" and meta["model"]["objective"] == "finetune"
    assert meta["model"]["item_refresh_every"] == 0


def test_two_worker_finetuning_gathers_the_item_matrix(ray_session, scientific_dataset, tmp_path):
    """DDP on 2 Ray Train workers: each encodes half the catalog and they all-gather I; the checkpoint's I equals
    a single-process encoding of the checkpoint's own weights (stage 1 re-encodes before validating)."""
    from seqrec.models.registry import load_model
    from seqrec.train.staged_loop import load_staged_config, run_staged

    sci = str(scientific_dataset.path)
    cfg = load_staged_config("recformer_tiny", {
        "stages.0.enabled": False, "stages.2.enabled": False, "stages.1.datasets": [{"path": sci}],
        "stages.1.train.steps": 3, "stages.1.train.eval_every": 3, "stages.1.train.batch_size": 4,
        "scaling.num_workers": 2, "run.storage_path": str(tmp_path), "run.name": "ddp", "run.test": False})
    summary = run_staged(cfg)
    (stage,) = summary["stages"]
    assert stage["final_step"] == 3
    model, _ = load_model(stage["best_checkpoint"], dataset=scientific_dataset)
    assert model.item_matrix_is_current()
    stored = model.item_matrix.clone()
    model.refresh_item_matrix()
    assert torch.allclose(stored, model.item_matrix, atol=1e-5)
