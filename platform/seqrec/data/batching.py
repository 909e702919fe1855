"""Turning item-index histories into the tensors every model's `score_all` and `loss` read.

The batch is a plain dict of tensors, the same on Ray Data, Ray Train, evaluation and serving:

    history  (B, L) int64  item indices, left-aligned (oldest first), padded with PAD = -1
    lengths  (B,)   int64  number of real items per row (>= 1 unless the history is empty)
    target   (B,)   int64  target item index (evaluation / training only)
    user_idx (B,)   int64  user index (unused by sequence models, kept for bookkeeping)

Histories longer than `max_len` keep their most recent `max_len` items.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

PAD = -1


def pad_histories(histories: Sequence[np.ndarray], max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) left-aligned int64 array padded with PAD, and the (B,) lengths after truncation."""
    if max_len is not None:
        histories = [np.asarray(h)[-max_len:] if max_len > 0 else np.asarray(h)[:0] for h in histories]
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    width = max(int(lengths.max()) if len(lengths) else 0, 1)
    out = np.full((len(histories), width), PAD, dtype=np.int64)
    for row, h in enumerate(histories):
        out[row, : len(h)] = h
    return out, lengths


def make_batch(
    histories: Sequence[np.ndarray],
    targets: np.ndarray | None = None,
    user_idx: np.ndarray | None = None,
    max_len: int | None = None,
) -> dict[str, torch.Tensor]:
    history, lengths = pad_histories(histories, max_len)
    batch = {"history": torch.from_numpy(history), "lengths": torch.from_numpy(lengths)}
    if targets is not None:
        batch["target"] = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if user_idx is not None:
        batch["user_idx"] = torch.as_tensor(np.asarray(user_idx), dtype=torch.long)
    return batch


def last_items(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) the most recent history item of each row (PAD where the history is empty)."""
    lengths = batch["lengths"]
    idx = (lengths - 1).clamp(min=0)
    last = batch["history"].gather(1, idx[:, None]).squeeze(1)
    return torch.where(lengths > 0, last, torch.full_like(last, PAD))
