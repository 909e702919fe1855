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
    """Multi-head cross-attention of a few latents over many token keys, computed without projecting the keys.

    The standard form projects every key and value, k_s = W_k x_s + b_k and v_s = W_v x_s + b_v: two (P, P)
    matmuls per token, which dominated a Flare training step (~2,200 items x 66 keys per step). With only K (= 2)
    queries per item it is cheaper to move the projections to the query and output side (the "absorbed"
    projections of multi-head latent attention), which is exact algebra, not an approximation:
        score_hs = q_h . (W_k,h x_s + b_k,h) / sqrt(Dh) = (W_k,h^T q_h) . x_s / sqrt(Dh) + q_h . b_k,h / sqrt(Dh)
        out_h    = sum_s a_hs (W_v,h x_s + b_v,h)       = W_v,h (sum_s a_hs x_s) + b_v,h sum_s a_hs
    (sum_s a_hs is 1 without dropout; with attention dropout it is whatever the dropped weights sum to). The cost
    per token falls from 2 P^2 to 2 H K P multiply-adds. The parameters are the same q / kv / proj layers as the
    projected form, so weights and checkpoints are interchangeable; a test checks both forms agree.
    """

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
        """latents (M, K, P) queries; keys (M, S, P) with key_mask (M, S) bool, True = may attend. The latents
        are keys too (after the S token keys, always visible, as in Flamingo), so no row's softmax is empty.
        Scores against the two key sets are computed apart: no (M, S + K, P) concatenation."""
        m, k, p = latents.shape
        h, dh = self.heads, p // self.heads
        w_k, w_v = self.kv.weight[:p].view(h, dh, p), self.kv.weight[p:].view(h, dh, p)  # (H, Dh, P) each
        b_k, b_v = self.kv.bias[:p].view(h, dh), self.kv.bias[p:].view(h, dh)  # (H, Dh)
        q = self.q(latents).view(m, k, h, dh).transpose(1, 2) * dh**-0.5  # (M, H, K, Dh), scaled
        q_in = torch.einsum("mhkd,hdp->mhkp", q, w_k)  # (M, H, K, P): the query in key-input space
        q_bias = (q * b_k[None, :, None]).sum(-1, keepdim=True)  # (M, H, K, 1)
        tok = torch.einsum("mhkp,msp->mhks", q_in, keys).masked_fill(~key_mask[:, None, None, :], float("-inf"))
        lat = torch.einsum("mhkp,mjp->mhkj", q_in, latents)  # (M, H, K, K)
        attn = (torch.cat([tok, lat], -1) + q_bias).softmax(-1)  # (M, H, K, S + K)
        if self.training and self.attn_dropout > 0:
            attn = F.dropout(attn, self.attn_dropout)
        s = keys.shape[1]
        pooled = (torch.einsum("mhks,msp->mhkp", attn[..., :s], keys)
                  + torch.einsum("mhkj,mjp->mhkp", attn[..., s:], latents))  # (M, H, K, P): weighted inputs
        y = torch.einsum("mhkp,hdp->mhkd", pooled, w_v) + attn.sum(-1, keepdim=True) * b_v[None, :, None]
        return self.proj(y.transpose(1, 2).reshape(m, k, p))  # (M, K, P)


class PerceiverResampler(nn.Module):
    def __init__(self, in_dim: int, dim: int, out_dim: int, n_latents: int, layers: int, heads: int,
                 dropout: float, attn_dropout: float, n_types: int = 2, init_std: float = 0.02,
                 norm_value: float | None = None):
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
        # t is added to ID and position embeddings drawn with std init_std (norm ~ init_std * sqrt(D)). The
        # LayerNorm's output has norm ~ sqrt(P), so `out` at std init_std would start t ~ sqrt(P) (14x at P = 192)
        # larger and drown the ID and the position in c = e + t (measured after training: |t| 6.0 vs |e| 0.38).
        # std init_std / sqrt(P) starts t on the ID scale; how far it grows is then learned.
        nn.init.normal_(self.out.weight, std=init_std / dim**0.5)
        # norm_value: every output has this constant norm, t = norm_value * out(...) / |out(...)| (a buffer, not
        # trained), so the text's weight against the ID in e + t is set by hand instead of by the projection's size
        if norm_value is not None and norm_value <= 0:
            raise ValueError("perceiver: norm_value must be > 0")
        self.register_buffer("out_norm", None if norm_value is None else torch.tensor(float(norm_value)))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """tokens (M, T, Din) any float dtype; mask (M, T) bool; types (M, T) long -> (M, out_dim)."""
        m = tokens.shape[0]
        x = self.in_proj(tokens.to(self.in_proj.weight.dtype))  # (M, T, P)
        if types.numel() and bool((types == types.flatten()[0]).all()):  # one modality (the usual call): broadcast
            x = x + self.type_emb.weight[types.flatten()[0]]
        else:
            x = x + self.type_emb(types)
        lat = self.latents.expand(m, -1, -1)  # (M, K, P)
        lat_n = self.ln_lat(lat)
        lat = lat + self.drop(self.cross(lat_n, self.ln_keys(x), mask))  # the latents are keys too
        lat = lat + self.drop(self.ff(self.ln_ff(lat)))
        for block in self.blocks:
            lat = block(lat, None)  # latents see each other freely
        out = self.out(self.ln_out(lat).mean(dim=1))  # (M, out_dim)
        return out if self.out_norm is None else self.out_norm * F.normalize(out, dim=-1)
