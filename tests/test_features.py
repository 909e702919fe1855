"""Frozen encoder feature cache: encoded once on Ray Data, reused, invalidated by text changes."""
import torch

from seqrec.features.cache import FeatureCache, pooled
from seqrec.features.encoder import FrozenTextEncoder


def test_cache_reuse_and_invalidation(tmp_path, ray_session):
    texts = [f"Title: Item {i} Category: Tools > Drills Brand: B{i % 3} Price: Unknown" for i in range(12)]
    cache = FeatureCache(tmp_path, "minilm", max_tokens=32)
    first = cache.ensure(texts, batch_size=8, use_ray=True)
    assert first.encoded == 12
    again = cache.ensure(texts, use_ray=True)
    assert again.encoded == 0 and again.reused == 12
    changed = list(texts)
    changed[3] = "Title: Something else entirely Category: Lab Brand: Z Price: $3.00"
    third = cache.ensure(changed, use_ray=True)
    assert third.encoded == 1  # only the changed item is re-encoded
    feats = cache.load(changed)
    assert feats.tokens.shape[0] == 12 and feats.tokens.shape[2] == 384
    assert feats.mask.any(1).all()
    # cached features equal a fresh in-process encoding (up to float16 storage)
    enc = FrozenTextEncoder.load("minilm", max_tokens=32)
    tokens, mask = enc.encode(changed[:2])
    n = int(mask[0].sum())
    assert torch.allclose(feats.tokens[0, :n].float(), tokens[0, :n], atol=2e-2)
    emb = pooled(feats)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(12), atol=1e-4)
