"""Hierarchical exact matching of generated item texts (CALRec section 6)."""
from __future__ import annotations

import numpy as np
import pytest

from seqrec.data.text import format_item_text
from seqrec.retrieval.matching import HierarchicalMatcher, match_level_shares, normalise

ITEMS = [
    format_item_text("Gorilla Glue 8oz", ["Industrial & Scientific", "Adhesives"], "Gorilla", 9.99),  # 0
    format_item_text("Gorilla Glue 8oz", ["Industrial & Scientific", "Adhesives"], "Gorilla", 12.5),  # 1
    format_item_text("Sanding Roll", ["Industrial & Scientific", "Abrasives"], "DEWALT", None),  # 2
    format_item_text("Sanding Roll", ["Industrial & Scientific", "Abrasives"], "Bosch", None),  # 3
    format_item_text("Sanding Roll", ["Tools"], None, None),  # 4
    format_item_text("Lab Goggles", ["Lab"], "Uvex", None),  # 5
]


@pytest.fixture(scope="module")
def matcher():
    return HierarchicalMatcher(ITEMS)


def test_normalise():
    assert normalise("  Gorilla   GLUE\t8oz ") == "gorilla glue 8oz"
    assert normalise(None) == ""


def test_exact_four_field_match(matcher):
    assert matcher.match(ITEMS[1]) == (4, [1])
    # case and whitespace do not matter
    gen = "Title:  gorilla glue   8OZ Category: industrial & scientific > adhesives Brand: GORILLA Price: $9.99"
    assert matcher.match(gen) == (4, [0])


def test_fallbacks(matcher):
    # wrong price -> 3 fields (both Gorilla items share title, category, brand)
    gen = format_item_text("Gorilla Glue 8oz", ["Industrial & Scientific", "Adhesives"], "Gorilla", 1.0)
    assert matcher.match(gen) == (3, [0, 1])
    # wrong brand -> 2 fields
    gen = format_item_text("Sanding Roll", ["Industrial & Scientific", "Abrasives"], "Makita", None)
    assert matcher.match(gen) == (2, [2, 3])
    # wrong category -> title only (all three sanding rolls)
    assert matcher.match(format_item_text("Sanding Roll", ["Garden"], "DEWALT", None)) == (1, [2, 3, 4])
    # a truncated generation (no price/brand) still matches on the fields it has
    assert matcher.match("Title: Lab Goggles Category: Lab") == (2, [5])
    # a bare title without labels
    assert matcher.match("lab goggles") == (1, [5])


def test_no_match(matcher):
    assert matcher.match(format_item_text("Unknown Widget", ["Lab"], "Uvex", None)) == (0, [])
    assert matcher.match("") == (0, [])
    assert matcher.match("Category: Lab Brand: Uvex") == (0, [])  # no title


def test_score_generations_levels_first_then_logprob(matcher):
    gens = [
        format_item_text("Sanding Roll", ["Garden"], None, None),  # level 1 -> items 2, 3, 4
        ITEMS[5],  # level 4 -> item 5
        format_item_text("Sanding Roll", ["Industrial & Scientific", "Abrasives"], "Makita", None),  # 2 -> 2, 3
        "nothing like an item",
    ]
    scores = matcher.score_generations(gens, [-0.1, -9.0, -5.0, -0.01])
    assert scores.shape == (len(ITEMS),) and scores.dtype == np.float64
    # level beats logprob: item 5 (level 4, lp -9) > items 2, 3 (level 2) > item 4 (level 1) > unmatched
    assert scores[5] > scores[2] == scores[3] > scores[4] > scores[0]
    assert np.isneginf(scores[0]) and np.isneginf(scores[1])
    # within a level, the better logprob wins
    two = matcher.score_generations([ITEMS[0], ITEMS[5]], [-3.0, -1.0])
    assert two[5] > two[0]
    assert matcher.score_generations([ITEMS[0]], None, unmatched_score=-1e9)[2] == -1e9


def test_level_shares(matcher):
    gens = [ITEMS[0], ITEMS[2], "Title: Sanding Roll Category: Garden", "nope", "Title: Gorilla Glue 8oz"]
    shares = matcher.level_shares(gens)
    assert shares == match_level_shares(matcher, gens)
    assert shares["level_4"] == pytest.approx(2 / 5)
    assert shares["level_1"] == pytest.approx(2 / 5)
    assert shares["none"] == pytest.approx(1 / 5) and shares["any"] == pytest.approx(4 / 5)
    assert shares["level_3"] == shares["level_2"] == 0.0 and shares["n"] == 5
    assert sum(shares[k] for k in ("level_4", "level_3", "level_2", "level_1", "none")) == pytest.approx(1.0)
    assert match_level_shares(matcher, [])["none"] == 0.0
