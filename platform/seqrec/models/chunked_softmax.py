"""Full-softmax cross-entropy over the whole item table, computed in chunks of items.

Why: a plain `F.cross_entropy(hidden @ items.T, target)` materialises an (N positions, V items) logit matrix
and its gradient; with V = 400k items and a few thousand positions that is many GB. Here the forward pass
streams over item chunks keeping a running log-sum-exp, and the backward pass recomputes each chunk's
logits instead of storing them, so peak extra memory is (N, chunk) regardless of V. The result is the exact
full softmax (no sampling), identical to the plain computation up to float rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    logits = hidden @ weight[lo:hi].t()  # (N, c)
    if bias is not None:
        logits = logits + bias[lo:hi]
    return logits.to(_acc_dtype(hidden))  # accumulate the normaliser in >= fp32 even under bf16 autocast


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class _ChunkedSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_items: int):
        n = hidden.shape[0]
        acc = _acc_dtype(hidden)
        lse = torch.full((n,), float("-inf"), device=hidden.device, dtype=acc)  # (N,)
        for lo in range(0, weight.shape[0], chunk_items):
            logits = _chunk_logits(hidden, weight, bias, lo, lo + chunk_items)  # (N, c)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        target_logit = (hidden * weight[targets]).sum(-1).to(acc)  # (N,)
        if bias is not None:
            target_logit = target_logit + bias[targets].to(acc)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_items = chunk_items
        return lse - target_logit  # (N,) per-row NLL

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk_items
        acc = _acc_dtype(hidden)
        g = grad_out.to(acc)[:, None]  # (N, 1)
        grad_h = torch.zeros(hidden.shape, device=hidden.device, dtype=acc)
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(weight.shape[0], device=weight.device, dtype=acc) if bias is not None and ctx.needs_input_grad[2] else None
        h32 = hidden.to(acc)
        for lo in range(0, weight.shape[0], chunk):
            hi = min(lo + chunk, weight.shape[0])
            # d loss / d logits = softmax - onehot; the onehot part is added once below
            p = torch.exp(_chunk_logits(hidden, weight, bias, lo, hi) - lse[:, None]) * g  # (N, c)
            grad_h += p @ weight[lo:hi].to(acc)
            if grad_w is not None:
                grad_w[lo:hi] = p.t() @ h32
            if grad_b is not None:
                grad_b[lo:hi] = p.sum(0)
        grad_h -= g * weight[targets].to(acc)
        if grad_w is not None:
            grad_w.index_add_(0, targets, -g * h32)
        if grad_b is not None:
            grad_b.index_add_(0, targets, -g[:, 0])
        return (
            grad_h.to(hidden.dtype),
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_items: int = 16384,
    max_logit_elems: int = 2**24,
) -> torch.Tensor:
    """Mean NLL of `targets` under softmax(hidden @ weight.T + bias) over ALL rows of `weight`.

    hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) in 0..V-1.
    When N * V <= max_logit_elems the plain computation is used (it is faster: no recomputation);
    otherwise item chunks are sized so one (N, chunk) block stays near max_logit_elems.
    """
    n, v = hidden.shape[0], weight.shape[0]
    if n == 0:
        return hidden.sum() * 0.0
    if n * v <= max_logit_elems:
        logits = hidden @ weight.t()  # (N, V)
        if bias is not None:
            logits = logits + bias
        return F.cross_entropy(logits.to(_acc_dtype(logits)), targets)
    chunk = max(1, min(chunk_items, max_logit_elems // n))
    return _ChunkedSoftmaxCE.apply(hidden, weight, bias, targets, chunk).mean()


def chunked_scores(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) scores for inference; the caller (the evaluator) already bounds B so that (B, V) fits memory."""
    scores = hidden @ weight.t()
    if bias is not None:
        scores = scores + bias
    return scores
