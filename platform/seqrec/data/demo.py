"""A synthetic catalog with real sequential structure: the quickstart's default and the tests' fixture.

Structure a model can learn (and MostPop cannot fully exploit):
- a 3-level category tree; each user has a home subtree and drifts between its leaves;
- brands live in top-level categories and users are brand-loyal with some probability;
- every item has a few "follow-up" items (accessories, refills) that are likely to come next;
- item popularity is Zipf-skewed inside each leaf.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from seqrec.data.dataset import SplitOptions, leave_one_out, split_tables, write_prepared
from seqrec.data.text import format_item_text

log = logging.getLogger(__name__)

_TOP = ["Lab Equipment", "Power Tools", "Office Supplies", "Outdoor Gear", "Kitchen", "Electronics"]
_MID = ["Basics", "Professional", "Accessories", "Storage"]
_LEAF = ["Kits", "Spares", "Sets", "Singles"]
_ADJ = ["Compact", "Heavy-Duty", "Precision", "Portable", "Classic", "Ultra", "Eco", "Smart", "Mini", "Pro"]
_NOUN = {
    "Lab Equipment": ["Beaker", "Pipette", "Flask", "Microscope Slide", "Centrifuge Tube", "Lab Timer"],
    "Power Tools": ["Drill", "Sander", "Jigsaw", "Impact Driver", "Grinder", "Saw Blade"],
    "Office Supplies": ["Stapler", "Notebook", "Label Maker", "Desk Organizer", "Pen Set", "Binder"],
    "Outdoor Gear": ["Tent", "Headlamp", "Water Filter", "Sleeping Pad", "Trekking Pole", "Camp Stove"],
    "Kitchen": ["Knife", "Skillet", "Cutting Board", "Measuring Cup", "Thermometer", "Whisk"],
    "Electronics": ["Multimeter", "Soldering Iron", "Cable", "Power Bank", "Breadboard", "Sensor Kit"],
}
_BRAND_SYLLABLES = ["ac", "zo", "ver", "tek", "lum", "nor", "qua", "bri", "dex", "mon", "pyr", "sol"]


@dataclass
class DemoOptions:
    n_users: int = 2000
    n_items: int = 500
    seed: int = 0
    min_len: int = 5
    max_len: int = 30
    p_follow_up: float = 0.45  # next item is a follow-up of the previous one
    p_same_leaf: float = 0.3  # else: stay in the same leaf
    p_brand_loyal: float = 0.5  # when choosing in a leaf, prefer the user's brand
    p_explore: float = 0.05  # jump anywhere (popularity-weighted)
    n_brands: int = 24


def _category_tree(rng: np.random.Generator, n_top: int) -> list[tuple[str, str, str]]:
    leaves = []
    for top in _TOP[:n_top]:
        for mid in _MID:
            for leaf in _LEAF[: rng.integers(2, len(_LEAF) + 1)]:
                leaves.append((top, mid, f"{mid} {leaf}"))
    return leaves


def generate_catalog(options: DemoOptions, rng: np.random.Generator) -> dict[str, list]:
    n_top = min(len(_TOP), max(2, options.n_items // 60))
    leaves = _category_tree(rng, n_top)
    brands = sorted({"".join(rng.choice(_BRAND_SYLLABLES, size=2)).capitalize() for _ in range(options.n_brands * 3)})
    brands = brands[: options.n_brands]
    brand_top = {b: _TOP[i % n_top] for i, b in enumerate(brands)}
    leaf_of = rng.integers(0, len(leaves), size=options.n_items)
    items = {"leaf": [], "title": [], "brand": [], "categories": [], "price": []}
    for i in range(options.n_items):
        top, mid, leaf = leaves[leaf_of[i]]
        in_top = [b for b in brands if brand_top[b] == top] or brands
        brand = in_top[rng.integers(len(in_top))]
        noun = _NOUN[top][rng.integers(len(_NOUN[top]))]
        title = f"{brand} {_ADJ[rng.integers(len(_ADJ))]} {noun} {leaf.split()[-1][:-1]} {rng.integers(100, 999)}"
        items["leaf"].append(int(leaf_of[i]))
        items["title"].append(title)
        items["brand"].append(brand)
        items["categories"].append([top, mid, leaf])
        items["price"].append(f"${rng.uniform(3, 300):.2f}")
    items["n_leaves"] = len(leaves)
    return items


def generate_sequences(options: DemoOptions, catalog: dict, rng: np.random.Generator) -> list[np.ndarray]:
    n_items = options.n_items
    leaf = np.asarray(catalog["leaf"])
    brand = np.asarray(catalog["brand"])
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity = popularity[rng.permutation(n_items)]
    by_leaf = {l: np.flatnonzero(leaf == l) for l in np.unique(leaf)}
    # each item has 3 follow-up items drawn from its own leaf or its sibling leaves
    follow_ups = np.empty((n_items, 3), dtype=np.int64)
    for i in range(n_items):
        pool = by_leaf[leaf[i]]
        pool = pool[pool != i] if len(pool) > 1 else np.arange(n_items)
        follow_ups[i] = rng.choice(pool, size=3, replace=len(pool) < 3)
    sequences = []
    for _ in range(options.n_users):
        length = int(rng.integers(options.min_len, options.max_len + 1))
        p = popularity / popularity.sum()
        current = int(rng.choice(n_items, p=p))
        favourite_brand = brand[current]
        seq = [current]
        while len(seq) < length:
            u = rng.random()
            if u < options.p_follow_up:
                nxt = int(follow_ups[current, rng.integers(3)])
            elif u < options.p_follow_up + options.p_same_leaf:
                pool = by_leaf[leaf[current]]
                if rng.random() < options.p_brand_loyal:
                    loyal = pool[brand[pool] == favourite_brand]
                    pool = loyal if len(loyal) else pool
                w = popularity[pool] / popularity[pool].sum()
                nxt = int(rng.choice(pool, p=w))
            elif u < 1.0 - options.p_explore:
                # drift to a sibling leaf (the neighbouring leaf index stays in the same subtree mostly)
                sib = (leaf[current] + rng.choice([-1, 1])) % catalog["n_leaves"]
                pool = by_leaf.get(sib, by_leaf[leaf[current]])
                w = popularity[pool] / popularity[pool].sum()
                nxt = int(rng.choice(pool, p=w))
            else:
                nxt = int(rng.choice(n_items, p=p))
            seq.append(nxt)
            current = nxt
        sequences.append(np.asarray(seq, dtype=np.int32))
    return sequences


def generate_demo(out_dir: str | Path, options: DemoOptions | None = None, split: SplitOptions | None = None) -> Path:
    """Generate and write a demo dataset in the prepared layout. Deterministic for a given seed."""
    options = options or DemoOptions()
    if options.n_items < 20 or options.n_users < 10:
        raise ValueError("the demo needs at least 20 items and 10 users")
    rng = np.random.default_rng(options.seed)
    catalog = generate_catalog(options, rng)
    sequences = generate_sequences(options, catalog, rng)
    n = options.n_items
    items = pa.table(
        {
            "item_idx": np.arange(n, dtype=np.int32),
            "item_id": [f"DEMO{i:07d}" for i in range(n)],
            "title": catalog["title"],
            "brand": catalog["brand"],
            "categories": catalog["categories"],
            "price": catalog["price"],
            "description": [""] * n,
            "text": [
                format_item_text(t, c, b, p)
                for t, c, b, p in zip(catalog["title"], catalog["categories"], catalog["brand"], catalog["price"])
            ],
        }
    )
    users = np.arange(options.n_users, dtype=np.int32)
    base_time = 1_500_000_000
    seq_table = pa.table(
        {
            "user_idx": users,
            "user_id": [f"U{u:07d}" for u in users],
            "items": sequences,
            "timestamps": [base_time + 86400 * np.arange(len(s), dtype=np.int64) for s in sequences],
        }
    )
    splits = split_tables(leave_one_out(users, sequences, split or SplitOptions()))
    meta = {"source": "demo", "name": "demo", "options": asdict(options), "seed": options.seed}
    return write_prepared(out_dir, items, seq_table, splits, meta)
