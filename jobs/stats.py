"""Entrypoint for `ray job submit -- python jobs/stats.py ...` (same flags as `seqrec data stats`)."""
import sys

from seqrec.cli import main

if __name__ == "__main__":
    sys.exit(main(['data', 'stats', *sys.argv[1:]]))
