"""Flare T+ID: Perceiver shapes and masks, the margin InfoNCE against a hand computation, critique/masking rules,
feature-cache invalidation, cold start, checkpoint round trip, and a tiny Ray Train run on the demo dataset."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seqrec.data.batching import make_batch
from seqrec.models.flare import Flare, FlareConfig, info_nce_margin, load_flare_features
from seqrec.models.packing import pack_sequences
from seqrec.models.perceiver import TYPE_CRITIQUE, TYPE_TEXT, PerceiverResampler

TINY = dict(dim=16, layers=1, heads=2, hidden=32, dropout=0.0, attn_dropout=0.0, perceiver_dim=16, perceiver_heads=2,
            perceiver_layers=1, perceiver_latents=3, max_text_tokens=32, id_dropout=0.0, max_len=20)


@pytest.fixture(scope="module")
def demo_features(demo_dataset, tmp_path_factory):
    """The demo catalog's features in a private cache (in-process encoder: no Ray needed)."""
    from seqrec.features.cache import dataset_features

    cache = tmp_path_factory.mktemp("flare_cache")
    return cache, dataset_features(demo_dataset, "minilm", 32, cache_dir=cache, use_ray=False)


def _model(demo_dataset, demo_features, **kw) -> Flare:
    torch.manual_seed(0)
    model = Flare(FlareConfig(**{**TINY, **kw}), demo_dataset.n_items)
    load_flare_features(model, demo_dataset, cache_dir=demo_features[0], use_ray=False)
    return model


# ----------------------------------------------------------------------------------------- Perceiver
def test_cross_attention_equals_projected_keys_and_values():
    """The resampler's cross-attention never projects the keys (see CrossAttention): it must equal the textbook
    form softmax(q W_k x / sqrt(Dh)) W_v x over [tokens ; latents] with the same weights, with a key mask (one
    row with no visible token), and with attention dropout (same seed -> same dropped weights)."""
    from seqrec.models.perceiver import CrossAttention

    torch.manual_seed(0)
    att = CrossAttention(dim=12, heads=3, attn_dropout=0.3)
    for layer in (att.q, att.kv, att.proj):
        torch.nn.init.normal_(layer.bias)  # non-zero biases: b_k and b_v terms are exercised
    lat, keys = torch.randn(4, 2, 12), torch.randn(4, 9, 12)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :8] = False
    mask[3, :] = False  # only the latents to attend to

    def projected(training: bool) -> torch.Tensor:
        m, k, p = lat.shape
        q = att.q(lat).view(m, k, 3, 4).transpose(1, 2)  # (M, H, K, Dh)
        full = torch.cat([keys, lat], 1)  # (M, S + K, P): the latents are keys too
        full_mask = torch.cat([mask, torch.ones(m, k, dtype=torch.bool)], 1)
        kv = att.kv(full).view(m, 9 + k, 2, 3, 4).permute(2, 0, 3, 1, 4)  # 2 x (M, H, S + K, Dh)
        scores = (q @ kv[0].transpose(-1, -2)) / 2.0  # sqrt(Dh) = 2
        a = scores.masked_fill(~full_mask[:, None, None, :], float("-inf")).softmax(-1)
        if training:
            a = torch.nn.functional.dropout(a, 0.3)
        return att.proj((a @ kv[1]).transpose(1, 2).reshape(m, k, p))

    att.eval()
    assert torch.allclose(att(lat, keys, mask), projected(False), atol=1e-5)
    att.train()
    torch.manual_seed(5)
    ours = att(lat, keys, mask)
    torch.manual_seed(5)
    assert torch.allclose(ours, projected(True), atol=1e-5)


def test_perceiver_shapes_and_masks():
    torch.manual_seed(0)
    p = PerceiverResampler(in_dim=12, dim=8, out_dim=5, n_latents=3, layers=2, heads=2, dropout=0.0, attn_dropout=0.0).eval()
    tokens = torch.randn(4, 7, 12)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, :] = False  # no tokens at all: latents still attend to themselves
    types = torch.full((4, 7), TYPE_TEXT)
    out = p(tokens, mask, types)
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    # masked-out tokens have no influence; real ones do
    changed = tokens.clone()
    changed[1, 3:] = 100.0
    assert torch.allclose(p(changed, mask, types)[1], out[1], atol=1e-6)
    scale = float(out.abs().max())  # tolerances relative to the output's size (it starts on the ID scale)
    changed[1, 0] += 5.0
    assert (p(changed, mask, types)[1] - out[1]).abs().max() > 1e-3 * scale
    # variable length = the same as the trimmed input (padding is inert), and the modality type matters
    assert torch.allclose(p(tokens[1:2, :3], mask[1:2, :3], types[1:2, :3]), out[1:2], atol=1e-5 * scale)
    assert (p(tokens, mask, torch.full((4, 7), TYPE_CRITIQUE))[0] - out[0]).abs().max() > 1e-3 * scale
    # rows are independent (no leakage across the batch)
    assert torch.allclose(p(tokens[:1], mask[:1], types[:1]), out[:1], atol=1e-5 * scale)


def test_perceiver_output_starts_on_the_id_embedding_scale():
    """t is added to ID embeddings drawn with std init_std (norm ~ init_std * sqrt(D)); at initialisation the
    Perceiver's output must be of that size, not sqrt(P) times larger (the ID would be drowned in e + t)."""
    torch.manual_seed(0)
    dim, init_std = 192, 0.02
    p = PerceiverResampler(in_dim=384, dim=dim, out_dim=dim, n_latents=2, layers=1, heads=8, dropout=0.0,
                           attn_dropout=0.0, init_std=init_std).eval()
    t = p(torch.randn(64, 20, 384), torch.ones(64, 20, dtype=torch.bool), torch.full((64, 20), TYPE_TEXT))
    id_norm = init_std * dim**0.5  # 0.28
    assert 0.5 * id_norm < float(t.norm(dim=-1).median()) < 2.0 * id_norm
    assert "out_norm" not in p.state_dict()  # free norm: nothing extra saved
    # norm_value: a constant norm, a buffer (saved with the weights) and not a trained parameter
    p = PerceiverResampler(in_dim=384, dim=dim, out_dim=dim, n_latents=2, layers=1, heads=8, dropout=0.0,
                           attn_dropout=0.0, init_std=init_std, norm_value=0.4).eval()
    t = p(torch.randn(4, 7, 384), torch.ones(4, 7, dtype=torch.bool), torch.full((4, 7), TYPE_TEXT))
    assert torch.allclose(t.norm(dim=-1), torch.full((4,), 0.4), rtol=1e-4)
    assert "out_norm" in p.state_dict() and "out_norm" not in dict(p.named_parameters())
    with pytest.raises(ValueError):
        PerceiverResampler(384, dim, dim, 2, 1, 8, 0.0, 0.0, norm_value=0.0)


# ----------------------------------------------------------------------------------------- contrastive
def test_info_nce_margin_matches_hand_computation():
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    tau, m = 0.3, 0.2
    en = [[x / math.hypot(*v) for x in v] for v in e.tolist()]
    tn = [[x / math.hypot(*v) for x in v] for v in t.tolist()]

    def cos(a, b):
        return a[0] * b[0] + a[1] * b[1]

    def direction(q, k):  # -mean_i log softmax_i over j of (cos(q_i, k_j) - m [i == j]) / tau
        total = 0.0
        for i in range(3):
            logits = [(cos(q[i], k[j]) - (m if i == j else 0.0)) / tau for j in range(3)]
            total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
        return total / 3

    expected = 0.5 * (direction(en, tn) + direction(tn, en))
    assert info_nce_margin(e, t, tau, m).item() == pytest.approx(expected, rel=1e-6)
    # the margin makes the loss larger (the positive must win by m)
    assert info_nce_margin(e, t, tau, m).item() > info_nce_margin(e, t, tau, 0.0).item()


