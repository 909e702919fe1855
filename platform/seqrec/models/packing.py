"""Sequence packing (FLARE 4.2): several user sequences share one fixed-length training example.

Each example row holds segments; every position carries
    items     (E, P) int64  0-based item index, PAD = -1 outside segments
    targets   (E, P) int64  next item for causal models (PAD where there is none / not used)
    positions (E, P) int64  position inside its own segment, restarting at 0 for each sequence
    segments  (E, P) int64  1, 2, ... per packed sequence, 0 = padding
Models build a block-diagonal attention mask from `segments` (see layers.attention_mask), so a sequence never
attends to its neighbours and no compute is spent on padding beyond the few leftover slots per row.
Segments are assigned to rows by best-fit decreasing, so rows come out nearly full.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

PAD = -1


def split_windows(seqs: Sequence[np.ndarray], max_seq_len: int, causal: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Training segments (inputs, next-item targets), at most max_seq_len inputs each.

    causal=True: input s[:-1], target s[1:] (sequences of one item are dropped: no target);
    causal=False: input s, target unused (Bert4Rec masks inside the model).
    Long sequences become several windows, cut from the most recent end so the newest window is full.
    """
    inputs, targets = [], []
    for s in seqs:
        s = np.asarray(s, dtype=np.int64)
        if causal:
            if len(s) < 2:
                continue
            inp, tgt = s[:-1], s[1:]
        else:
            if len(s) < 1:
                continue
            inp, tgt = s, np.full(len(s), PAD, dtype=np.int64)
        for hi in range(len(inp), 0, -max_seq_len):
            lo = max(0, hi - max_seq_len)
            inputs.append(inp[lo:hi])
            targets.append(tgt[lo:hi])
    return inputs, targets


def best_fit_bins(lengths: np.ndarray, capacity: int, rng: np.random.Generator) -> list[list[int]]:
    """Assign segment indices to rows of `capacity` slots: longest first, each into the fullest row it fits."""
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"segment of length {lengths.max()} does not fit pack length {capacity}")
    order = rng.permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]  # decreasing length, random among equals
    free_to_bins: list[list[int]] = [[] for _ in range(capacity + 1)]  # remaining capacity -> open rows
    bins: list[list[int]] = []
    free: list[int] = []
    for seg in order:
        need = int(lengths[seg])
        for cap in range(need, capacity + 1):  # smallest remaining capacity that still fits
            if free_to_bins[cap]:
                b = free_to_bins[cap].pop()
                break
        else:
            b = len(bins)
            bins.append([])
            free.append(capacity)
        bins[b].append(int(seg))
        free[b] -= need
        free_to_bins[free[b]].append(b)
    return bins


@dataclass
class PackedExamples:
    items: np.ndarray
    targets: np.ndarray
    positions: np.ndarray
    segments: np.ndarray

    def __len__(self) -> int:
        return self.items.shape[0]

    @property
    def padding_fraction(self) -> float:
        return float((self.segments == 0).mean()) if self.segments.size else 0.0

    def batch(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        return {
            "items": torch.from_numpy(self.items[index]),
            "targets": torch.from_numpy(self.targets[index]),
            "positions": torch.from_numpy(self.positions[index]),
            "segments": torch.from_numpy(self.segments[index]),
        }


def build_rows(inputs: list[np.ndarray], targets: list[np.ndarray], rows: list[list[int]], width: int,
               rng: np.random.Generator | None = None) -> PackedExamples:
    n = len(rows)
    items = np.full((n, width), PAD, dtype=np.int64)
    tgts = np.full((n, width), PAD, dtype=np.int64)
    pos = np.zeros((n, width), dtype=np.int64)
    seg = np.zeros((n, width), dtype=np.int64)
    for r, members in enumerate(rows):
        if rng is not None:
            members = [members[i] for i in rng.permutation(len(members))]
        off = 0
        for k, s in enumerate(members, start=1):
            m = len(inputs[s])
            items[r, off : off + m] = inputs[s]
            tgts[r, off : off + m] = targets[s]
            pos[r, off : off + m] = np.arange(m)
            seg[r, off : off + m] = k
            off += m
    return PackedExamples(items, tgts, pos, seg)


def pack_sequences(seqs: Sequence[np.ndarray], pack_len: int, max_seq_len: int, causal: bool,
                   rng: np.random.Generator) -> PackedExamples:
    """Pack all training segments of `seqs` into rows of `pack_len` slots, rows in random order."""
    inputs, targets = split_windows(seqs, max_seq_len, causal)
    lengths = np.fromiter((len(x) for x in inputs), dtype=np.int64, count=len(inputs))
    rows = best_fit_bins(lengths, pack_len, rng)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return build_rows(inputs, targets, rows, pack_len, rng)


def pad_sequences(seqs: Sequence[np.ndarray], max_seq_len: int, causal: bool, rng: np.random.Generator,
                  width: int | None = None) -> PackedExamples:
    """The unpacked baseline: one segment per row, padded to `width` (default max_seq_len)."""
    inputs, targets = split_windows(seqs, max_seq_len, causal)
    rows = [[i] for i in rng.permutation(len(inputs))]
    return build_rows(inputs, targets, rows, width or max_seq_len)


def padding_stats(seqs: Sequence[np.ndarray], pack_len: int, max_seq_len: int, causal: bool,
                  batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Padding fraction of: fixed-length padding to max_seq_len, per-batch dynamic padding, and packing."""
    rng = np.random.default_rng(seed)
    inputs, _ = split_windows(seqs, max_seq_len, causal)
    lengths = np.array([len(x) for x in inputs], dtype=np.int64)
    real = lengths.sum()
    fixed = 1.0 - real / (len(lengths) * max_seq_len)
    perm = rng.permutation(len(lengths))
    dyn_slots = sum(int(lengths[perm[i : i + batch_size]].max()) * len(perm[i : i + batch_size])
                    for i in range(0, len(perm), batch_size))
    packed = pack_sequences(seqs, pack_len, max_seq_len, causal, rng)
    return {
        "segments": int(len(lengths)),
        "tokens": int(real),
        "padding_fixed": float(fixed),
        "padding_dynamic_batch": float(1.0 - real / max(dyn_slots, 1)),
        "padding_packed": packed.padding_fraction,
        "packed_rows": len(packed),
        "unpacked_rows": int(len(lengths)),
    }


def iterate_batches(packed: PackedExamples, batch_size: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of consecutive packed rows (rows are already shuffled), from batch number `start`;
    the last partial batch is dropped so every step has the same shape on every worker."""
    n_batches = len(packed) // batch_size
    for b in range(start, n_batches):
        yield packed.batch(np.arange(b * batch_size, (b + 1) * batch_size))
