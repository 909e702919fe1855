"""Malformed requests for the ingress: every one must get a 4xx with a message (tests and bench_serve.py).

Covers broken and non-UTF-8 JSON, wrong types, unknown fields and items, empty and 10,000-long histories,
huge and lone-surrogate critiques, out-of-range k, and random mixtures of bad fields.
"""
from __future__ import annotations

import json

import numpy as np


def malformed_requests(rng: np.random.Generator, n: int, n_items: int, *, takes_critique: bool = False,
                       adds_text_items: bool = False) -> list[tuple[str, bytes | str]]:
    """(path, raw body) pairs that must all be rejected with 4xx. By default the served model is ID-only, so a
    well-formed critique and a text-only new item are malformed too; for a model that takes critiques / ranks new
    items from their text (Flare T+ID) those two requests are valid and left out."""
    fixed = [
        ("/recommend", b"{not json"), ("/recommend", b""), ("/recommend", b"[]"), ("/recommend", b"null"),
        ("/recommend", b'{"history": [1, 2], "k": 10}\xff\xfe'), ("/recommend", '{"history": [1], "k": 5, "critique": "\\ud800"}'),
        ("/recommend", json.dumps({"history": []})), ("/recommend", json.dumps({"history": list(range(10_000))})),
        ("/recommend", json.dumps({"history": [1, 2], "k": -1})), ("/recommend", json.dumps({"history": [1], "k": 0})),
        ("/recommend", json.dumps({"history": [1], "k": 10**9})), ("/recommend", json.dumps({"history": [1], "k": "10"})),
        ("/recommend", json.dumps({"history": [1], "k": 1.5})), ("/recommend", json.dumps({"history": "1,2,3"})),
        ("/recommend", json.dumps({"history": [n_items + 5]})), ("/recommend", json.dumps({"history": [-1]})),
        ("/recommend", json.dumps({"history": ["NOT-AN-ASIN"]})), ("/recommend", json.dumps({"history": [None]})),
        ("/recommend", json.dumps({"history": [[1]]})), ("/recommend", json.dumps({"history": [True]})),
        ("/recommend", json.dumps({"history": [1], "critique": "x" * 100_000})),
        ("/recommend", json.dumps({"history": [1], "critique": "too noisy"})),  # sasrec takes no critique
        ("/recommend", json.dumps({"history": [1], "critique": 5})), ("/recommend", json.dumps({"history": [1], "bogus": 1})),
        ("/recommend", json.dumps({"history": [1], "exclude_history": "yes"})),
        ("/search", json.dumps({"query": ""})), ("/search", json.dumps({"query": "!!! ???"})),
        ("/search", json.dumps({"query": 7})), ("/search", json.dumps({"query": "a" * 5000})),
        ("/search", json.dumps({"query": "x", "k": 0})), ("/search", b"\x80\x81"),
        ("/items", json.dumps({"items": []})), ("/items", json.dumps({"items": [{"item_id": "NEW1", "title": "t"}]})),
        ("/items", json.dumps({"items": [{"title": "t"}]})), ("/items", json.dumps({"items": "x"})),
        ("/items", json.dumps({"items": [{"item_id": "", "title": "t"}]})),
    ]
    capability_cases = {
        ("/recommend", json.dumps({"history": [1], "critique": "too noisy"})): takes_critique,
        ("/items", json.dumps({"items": [{"item_id": "NEW1", "title": "t"}]})): adds_text_items,
    }
    out = [case for case in fixed if not capability_cases.get(case, False)]
    keys = ["history", "k", "critique", "exclude_history", "query", "items", "zzz"]
    values = [None, -3, 0, 1.5, "x", "", [], {}, [None], ["?"] * 3, [-5], [n_items], True, "\u0000", 2**70]
    while len(out) < n:
        body = {str(rng.choice(keys)): values[rng.integers(len(values))] for _ in range(rng.integers(1, 4))}
        path = ["/recommend", "/search", "/items"][rng.integers(3)]
        if path == "/search" and body == {"query": "x"}:  # the one valid combination of these values
            continue
        if rng.random() < 0.2:  # truncated or byte-flipped JSON
            raw = json.dumps(body).encode()
            raw = raw[: rng.integers(0, len(raw))] if rng.random() < 0.5 else bytes(b ^ 0x80 for b in raw)
            out.append((path, raw))
        else:
            out.append((path, json.dumps(body)))
    return out