def test_info_nce_margin_row_weights_match_hand_computation():
    """Weights scale each item's two row losses; the mean stays over U (unit weights: the plain loss)."""
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    tau, w, m = 0.3, [1.0, 0.5, 0.0], 0.2
    en = [[x / math.hypot(*v) for x in v] for v in e.tolist()]
    tn = [[x / math.hypot(*v) for x in v] for v in t.tolist()]

    def row(q, k, i):
        logits = [(q[i][0] * k[j][0] + q[i][1] * k[j][1] - (m if i == j else 0.0)) / tau for j in range(3)]
        return -(logits[i] - math.log(sum(math.exp(x) for x in logits)))

    expected = 0.5 * sum(w[i] * (row(en, tn, i) + row(tn, en, i)) for i in range(3)) / 3
    got = info_nce_margin(e, t, tau, m, torch.tensor(w)).item()
    assert got == pytest.approx(expected, rel=1e-6)
    same = info_nce_margin(e, t, tau, m, torch.ones(3)).item()
    assert same == pytest.approx(info_nce_margin(e, t, tau, m).item(), rel=1e-6)


def test_frequent_item_contrastive_uses_training_counts(demo_dataset, demo_features):
    """frequent_weight applies to items with >= frequent_min_count training occurrences only: with the threshold
    above every count the loss is the plain one; a zero weight for frequent items equals the plain loss with
    those rows left out of the mean's numerator."""
    packed = pack_sequences(demo_dataset.train_sequences(), 64, TINY["max_len"] + 1, False, np.random.default_rng(0))
    batch = packed.batch(np.arange(4))
    counts = torch.as_tensor(demo_dataset.train_item_counts())
    plain = _model(demo_dataset, demo_features)
    assert torch.equal(plain.id_count, counts.float()) and torch.equal(plain.id_seen, counts > 0)
    base = plain.loss_terms(batch, torch.Generator().manual_seed(1))["contrastive"].item()
    never = _model(demo_dataset, demo_features, frequent_weight=0.0, frequent_min_count=int(counts.max()) + 1)
    assert never.loss_terms(batch, torch.Generator().manual_seed(1))["contrastive"].item() == pytest.approx(base, rel=1e-6)
    threshold = int(counts[counts > 0].median())
    model = _model(demo_dataset, demo_features, frequent_weight=0.0, frequent_min_count=threshold)
    got = model.loss_terms(batch, torch.Generator().manual_seed(1))["contrastive"].item()
    uniq = torch.unique(batch["items"][batch["segments"] > 0])
    uniq = uniq[model._has_id(uniq)]
    weight = (counts[uniq] < threshold).float()
    assert 0 < weight.sum() < len(weight)
    with torch.no_grad():
        e = model.encoder.item_emb(uniq + 1)
        model.eval()
        t = model._item_text(uniq)
    # the same loss from the function with explicit weights (eval mode: the Perceiver's dropout is 0 in TINY)
    assert got == pytest.approx(info_nce_margin(e, t, model.config.tau, model.config.margin, weight).item(), rel=1e-5)
    with pytest.raises(ValueError, match="frequent_weight"):
        Flare(FlareConfig(**{**TINY, "frequent_weight": -1.0}), demo_dataset.n_items)


def test_loss_terms_alpha_mix_and_backward(demo_dataset, demo_features):
    model = _model(demo_dataset, demo_features, alpha=0.25)
    packed = pack_sequences(demo_dataset.train_sequences(), 64, model.packed_seq_len, False, np.random.default_rng(0))
    batch = packed.batch(np.arange(4))
    terms = model.loss_terms(batch, torch.Generator().manual_seed(1))
    assert terms["loss"].item() == pytest.approx(0.25 * terms["mlm"].item() + 0.75 * terms["contrastive"].item(), rel=1e-6)
    terms["loss"].backward()
    assert model.perceiver.in_proj.weight.grad is not None and model.perceiver.in_proj.weight.grad.abs().sum() > 0
    off = _model(demo_dataset, demo_features, contrastive=False)
    t2 = off.loss_terms(batch, torch.Generator().manual_seed(1))
    assert "contrastive" not in t2 and t2["loss"].item() == t2["mlm"].item()


