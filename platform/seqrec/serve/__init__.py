"""Online serving on Ray Serve: a recommender, a BM25 search replica and a FastAPI ingress (see app.py)."""
