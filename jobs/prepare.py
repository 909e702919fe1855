"""Entrypoint for `ray job submit -- python jobs/prepare.py ...` (same flags as `seqrec data prepare`)."""
import sys

from seqrec.cli import main

if __name__ == "__main__":
    sys.exit(main(['data', 'prepare', *sys.argv[1:]]))
