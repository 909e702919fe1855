"""Lexical retrieval over item text (BM25)."""
