"""Entrypoint for `ray job submit -- python jobs/evaluate.py ...` (same flags as `seqrec evaluate`)."""
import sys

from seqrec.cli import main

if __name__ == "__main__":
    sys.exit(main(['evaluate', *sys.argv[1:]]))
