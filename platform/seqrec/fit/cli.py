"""`seqrec fit --dataset DIR --model {sasrec,bert4rec,flare_tid} [--budget-s N] [--seed S] [--out DIR]
[--address A] [--set KEY=VALUE ...]`; `register(subparsers)` adds it."""
from __future__ import annotations

import argparse

from seqrec.config import parse_overrides
from seqrec.fit.families import FAMILIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="a prepared dataset directory (seqrec data prepare / demo)")
    parser.add_argument("--model", required=True, choices=sorted(FAMILIES), help="the model family to fit")
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="wall-clock seconds for the whole fit (probe, search, text prior, test), default 600; "
                             "the one-time text encoding of a new catalog is not counted")
    parser.add_argument("--seed", type=int, default=0, help="training and search seed")
    parser.add_argument("--out", default=None, help="output directory (default runs/fit/<dataset>_<model>_s<seed>)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="fix a training-config value for every trial instead of sizing or searching it, "
                             "e.g. --set model.params.dim=64 --set train.steps=300")


def run(args: argparse.Namespace) -> dict:
    from seqrec.fit.report import summary_text
    from seqrec.fit.runner import FitOptions, fit

    report = fit(FitOptions(dataset=args.dataset, model=args.model, budget_s=args.budget_s, seed=args.seed,
                            out=args.out, address=args.address, overrides=parse_overrides(args.overrides)))
    print(summary_text(report))  # the command's final output
    return report


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("fit", help="size, search (Ray Tune, ASHA) and select a model for any prepared "
                                               "dataset within a time budget; writes a best record")
    add_arguments(parser)
    parser.set_defaults(func=lambda args: (run(args), 0)[1])
    return parser
