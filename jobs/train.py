"""Entrypoint for `ray job submit --address http://HOST:8265 --working-dir . -- python jobs/train.py --config NAME`.

Inside a Ray job RAY_ADDRESS is set, so training joins that cluster instead of starting a private instance.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works without pip install
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from seqrec.cli import main  # noqa: E402  (the seqrec CLI: its console set-up and exit codes)

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