# ------------------------------------------------------------------------------------- masking rules
def test_masked_positions_hide_id_and_text(demo_dataset, demo_features):
    """MLM loss must not depend on the text of items that only occur at masked positions (T is masked there),
    but must depend on the text of visible items."""
    model = _model(demo_dataset, demo_features, contrastive=False).train()
    packed = pack_sequences(demo_dataset.train_sequences(), 64, model.packed_seq_len, False, np.random.default_rng(0))
    batch = packed.batch(np.arange(2))
    from seqrec.models.bert4rec import cloze_mask

    masked = cloze_mask(batch["segments"], model.config.mask_prob, model.config.last_only_prob, torch.Generator().manual_seed(3))
    real = batch["segments"] > 0
    items = batch["items"]
    only_masked = sorted(set(items[masked].tolist()) - set(items[real & ~masked].tolist()))
    visible = sorted(set(items[real & ~masked].tolist()))
    assert only_masked and visible
    base = model.loss_terms(batch, torch.Generator().manual_seed(3))["mlm"].item()
    orig = model.item_tokens.clone()
    model.item_tokens[only_masked] = torch.randn_like(model.item_tokens[only_masked].float()).half()
    assert model.loss_terms(batch, torch.Generator().manual_seed(3))["mlm"].item() == pytest.approx(base, abs=1e-6)
    model.item_tokens[visible[:3]] = (10 * torch.randn_like(model.item_tokens[visible[:3]].float())).half()
    assert abs(model.loss_terms(batch, torch.Generator().manual_seed(3))["mlm"].item() - base) > 1e-5
    model.item_tokens = orig


def test_critique_hints_at_masked_positions(demo_dataset, demo_features):
    model = _model(demo_dataset, demo_features, critique_prob=1.0).eval()
    table = model.critiques
    assert table is not None and table.item_prefixes.shape[0] == demo_dataset.n_items
    # the demo tree has depth 3: with min_depth 2 every item has exactly 2 training prefixes
    assert (table.item_prefixes >= 0).sum(1).eq(2).all()
    items = torch.tensor([[0, 1, 2, -1]])
    masked = torch.tensor([[False, True, False, False]])
    hints = model._training_hints(items, masked, torch.Generator().manual_seed(0))
    assert torch.allclose(hints[0, 0], model.text_mask) and torch.allclose(hints[0, 2], model.text_mask)
    cands = [model._critique_text(table.tokens[[c]], table.mask[[c]])[0] for c in table.item_prefixes[1].tolist()]
    assert any(torch.allclose(hints[0, 1], c, atol=1e-5) for c in cands)


def test_score_all_critique_contract(demo_dataset, demo_features):
    from seqrec.features.encoder import FrozenTextEncoder
    from seqrec.models.flare import critique_text, encode_critiques

    model = _model(demo_dataset, demo_features).eval()
    rows = demo_dataset.eval_rows("test")
    batch = make_batch(rows.histories[:3], rows.targets[:3], max_len=model.max_len)
    enc = FrozenTextEncoder.load("minilm", max_tokens=32)
    tok, mask = encode_critiques([critique_text(["Lab Equipment", "Storage"]), None, ""], enc)
    assert tok.shape[:2] == mask.shape and not mask[1].any() and not mask[2].any() and mask[0].any()
    plain = model.score_all(batch)
    crit = model.score_all({**batch, "critique_tokens": tok, "critique_mask": mask})
    assert crit.shape == plain.shape == (3, demo_dataset.n_items)
    assert not torch.allclose(crit[0], plain[0], atol=1e-5)  # the critique changes the query
    assert torch.allclose(crit[1:], plain[1:], atol=1e-5)  # an all-False row = no critique
    with pytest.raises(ValueError):
        model.score_all({**batch, "critique_tokens": tok})


