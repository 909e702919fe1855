"""seqrec: train, tune, evaluate and serve text-aware sequential recommenders on Ray."""

__version__ = "0.1.0"
