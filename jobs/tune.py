"""Entrypoint for `ray job submit --address http://HOST:8265 --working-dir . -- python jobs/tune.py --grid NAME`.

Inside a Ray job RAY_ADDRESS is set, so the sweep joins that cluster instead of starting a private instance.
Same flags as `seqrec tune` (--grid, --set, --num-samples, --time-budget-s, --name, --storage-path, --resume).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works without pip install
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from seqrec.cli import main  # noqa: E402  (the seqrec CLI: its console set-up and exit codes)

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