def test_critique_cache_equals_fresh_encoding(demo_dataset, demo_features):
    """Serving's CritiqueCache: the same tokens/mask (up to padding width and float noise) and the same scores as
    encoding the batch afresh; repeats are hits; the LRU keeps at most max_entries texts."""
    from seqrec.features.encoder import FrozenTextEncoder
    from seqrec.models.flare import CritiqueCache, encode_critiques

    model = _model(demo_dataset, demo_features).eval()
    enc = FrozenTextEncoder.load("minilm", max_tokens=32)
    texts = ["something cheaper", None, "a much longer critique: portable lab storage from another brand", "",
             "something cheaper"]
    fresh_tok, fresh_mask = encode_critiques(texts, enc)
    cache = CritiqueCache(max_entries=2)
    for _ in range(2):  # first call fills the cache, the second is served from it
        tok, mask = encode_critiques(texts, enc, cache=cache)
        width = mask.shape[1]
        assert width <= fresh_mask.shape[1] and not fresh_mask[:, width:].any()
        assert torch.equal(mask, fresh_mask[:, :width])
        assert torch.allclose(tok[mask], fresh_tok[:, :width][mask], atol=1e-5)
    assert (cache.misses, cache.hits) == (2, 4)  # 2 distinct texts encoded once; 3 present texts per call
    rows = demo_dataset.eval_rows("test")
    batch = make_batch(rows.histories[:5], max_len=model.max_len)
    a = model.score_all({**batch, "critique_tokens": tok, "critique_mask": mask})
    b = model.score_all({**batch, "critique_tokens": fresh_tok, "critique_mask": fresh_mask})
    assert torch.allclose(a, b, atol=1e-4)
    encode_critiques(["third text"], enc, cache=cache)
    assert len(cache._rows) == 2 and "something cheaper" not in cache._rows  # least recently used went first


def test_cached_critique_hints_give_the_scores_of_critique_tokens(demo_dataset, demo_features):
    """Serving passes each critique's hint vector (the Perceiver output, cached per text) as critique_hint:
    the scores equal score_all on the critique tokens; a repeated text is computed once."""
    from seqrec.features.encoder import FrozenTextEncoder
    from seqrec.models.flare import CritiqueCache, encode_critiques

    model = _model(demo_dataset, demo_features).eval()
    enc = FrozenTextEncoder.load("minilm", max_tokens=32)
    texts = ["something cheaper", "lab storage", "something cheaper"]
    batch = make_batch(demo_dataset.eval_rows("test").histories[:3], max_len=model.max_len)
    tok, mask = encode_critiques(texts, enc)
    expected = model.score_all({**batch, "critique_tokens": tok, "critique_mask": mask})
    cache = CritiqueCache()
    for _ in range(2):
        hint = cache.hints(texts, enc, model)  # (B, D)
        assert hint.shape == (3, model.config.dim) and torch.equal(hint[0], hint[2])
        assert torch.allclose(model.score_all({**batch, "critique_hint": hint}), expected, atol=1e-4)
    assert (cache.misses, cache.hits) == (2, 4) and len(cache._hints) == 2
    with pytest.raises(ValueError, match="critique_hint"):
        model.score_all({**batch, "critique_hint": hint[:, :3]})


