"""Recommender models. Every model exposes loss(batch) and score_all(batch) -> (B, n_items)."""
