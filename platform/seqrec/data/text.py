"""Item text: HTML cleaning and the one key: value formatter used everywhere (CALRec 3.2 style).

Every model, the BM25 corpus and the serving layer take item text from `format_item_text`, so a change of
template happens in exactly one place.
"""
from __future__ import annotations

import html
import re
from typing import Iterable, Sequence

UNKNOWN = "Unknown"
# CALRec 3.2: per-field word truncation (title 25, category 15, brand 15, price 15).
CALREC_WORD_LIMITS = {"title": 25, "category": 15, "brand": 15, "price": 15}

_TAG = re.compile(r"<[^<>]*>")
# a tag cut off before its '>' (the raw 2018 meta titles are such fragments: '<span class="a-size-medium ..."')
_DANGLING_TAG = re.compile(r"<[a-zA-Z/!][^<>]*$")
_SPACE = re.compile(r"\s+")


def clean_text(value: object) -> str:
    """Strip HTML tags/fragments, unescape entities, collapse whitespace. Non-strings become ''."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v is not None)
    text = html.unescape(str(value))
    text = _TAG.sub(" ", text)
    text = _DANGLING_TAG.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def is_usable_title(title: str) -> bool:
    """A title is usable when it has at least one letter or digit after cleaning."""
    return any(ch.isalnum() for ch in title)


def truncate_words(text: str, max_words: int | None) -> str:
    if not max_words:
        return text
    words = text.split()
    return " ".join(words[:max_words])


def format_price(price: object) -> str:
    if price is None:
        return ""
    if isinstance(price, float):
        if price != price:  # NaN
            return ""
        return f"${price:.2f}"
    return clean_text(price)


def format_item_text(
    title: str | None,
    categories: Sequence[str] | str | None = None,
    brand: str | None = None,
    price: object = None,
    word_limits: dict[str, int] | None = None,
) -> str:
    """'Title: ... Category: ... Brand: ... Price: ...' with 'Unknown' for missing fields.

    `categories` is the category path (list, most general first) or an already joined string.
    `word_limits` applies CALRec's per-field truncation (see CALREC_WORD_LIMITS); None keeps full fields.
    """
    limits = word_limits or {}
    if isinstance(categories, str):
        category = categories
    else:
        category = " > ".join(c for c in (categories or []) if c)
    fields = {
        "title": clean_text(title),
        "category": clean_text(category),
        "brand": clean_text(brand),
        "price": format_price(price),
    }
    parts = []
    for key, label in (("title", "Title"), ("category", "Category"), ("brand", "Brand"), ("price", "Price")):
        value = truncate_words(fields[key], limits.get(key)) or UNKNOWN
        parts.append(f"{label}: {value}")
    return " ".join(parts)


_FIELD_RE = re.compile(r"(Title|Category|Brand|Price):\s*")


def parse_item_text(text: str) -> dict[str, str]:
    """Inverse of format_item_text (used by CALRec's hierarchical exact match on generations)."""
    out: dict[str, str] = {}
    pieces = _FIELD_RE.split(text)
    # pieces = [prefix, key1, value1, key2, value2, ...]
    for key, value in zip(pieces[1::2], pieces[2::2]):
        out.setdefault(key.lower(), value.strip())
    return out


def join_nonempty(values: Iterable[str], sep: str = " ") -> str:
    return sep.join(v for v in values if v)