# ------------------------------------------------------------------------------ cache and cold start
def test_feature_cache_invalidation_on_text_change(demo_dataset, demo_features, tmp_path):
    """A changed item text is re-encoded (only that one) and reaches the model; train() drops cached tables."""
    import shutil

    from seqrec.data.dataset import PreparedDataset
    from seqrec.features.cache import FeatureCache

    copy = tmp_path / "demo"
    shutil.copytree(demo_dataset.path, copy, ignore=shutil.ignore_patterns("features"))
    shutil.copytree(demo_features[0], copy / "features")
    ds = PreparedDataset.load(copy)
    model = _model(ds, (copy / "features",))
    before = model.item_tokens[5].clone()
    model.eval()
    t_before = model._tables()["text"][5].clone()
    assert model._cache is not None
    model.train()
    assert model._cache is None  # invalidated: weights may change
    import pyarrow.parquet as pq

    items = ds.items.to_pandas()
    items.loc[5, "text"] = "Title: Completely different microscope Category: Optics Brand: Zeiss Price: Unknown"
    pq.write_table(__import__("pyarrow").Table.from_pandas(items, schema=ds.items.schema, preserve_index=False),
                   copy / "items.parquet")
    ds = PreparedDataset.load(copy)
    report = FeatureCache(copy / "features", "minilm", 32).ensure(ds.item_texts(), use_ray=False)
    assert report.encoded == 1 and report.reused == ds.n_items - 1
    load_flare_features(model, ds, use_ray=False)
    assert not torch.equal(model.item_tokens[5, : before.shape[0]], before[: model.item_tokens.shape[1]])
    model.eval()
    assert not torch.allclose(model._tables()["text"][5], t_before)


def test_dataset_features_need_one_text_per_item(demo_dataset, tmp_path):
    from seqrec.features.cache import dataset_features

    with pytest.raises(ValueError, match="texts for"):
        dataset_features(demo_dataset, "minilm", 32, cache_dir=tmp_path / "c", use_ray=False,
                         texts=demo_dataset.item_texts()[:-1])


def test_cold_start_and_add_items(demo_dataset, demo_features):
    from seqrec.features.encoder import FrozenTextEncoder

    model = _model(demo_dataset, demo_features).eval()
    n = demo_dataset.n_items
    trained = torch.ones(n, dtype=torch.bool)
    trained[7] = False  # pretend item 7 never appeared in training
    model.set_trained_ids(trained)
    tables = model._tables()
    seen_norm = model.id_table()[trained].norm(dim=-1).median()
    assert torch.allclose(tables["out"][7], torch.nn.functional.normalize(tables["text"][7], dim=0) * seen_norm, atol=1e-5)
    assert torch.equal(tables["out"][3], model.id_table()[3])
    enc = FrozenTextEncoder.load("minilm", max_tokens=32)
    tok, mask = enc.encode(["Title: Brand new centrifuge Category: Lab Equipment > Storage Brand: Newco Price: $10.00"])
    new = model.add_items(tok, mask)
    assert new == [n] and model.n_items == n + 1
    rows = demo_dataset.eval_rows("test")
    batch = make_batch(rows.histories[:2] + [np.array([n, 3])], None, max_len=model.max_len)
    scores = model.score_all(batch)  # a history containing the new item works; it is rankable at once
    assert scores.shape == (3, n + 1) and torch.isfinite(scores).all()
    # the text prior covers the new item too (its table is pooled from the grown features)
    from seqrec.data.batching import last_items
    from seqrec.features.cache import pooled_tokens

    model.config.text_prior_weight = 1.5
    x = pooled_tokens(model.item_tokens, model.item_token_mask)  # (n + 1, Dt)
    last = last_items(batch)
    assert last[2] == 3 and bool((last >= 0).all())
    assert torch.allclose(model.score_all(batch) - scores, 1.5 * x[last] @ x.T, atol=1e-4)
    model.config.text_prior_weight = 0.0
    with pytest.raises(ValueError):
        model.add_items(tok[:, :, :5], mask)


