"""`seqrec tune --grid NAME_OR_PATH [--set key.path=value ...] [--resume]`; `register(subparsers)` adds it."""
from __future__ import annotations

import argparse
import json

from seqrec.config import parse_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", required=True,
                        help="a grid YAML path or a shipped grid in configs/grids/ (e.g. flare_id/scientific, smoke_demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="fix a training-config value for every trial (a swept key set here is no longer swept), "
                             "e.g. --set data.path=runs/data/demo --set train.steps=200")
    parser.add_argument("--num-samples", type=int, default=None, help="number of trials (default: the grid's)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="stop the whole sweep after this many seconds of wall time (default: the grid's "
                             "tune.time_budget_s, none): running trials stop, unstarted ones never run")
    parser.add_argument("--name", default=None, help="sweep name (default: the grid's); the sweep writes <storage>/<name>/")
    parser.add_argument("--storage-path", default=None, help="where sweeps are written (default: the grid's, runs/tune)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep (Tuner.restore): finished trials are kept, unfinished ones "
                             "continue from their latest checkpoints. Only resume sweep directories you wrote.")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite the sweep's trials table, plot and best record from its saved "
                             "results (e.g. after upgrading seqrec)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")


def run(args: argparse.Namespace) -> dict:
    from seqrec.tune.config import load_grid
    from seqrec.tune.runner import rewrite_outputs, run_sweep, sweep_dir_for

    grid = load_grid(args.grid)
    if args.report_only:
        record = rewrite_outputs(sweep_dir_for(grid, args.name, args.storage_path), address=args.address)
    else:
        record = run_sweep(grid, parse_overrides(args.overrides), name=args.name, storage_path=args.storage_path,
                           num_samples=args.num_samples, resume=args.resume, address=args.address,
                           time_budget_s=args.time_budget_s)
    print(json.dumps({k: record[k] for k in ("name", "trial_id", "step", "checkpoint", "params", "metrics")},
                     indent=2, default=str))
    return record


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("tune", help="Ray Tune sweep of a grid over the Ray Train trainer (ASHA, resume)")
    add_arguments(parser)
    parser.set_defaults(func=lambda args: (run(args), 0)[1])
    return parser

