"""GPU run kit: CALRec (preset calrec_scientific_smollm2's stage-2 loss and generation settings) on Scientific.
The SmolLM2 GGUF (98 MiB) cannot travel to the device, so the LM there is a random Llama of SmolLM2-135M's shape
(576 wide, 30 layers, 9 heads; its MLP 2x wide where SmolLM2's is 2.67x, so ~0.8x its non-embedding
parameters) with SmolLM2's tokenizer from the bundle: throughput, MFU and memory are of about the real size; its metrics are of an LM trained for minutes from scratch. Generation-based evaluation
(n_gen beams per user) of all 8,442 test users does not fit the 8-minute cap: a seeded subset of --eval-users
(default 512) is evaluated, and the JSON says so. ZeRO-3 on the Ray path. `--tiny`: a 2-layer random Llama."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runners  # noqa: E402

TINY = {"lm": "tiny", "tiny_dim": 32, "tiny_layers": 2, "tiny_heads": 2, "max_seq_tokens": 192,
        "max_item_tokens": 64, "n_gen": 2, "max_new_tokens": 12, "gen_batch_users": 4}
GPU = {"lm": "tiny", "tiny_dim": 576, "tiny_layers": 30, "tiny_heads": 9, "gen_batch_users": 64, "n_gen": 8}
NOTE = "CALRec's generation eval on all test users does not fit the 8-minute cap: a seeded subset was evaluated"

if __name__ == "__main__":
    runners.run_staged_model("calrec", "calrec_scientific_smollm2", TINY, GPU, zero_stage=3, stage=-1,
                             eval_users_default=512, eval_note=NOTE)
