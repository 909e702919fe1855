"""Hierarchical exact matching of generated item texts to catalog items (CALRec section 6 alternative to BM25).

A generation such as "Title: X Category: Y Brand: Z Price: W" is parsed with the same parser as the catalog
texts (`seqrec.data.text.parse_item_text`). Values are normalised (lowercase, whitespace collapsed, stripped)
and looked up with progressively fewer fields:

    level 4: (title, category, brand, price)
    level 3: (title, category, brand)
    level 2: (title, category)
    level 1: (title,)
    level 0: no item matched

A level is tried only if the generation has all of its fields and a non-empty title. A generation without
any "Field:" label is treated as a bare title (models sometimes emit only the title). Several items can share
a key (duplicate titles); a match returns all of them, in index order.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from seqrec.data.text import parse_item_text

FIELDS = ("title", "category", "brand", "price")
LEVELS = (4, 3, 2, 1)  # number of leading FIELDS in the key
_SPACE = re.compile(r"\s+")


def normalise(value: str | None) -> str:
    """Lowercase, collapse whitespace, strip. None -> ''."""
    if not value:
        return ""
    return _SPACE.sub(" ", value).strip().lower()


def parse_fields(text: str) -> dict[str, str]:
    """Normalised {field: value} of an item text or generation; a text without labels is a bare title."""
    parsed = parse_item_text(text or "")
    if not parsed:
        parsed = {"title": text or ""}
    return {k: normalise(parsed.get(k)) for k in FIELDS if k in parsed}


class HierarchicalMatcher:
    """Exact lookup of generations in the catalog on 4, 3, 2 then 1 fields (see module docstring)."""

    def __init__(self, item_texts: Sequence[str]):
        self.n_items = len(item_texts)
        # one dict per level: key tuple -> item indices (ascending)
        self._tables: dict[int, dict[tuple[str, ...], list[int]]] = {lvl: {} for lvl in LEVELS}
        for idx, text in enumerate(item_texts):
            fields = parse_fields(text)
            values = tuple(fields.get(k, "") for k in FIELDS)
            if not values[0]:
                continue  # an item without a title is not matchable
            for lvl in LEVELS:
                self._tables[lvl].setdefault(values[:lvl], []).append(idx)

    def match(self, generation: str) -> tuple[int, list[int]]:
        """(level, item indices) of the most specific exact match; (0, []) when nothing matches."""
        fields = parse_fields(generation)
        if not fields.get("title"):
            return 0, []
        for lvl in LEVELS:
            needed = FIELDS[:lvl]
            if not all(k in fields for k in needed):
                continue
            hit = self._tables[lvl].get(tuple(fields[k] for k in needed))
            if hit:
                return lvl, list(hit)
        return 0, []

    def score_generations(
        self,
        generations: Sequence[str],
        logprobs: Sequence[float] | None = None,
        unmatched_score: float = float("-inf"),
    ) -> np.ndarray:
        """(N,) float64 item scores from one user's generations (higher is better).

        Each matched item gets the key (level, logprob) of its best match: the highest level that matched it,
        then the highest logprob among the generations matching it at that level. Keys are turned into
        scores by rank: distinct keys sorted ascending get 1, 2, 3, ..., so a higher level always wins, equal
        keys tie, and the values stay small integers (exact in float32). Unmatched items get
        `unmatched_score` (-inf by default) and all tie, which the evaluator's opt/pes ranks account for.
        `logprobs=None` treats every generation as equally likely.
        """
        if logprobs is None:
            logprobs = [0.0] * len(generations)
        if len(logprobs) != len(generations):
            raise ValueError(f"{len(generations)} generations but {len(logprobs)} logprobs")
        best: dict[int, tuple[int, float]] = {}
        for gen, lp in zip(generations, logprobs):
            lp = float(lp)
            if math.isnan(lp):
                raise ValueError("NaN logprob")
            level, items = self.match(gen)
            if level == 0:
                continue
            key = (level, lp)
            for i in items:
                if i not in best or key > best[i]:
                    best[i] = key
        scores = np.full(self.n_items, unmatched_score, dtype=np.float64)
        if best:
            ranks = {key: r for r, key in enumerate(sorted(set(best.values())), start=1)}
            idx = np.fromiter(best.keys(), dtype=np.int64, count=len(best))
            scores[idx] = [ranks[best[i]] for i in idx.tolist()]
        return scores

    def level_shares(self, generations: Sequence[str]) -> dict[str, float]:
        """Share of generations whose best match is at each level (see `match_level_shares`)."""
        return match_level_shares(self, generations)


def match_level_shares(matcher: HierarchicalMatcher, generations: Sequence[str]) -> dict[str, float]:
    """{'level_4': share, 'level_3', 'level_2', 'level_1', 'none': share, 'any': share, 'n': count}.

    Each generation counts once, at the most specific level it matched; shares sum to 1 over the five
    buckets (all 0.0 when there are no generations).
    """
    counts = {lvl: 0 for lvl in (*LEVELS, 0)}
    for gen in generations:
        counts[matcher.match(gen)[0]] += 1
    n = len(generations)
    share = (lambda c: c / n) if n else (lambda c: 0.0)
    out: dict[str, float] = {f"level_{lvl}": share(counts[lvl]) for lvl in LEVELS}
    out["none"] = share(counts[0])
    out["any"] = share(n - counts[0])
    out["n"] = n
    return out
