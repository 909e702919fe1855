"""Frozen text-encoder features: loading encoders by name or path, and the on-disk feature cache."""
