"""Datasets: one canonical Parquet layout, loaders for each source format, the demo generator."""
