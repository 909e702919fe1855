"""Entrypoint for `ray job submit -- python jobs/quickstart.py ...` (same flags as `seqrec quickstart`)."""
import sys

from seqrec.cli import main

if __name__ == "__main__":
    sys.exit(main(['quickstart', *sys.argv[1:]]))
