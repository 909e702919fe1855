"""`seqrec train --config NAME_OR_PATH [--set key.path=value ...]`; `register(subparsers)` adds the subcommand."""
from __future__ import annotations

import argparse
import json

from seqrec.config import load_config, parse_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a YAML path or a shipped name in configs/train/ (e.g. sasrec_scientific)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-3 --set scaling.num_workers=2; "
                             "--set train.fit_on=train+valid --set train.stop_step=N refits a validation-selected "
                             "run (best step N) on train + validation targets and tests its last checkpoint")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")
    parser.add_argument("--resume-from", default=None, help="checkpoint directory to continue from")


def run(args: argparse.Namespace) -> dict:
    from seqrec.train.config import ExperimentConfig
    from seqrec.train.loop import run_experiment

    from seqrec.train.staged_loop import is_staged_config, run_from_cli

    if is_staged_config(args.config):  # CALRec, Recformer: staged text-model training (train/staged_loop.py)
        summary = run_from_cli(args.config, args.overrides, args.address, args.resume_from)
        print(json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=2, default=str))
        return summary
    overrides = parse_overrides(args.overrides)
    if args.address:
        overrides["run.address"] = args.address
    if args.resume_from:
        overrides["run.resume_from"] = args.resume_from
    cfg = load_config(ExperimentConfig, args.config, subdir="train", overrides=overrides)
    summary = run_experiment(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=2, default=str))
    return summary


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train a model on Ray Train (SASRec, Bert4Rec/Flare ID, Flare T+ID; CALRec and Recformer in stages)")
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser

