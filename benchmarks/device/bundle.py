"""Make the bundle the GPU run kit carries to the device machine (run here, on the CPU machine):

    python benchmarks/device/bundle.py            # -> runs/device_bundle (ignored by git; carry it)

It is benchmarks/bench_device_sweep.py's bundle (the prepared Scientific split + MiniLM in float16, ~45 MiB)
plus SmolLM2's converted tokenizer (~3 MiB; the 98 MiB GGUF itself cannot travel: CALRec runs a random Llama of
SmolLM2-135M's shape there). The device machine has no shared data folder and no model packages.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (puts platform/ and benchmarks/ on the path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", default=str(C.DEFAULT_RAW))
    p.add_argument("--out", default=str(C.DEFAULT_BUNDLE))
    args = p.parse_args()
    from bench_device_sweep import make_bundle

    from seqrec.models.calrec import CALRecConfig, load_tokenizer

    make_bundle(args)  # rewrites args.out from scratch
    load_tokenizer(CALRecConfig(lm="tiny")).save_pretrained(str(Path(args.out) / "smollm2_tokenizer"))
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"bundle {args.out}: {size / 2**20:.1f} MiB (carry it: run(carry=['runs/device_bundle']))")


if __name__ == "__main__":
    main()
