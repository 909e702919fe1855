"""GPU run kit: Flare T+ID on Scientific (preset flare_tid_scientific; MiniLM from the bundle, no LC-Rec category
source: the bundle carries only the UniSRec split). `--tiny`: the CPU check on the demo catalog. See common.py."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runners  # noqa: E402

TINY = {"max_len": 20, "dim": 16, "layers": 1, "heads": 2, "hidden": 32, "perceiver_dim": 16, "perceiver_heads": 2,
        "perceiver_layers": 1, "perceiver_latents": 2, "max_text_tokens": 32, "encoder": "minilm",
        "category_source": None}
GPU = {"encoder": "minilm", "category_source": None}

if __name__ == "__main__":
    runners.run_id_model("flare_tid", "flare_tid_scientific", TINY, GPU)