def test_text_prior_adds_the_last_items_encoder_cosine(demo_dataset, demo_features, tmp_path):
    """text_prior_weight w: scores = the plain scores + w * cos(mean-pooled frozen features of the last history
    item, of every item) = + w * lir_text's scores; settable on a saved checkpoint through load_model's params."""
    from seqrec.eval.baselines import LastItemText
    from seqrec.features.cache import dataset_features, pooled_tokens
    from seqrec.models.registry import load_model, model_config_dict
    from seqrec.train.checkpoint import save_model_files

    model = _model(demo_dataset, demo_features).eval()
    rows = demo_dataset.eval_rows("test")
    batch = make_batch(rows.histories[:6] + [np.zeros(0, dtype=np.int64)], None, max_len=model.max_len)
    plain = model.score_all(batch)
    model.config.text_prior_weight = 2.5  # a scoring setting: the cached tables pick it up without retraining
    prior = model.score_all(batch)
    feats = dataset_features(demo_dataset, "minilm", 32, cache_dir=demo_features[0], use_ray=False)
    x = feats.tokens.float() * feats.mask.unsqueeze(-1)  # hand-pooled: mean over real tokens, unit norm
    x = torch.nn.functional.normalize(x.sum(1) / feats.mask.sum(1, keepdim=True), dim=-1)
    assert torch.allclose(pooled_tokens(feats.tokens, feats.mask, chunk=3), x, atol=1e-6)
    last = [int(h[-1]) if len(h) else None for h in rows.histories[:6]] + [None]
    for i, item in enumerate(last):
        expected = plain[i] + (2.5 * (x @ x[item]) if item is not None else 0.0)  # empty history: no prior
        assert torch.allclose(prior[i], expected, atol=1e-4)
    assert torch.allclose(prior - plain, 2.5 * LastItemText(x).score_all(batch), atol=1e-4)
    model.config.text_prior_weight = 0.0
    save_model_files(model, tmp_path, {"model_name": "flare", "model": model_config_dict(model), "n_items": demo_dataset.n_items})
    data = demo_dataset
    again, _ = load_model(tmp_path, params={"text_prior_weight": 2.5})
    load_flare_features(again, data, cache_dir=demo_features[0], use_ray=False)
    assert torch.allclose(again.score_all(batch), prior, atol=1e-4)
    with pytest.raises(ValueError):
        load_model(tmp_path, params={"no_such_setting": 1})
    with pytest.raises(ValueError, match="text_prior_weight"):
        Flare(FlareConfig(**{**TINY, "text_prior_weight": -1.0}), demo_dataset.n_items)


def test_checkpoint_round_trip_keeps_features_out(demo_dataset, demo_features, tmp_path):
    from safetensors.torch import load_file

    from seqrec.models.registry import load_model, model_config_dict
    from seqrec.train.checkpoint import save_model_files

    model = _model(demo_dataset, demo_features).eval()
    save_model_files(model, tmp_path, {"model_name": "flare", "model": model_config_dict(model), "n_items": demo_dataset.n_items})
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert not any("item_tokens" in k for k in keys) and "id_seen" in keys
    again, meta = load_model(tmp_path)
    assert meta["model"]["text_dim"] == 384
    with pytest.raises(RuntimeError, match="load_flare_features"):
        again.score_all(make_batch([np.array([1, 2])], None))
    load_flare_features(again, demo_dataset, cache_dir=demo_features[0], use_ray=False)
    rows = demo_dataset.eval_rows("valid")
    batch = make_batch(rows.histories[:8], None, max_len=model.max_len)
    assert torch.allclose(model.score_all(batch), again.score_all(batch), atol=1e-5)
    # a checkpoint saved before options were removed (issue #32) holds them at their defaults: it loads as before;
    # one trained with a removed option on is refused
    import json

    meta_path = tmp_path / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["model"].update(Flare.RETIRED_OPTIONS)
    meta_path.write_text(json.dumps(meta))
    old, _ = load_model(tmp_path)
    assert not hasattr(old.config, "output_residual")
    meta["model"]["output_residual"] = True
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="output_residual"):
        load_model(tmp_path)


