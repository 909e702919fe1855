"""Perceiver resampler (FLARE 3.3, after Flamingo's): a variable number of frozen-encoder token embeddings in,
one fixed-size vector per item out.

    tokens (M, T, Din) + modality type embedding  --in-proj-->  (M, T, P)
    learned latents (K, P) cross-attend to [tokens ; latents]     (M, K, P)
    `layers` self-attention blocks over the latents               (M, K, P)
    mean over latents, LayerNorm, linear to the model dim         (M, D)

Keys include the latents themselves (as in Flamingo), so a row whose tokens are all masked still has something
to attend to: no empty softmax, no NaN. Modality types: 0 = item text T, 1 = critique S (FLARE 3.4).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqrec.models.layers import Block

TYPE_TEXT = 0
TYPE_CRITIQUE = 1


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"perceiver dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout

    def forward(self, latents: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """latents (M, K, P) queries; keys (M, S, P); key_mask (M, S) bool, True = may attend."""
        m, k, p = latents.shape
        s = keys.shape[1]
        dh = p // self.heads
        q = self.q(latents).view(m, k, self.heads, dh).transpose(1, 2)  # (M, H, K, Dh)
        kv = self.kv(keys).view(m, s, 2, self.heads, dh).permute(2, 0, 3, 1, 4)  # 2x (M, H, S, Dh)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=key_mask[:, None, None, :],
                                           dropout_p=self.attn_dropout if self.training else 0.0)  # (M, H, K, Dh)
        return self.proj(y.transpose(1, 2).reshape(m, k, p))


class PerceiverResampler(nn.Module):
    def __init__(self, in_dim: int, dim: int, out_dim: int, n_latents: int, layers: int, heads: int,
                 dropout: float, attn_dropout: float, n_types: int = 2, init_std: float = 0.02):
        super().__init__()
        if n_latents < 1:
            raise ValueError("perceiver_latents must be >= 1")
        self.in_proj = nn.Linear(in_dim, dim)
        self.type_emb = nn.Embedding(n_types, dim)
        self.latents = nn.Parameter(torch.randn(n_latents, dim) * init_std)
        self.ln_keys = nn.LayerNorm(dim)
        self.ln_lat = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads, attn_dropout)
        self.ln_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, 4 * dim, dropout, attn_dropout) for _ in range(layers))
        self.ln_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)
        self.drop = nn.Dropout(dropout)
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=init_std)
                if isinstance(mod, nn.Linear) and mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """tokens (M, T, Din) any float dtype; mask (M, T) bool; types (M, T) long -> (M, out_dim)."""
        m = tokens.shape[0]
        x = self.in_proj(tokens.to(self.in_proj.weight.dtype)) + self.type_emb(types)  # (M, T, P)
        lat = self.latents.expand(m, -1, -1)  # (M, K, P)
        lat_n = self.ln_lat(lat)
        keys = torch.cat([self.ln_keys(x), lat_n], dim=1)  # (M, T + K, P)
        key_mask = torch.cat([mask, torch.ones(m, lat.shape[1], dtype=torch.bool, device=mask.device)], dim=1)
        lat = lat + self.drop(self.cross(lat_n, keys, key_mask))
        lat = lat + self.drop(self.ff(self.ln_ff(lat)))
        for block in self.blocks:
            lat = block(lat, None)  # latents see each other freely
        return self.out(self.ln_out(lat).mean(dim=1))  # (M, out_dim)
