"""CALRec speed: sampling throughput (generated tokens/s, seconds per user) and training step time.

    python benchmarks/bench_calrec.py --lm smollm2 --users 4 --n-gen 32 --max-new-tokens 64 --train-steps 3
    python benchmarks/bench_calrec.py --lm tiny --device cuda        # on a GPU machine

Prompts are real Scientific users (test split histories, CALRec template); the sampler is the model's own
(`CALRec.generations`: batched temperature sampling with a KV cache, n_gen completions per user). Prints and
writes JSON to benchmarks/results/calrec_<lm>_<device>_<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm", default="smollm2", help="smollm2 | tiny | HF name or local directory")
    p.add_argument("--dataset", default=str(ROOT / "runs" / "data" / "Scientific"), help="prepared dataset (prepared from ../shared/data/Scientific if missing)")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--n-gen", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gen-batch-users", type=int, default=2)
    p.add_argument("--max-seq-tokens", type=int, default=512)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from seqrec.data.batching import make_batch
    from seqrec.data.dataset import PreparedDataset
    from seqrec.models.calrec import CALRec, CALRecConfig, sample_training_examples

    if not (Path(args.dataset) / "meta.json").exists():
        from seqrec.data.unisrec import prepare_unisrec

        prepare_unisrec(ROOT.parent / "shared" / "data" / "Scientific", args.dataset)
    ds = PreparedDataset.load(args.dataset)
    t0 = time.perf_counter()
    cfg = CALRecConfig(lm=args.lm, n_gen=args.n_gen, max_new_tokens=args.max_new_tokens,
                       gen_batch_users=args.gen_batch_users, max_seq_tokens=args.max_seq_tokens)
    model = CALRec(cfg, ds.n_items).attach_catalog(ds.item_texts())
    load_s = time.perf_counter() - t0
    device = torch.device(args.device)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())

    # ---- training steps (NIG + both contrastive terms: two LM forwards, one backward)
    rng = np.random.default_rng(0)
    item_tokens = model.catalog.item_tokens
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step_times, step_tokens = [], []
    model.train()
    for _ in range(args.train_steps):
        ex = sample_training_examples(ds.train_sequences(), item_tokens, model.prompts, args.batch_size, cfg.drop_last_max, rng)
        batch = {k: v.to(device) for k, v in model.prompts.collate_train(ex).items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t)
        step_tokens.append(int(batch["attention_mask"].sum()))

    # ---- sampling
    rows = ds.eval_rows("test").subset(slice(0, args.users))
    batch = make_batch(rows.histories, rows.targets, rows.user_idx)
    model.reset_samples()
    prompts = model.prompts_for(batch)
    t = time.perf_counter()
    samples = model.generations(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    gen_s = time.perf_counter() - t
    tok = model.tokenizer
    gen_tokens = sum(len(tok(s, add_special_tokens=False)["input_ids"]) + 1 for texts, _ in samples for s in texts)

    out = {
        "lm": args.lm, "device": str(device), "machine": platform.node(), "torch_threads": torch.get_num_threads(),
        "params": n_params, "load_seconds": round(load_s, 2),
        "train": {"batch_size": args.batch_size, "steps": args.train_steps,
                  "seconds_per_step": [round(s, 3) for s in step_times],
                  "tokens_per_step": step_tokens,
                  "median_seconds_per_step": round(float(np.median(step_times)), 3) if step_times else None},
        "generation": {"users": len(rows), "n_gen": args.n_gen, "max_new_tokens": args.max_new_tokens,
                       "gen_batch_users": args.gen_batch_users, "prompt_tokens_mean": round(float(np.mean([len(p) for p in prompts])), 1),
                       "seconds": round(gen_s, 2), "seconds_per_user": round(gen_s / len(rows), 2),
                       "generated_tokens": gen_tokens, "tokens_per_s": round(gen_tokens / gen_s, 1),
                       "example": samples[0][0][:3]},
    }
    print(json.dumps(out, indent=2))
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    path = res_dir / f"calrec_{Path(args.lm).name}_{device.type}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
