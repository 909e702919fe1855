"""GPU run kit: Bert4Rec on Scientific (preset bert4rec_scientific). `--tiny`: the CPU check. See common.py."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runners  # noqa: E402

TINY = {"max_len": 20, "dim": 16, "layers": 1, "heads": 2, "hidden": 32}

if __name__ == "__main__":
    runners.run_id_model("bert4rec", "bert4rec_scientific", TINY)