def test_load_model_keeps_the_checkpoint_trained_ids(demo_dataset, demo_features, tmp_path):
    """Binding a loaded checkpoint to a dataset keeps the checkpoint's trained-ID mask (a refit run trained the
    validation targets too; the dataset's training split does not know that)."""
    import shutil

    from seqrec.data.dataset import PreparedDataset
    from seqrec.models.registry import load_model, model_config_dict
    from seqrec.train.checkpoint import save_model_files

    data = tmp_path / "data"  # the demo dataset reading the module's private feature cache
    shutil.copytree(demo_dataset.path, data, ignore=shutil.ignore_patterns("features", "*+valid"))
    (data / "features").symlink_to(demo_features[0], target_is_directory=True)
    model = _model(demo_dataset, demo_features).eval()
    seen = model.id_seen.clone()
    seen[:5] = ~seen[:5]
    model.set_trained_ids(seen)
    save_model_files(model, tmp_path / "ckpt", {"model_name": "flare", "model": model_config_dict(model),
                                                "n_items": demo_dataset.n_items})
    again, _ = load_model(tmp_path / "ckpt", dataset=PreparedDataset.load(data), use_ray=False)
    assert torch.equal(again.id_seen, seen)
    assert torch.equal(again.id_count, torch.as_tensor(demo_dataset.train_item_counts(), dtype=again.id_count.dtype))
    rows = demo_dataset.eval_rows("valid")
    batch = make_batch(rows.histories[:8], None, max_len=model.max_len)
    assert torch.allclose(model.score_all(batch), again.score_all(batch), atol=1e-5)


def test_bad_inputs_raise(demo_dataset, demo_features):
    model = _model(demo_dataset, demo_features)
    with pytest.raises(ValueError, match="cover"):
        model.attach_item_features(model.item_tokens[:-1], model.item_token_mask[:-1])
    with pytest.raises(ValueError, match="critiques need the text path"):
        Flare(FlareConfig(**{**TINY, "use_text": False, "critique_prob": 0.5}), 10)
    notext = Flare(FlareConfig(**{**TINY, "use_text": False}), demo_dataset.n_items)
    assert not notext.needs_item_features
    load_flare_features(notext, demo_dataset)  # a no-op


# ------------------------------------------------------------------------------------------ end to end
def test_tiny_ray_train_run(ray_session, demo_dataset, tmp_path):
    from seqrec.config import load_config
    from seqrec.models.registry import load_model
    from seqrec.train.config import ExperimentConfig
    from seqrec.train.loop import run_experiment

    params = {**TINY, "critique_prob": 0.3}
    cfg = load_config(ExperimentConfig, "tiny_demo", subdir="train", overrides={
        "data.path": str(demo_dataset.path), "run.storage_path": str(tmp_path / "runs"), "run.name": "flare_tiny",
        "train.threads_per_worker": 1, "train.steps": 6, "train.eval_every": 3, "model.name": "flare",
        "model.params": params})
    summary = run_experiment(cfg)
    assert summary["final_step"] == 6 and "ndcg@10/pes" in summary["test"]
    model, meta = load_model(summary["best_checkpoint"])
    assert meta["model_name"] == "flare" and meta["model"]["critique_prob"] == 0.3
    assert (demo_dataset.path / "features").exists()  # the driver filled the dataset's feature cache


def test_flare_packed_inference_equals_padded(demo_dataset, demo_features, packed_and_padded_scores):
    """Flare packs short histories too (text and the critique hint travel with their slots)."""
    from seqrec.models.layers import QueryPacking

    model = _model(demo_dataset, demo_features).eval()
    rng = np.random.default_rng(1)
    history = [rng.integers(0, demo_dataset.n_items, k) for k in (20, 2, 5, 1, 3, 7) * 3]  # 18 x 21 slots padded
    batch = make_batch(history, max_len=model.max_len)
    batch["critique_hint"] = torch.randn(len(history), model.config.dim)
    assert QueryPacking.plan(batch["lengths"] + 1, 21, batch["lengths"]) is not None
    packed, padded = packed_and_padded_scores(model, batch)
    assert torch.allclose(packed, padded, atol=1e-5)
