"""The `seqrec` command line. Each area registers its own subcommands; this file only assembles them."""
from __future__ import annotations

import argparse
import logging
import os
import sys

# subcommand modules, each with register(subparsers); a module whose feature has not landed is skipped
SUBCOMMAND_MODULES = ("seqrec.data.cli", "seqrec.eval.cli", "seqrec.train.cli", "seqrec.tune.cli", "seqrec.quickstart",
                      "seqrec.serve.cli", "seqrec.fit.cli")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="seqrec",
        description="Train, tune, evaluate and serve text-aware sequential recommenders on Ray.",
    )
    parser.add_argument("--log-level", default=os.environ.get("SEQREC_LOG_LEVEL", "INFO"),
                        help="DEBUG also shows Ray's own INFO logs (Ray Data plans, Ray Train reports)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (as SEQREC_PROGRESS=0; they are off anyway when stderr is not a terminal)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    from seqrec.console import configure

    configure(args.log_level, quiet=args.quiet)
    try:
        result = args.func(args)
        return result if isinstance(result, int) else 0  # `seqrec train` returns its summary dict
    except (FileNotFoundError, ValueError, ConnectionError) as e:  # bad input or an unreachable storage endpoint
        logging.getLogger("seqrec").error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
