"""GPU run kit: Recformer (preset recformer_scientific, MiniLM encoder from the bundle): its finetuning stage (the
item matrix encoded once and frozen) on Scientific, then the full test split. `--tiny`: a random 2-layer BERT on the
demo catalog."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runners  # noqa: E402

TINY = {"encoder": "tiny", "tiny_dim": 32, "tiny_layers": 2, "tiny_heads": 2, "max_seq_tokens": 64,
        "max_attr_tokens": 8, "max_items": 20, "encode_batch_size": 256, "score_batch_size": 64,
        "freeze_layers": 1}  # the preset freezes 3 of MiniLM's 6 layers; the tiny BERT has 2
GPU = {"encoder": "minilm", "encode_batch_size": 1024, "score_batch_size": 256}

if __name__ == "__main__":
    runners.run_staged_model("recformer", "recformer_scientific", TINY, GPU)
