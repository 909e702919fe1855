"""Transformer pieces shared by the ID models (SASRec, Bert4Rec): attention masks from segment ids and a block.

Segment ids drive every mask: 0 = padding, k >= 1 = the k-th user sequence packed into the row. A query may
only attend to keys of its own segment (block-diagonal), plus causality for SASRec. Padding positions see
each other (segment 0 == 0), so no softmax row is empty (no NaN) and real items never see padding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention_mask(segments: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, L, L) bool, True = may attend. segments: (B, L) int."""
    mask = segments[:, :, None] == segments[:, None, :]  # (B, L, L) block-diagonal
    if causal:
        length = segments.shape[1]
        mask = mask & torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    return mask[:, None]


def keep_recent(history: torch.Tensor, lengths: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-aligned (B, W) histories cut to their most recent `keep` items (still left-aligned)."""
    if history.shape[1] <= keep:
        return history, lengths
    shift = (lengths - keep).clamp(min=0)  # (B,)
    idx = torch.arange(keep, device=history.device)[None, :] + shift[:, None]  # (B, keep)
    return history.gather(1, idx), lengths.clamp(max=keep)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D), mask (B, 1, Lq, L). `queries` (B, Lq, D): attend from these rows only (keys and values
        still come from all of x) -> (B, Lq, D); None: every position queries -> (B, L, D)."""
        b, length, dim = x.shape
        dh = dim // self.heads
        if queries is None:
            q, k, v = self.qkv(x).view(b, length, 3, self.heads, dh).permute(2, 0, 3, 1, 4)  # 3x (B, H, L, Dh)
        else:  # the same fused weight, split: Q for the query rows, K and V for every position
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(queries, w[:dim], bias[:dim]).view(b, -1, self.heads, dh).transpose(1, 2)  # (B, H, Lq, Dh)
            k, v = F.linear(x, w[dim:], bias[dim:]).view(b, length, 2, self.heads, dh).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, H, Lq, Dh)
        return self.proj(y.transpose(1, 2).reshape(b, q.shape[2], dim))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (stable without warm-up tricks); GELU feed-forward."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, attn_dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); with `query` (B,) position indices, only those rows' outputs -> (B, 1, D)."""
        if query is None:
            x = x + self.drop(self.attn(self.ln1(x), mask))
            return x + self.drop(self.ff(self.ln2(x)))
        rows = torch.arange(x.shape[0], device=x.device)
        h = self.ln1(x)  # (B, L, D): keys and values need every position
        xq = x[rows, query][:, None]  # (B, 1, D)
        mask_q = mask[rows, 0, query][:, None, None, :]  # (B, 1, 1, L): the query rows of the mask
        xq = xq + self.drop(self.attn(h, mask_q, queries=h[rows, query][:, None]))
        return xq + self.drop(self.ff(self.ln2(xq)))  # (B, 1, D)


def run_blocks(blocks: nn.ModuleList, ln_f: nn.LayerNorm, x: torch.Tensor, mask: torch.Tensor,
               query: torch.Tensor | None = None) -> torch.Tensor:
    """The block stack and final norm over embedded inputs x (B, L, D) -> (B, L, D).

    `query` (B,): the one position per row whose output is wanted (inference: the mask token / last item).
    The last block then computes attention, feed-forward and norm for that row alone -> (B, D); the result
    is the same as indexing the full output (the other rows feed it only as keys and values), at about
    1/L of that block's work.
    """
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        x = block(x, mask, query if i == last else None)
    if query is not None and last < 0:  # no blocks: pick the rows directly
        x = x[torch.arange(x.shape[0], device=x.device), query][:, None]
    x = ln_f(x)
    return x if query is None else x[:, 0]


class Encoder(nn.Module):
    """Item + learned position embeddings -> blocks -> final LayerNorm. Token 0 is padding."""

    def __init__(self, n_tokens: int, n_positions: int, dim: int, heads: int, hidden: int, layers: int,
                 dropout: float, attn_dropout: float, init_std: float):
        super().__init__()
        self.item_emb = nn.Embedding(n_tokens, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(n_positions, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, dropout, attn_dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.apply(lambda m: _init(m, init_std))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                query: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D); with `query` (B,) positions, only those rows -> (B, D) (see run_blocks)."""
        x = self.drop(self.item_emb(tokens) + self.pos_emb(positions))  # (B, L, D)
        return run_blocks(self.blocks, self.ln_f, x, mask, query)


def _init(module: nn.Module, std: float) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
