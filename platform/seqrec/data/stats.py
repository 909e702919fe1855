"""`seqrec data stats`: what a prepared dataset contains, in the figures papers report."""
from __future__ import annotations

from collections import Counter

import numpy as np

from seqrec.data.dataset import PreparedDataset


def dataset_stats(dataset: PreparedDataset) -> dict:
    seqs = dataset.full_sequences()
    lengths = np.array([len(s) for s in seqs])
    n_inter = int(lengths.sum())
    # duplicate rate: interactions whose item already occurred earlier in the same user's sequence
    repeats = sum(len(s) - len(np.unique(s)) for s in seqs)
    consecutive = sum(int((s[1:] == s[:-1]).sum()) for s in seqs if len(s) > 1)
    users_with_repeat = sum(len(np.unique(s)) < len(s) for s in seqs)
    test = dataset.eval_rows("test")
    last_repeat = np.mean([len(h) > 0 and h[-1] == t for h, t in zip(test.histories, test.targets)]) if len(test) else 0.0
    in_history = np.mean([t in set(h.tolist()) for h, t in zip(test.histories, test.targets)]) if len(test) else 0.0
    train_counts = dataset.train_item_counts()
    texts = dataset.item_texts()
    return {
        "name": dataset.name,
        "source": dataset.meta.get("source"),
        "users": dataset.n_users,
        "items": dataset.n_items,
        "interactions": n_inter,
        "density": n_inter / max(1, dataset.n_users * dataset.n_items),
        "length": {
            "min": int(lengths.min()),
            "p25": float(np.percentile(lengths, 25)),
            "median": float(np.median(lengths)),
            "mean": float(lengths.mean()),
            "p75": float(np.percentile(lengths, 75)),
            "p90": float(np.percentile(lengths, 90)),
            "max": int(lengths.max()),
        },
        "duplicate_rate": repeats / max(1, n_inter),
        "consecutive_repeat_rate": consecutive / max(1, n_inter - len(seqs)),
        "users_with_repeated_item": int(users_with_repeat),
        "test_last_item_repeat_rate": float(last_repeat),
        "test_target_in_history_rate": float(in_history),
        "split_rows": {name: int(dataset.split(name).num_rows) for name in ("train", "valid", "test")},
        "items_never_in_train": int((train_counts == 0).sum()),
        # items whose text equals another item's text: they tie under any text-only model
        "items_sharing_text_with_another": int(sum(c for c in Counter(texts).values() if c > 1)),
    }


def format_stats(stats: dict) -> str:
    lines = []
    for key, value in stats.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4f}"
        lines.append(f"{key:34s} {value}")
    return "\n".join(lines)
