"""Entrypoint for `ray job submit --address http://HEAD:8265 -- python jobs/deploy.py --checkpoint CKPT [--port 8000]`.

Deploys the seqrec Serve application (recommender, BM25, ingress; same flags as `seqrec serve run`) on the
job's cluster and returns once it is running: Serve outlives the job. Paths must be valid on the cluster.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works without pip install
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from seqrec.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", "run", "--detach", *sys.argv[1:]]))
