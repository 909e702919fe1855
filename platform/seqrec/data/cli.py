"""`seqrec data ...`: prepare, demo, stats, download."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _prepare(args: argparse.Namespace) -> int:
    if args.format == "unisrec":
        from seqrec.data.unisrec import prepare_unisrec

        report = prepare_unisrec(args.input, args.out, name=args.name)
    elif args.format == "lcrec":
        from seqrec.data.lcrec import LCRecOptions, prepare_lcrec

        options = LCRecOptions(
            max_len=args.max_len, long_sequences=args.long_sequences, calrec_truncation=args.calrec_truncation,
            min_eval_len=args.min_eval_len,
        )
        report = prepare_lcrec(args.input, args.out, options, name=args.name)
    else:
        from seqrec.data.amazon2018 import Amazon2018Options, find_raw_files, prepare_amazon2018

        options = Amazon2018Options(
            min_user_count=args.min_user_count, min_item_count=args.min_item_count, max_len=args.max_len,
            long_sequences=args.long_sequences, drop_missing_title=args.drop_missing_title, dedup=not args.no_dedup,
            calrec_truncation=args.calrec_truncation, min_eval_len=args.min_eval_len, seed=args.seed,
        )
        reviews, meta = find_raw_files(args.input)
        report = prepare_amazon2018(reviews, meta, args.out, options, address=args.address, name=args.name)
    print(json.dumps(report, indent=2, default=str))
    _print_stats(Path(args.out))
    return 0


def _print_stats(path: Path, json_out: str | None = None) -> None:
    from seqrec.data.dataset import PreparedDataset
    from seqrec.data.stats import dataset_stats, format_stats

    stats = dataset_stats(PreparedDataset.load(path))
    print(format_stats(stats))
    if json_out:
        Path(json_out).write_text(json.dumps(stats, indent=2))


def _stats(args: argparse.Namespace) -> int:
    _print_stats(Path(args.path), args.json)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from seqrec.data.dataset import SplitOptions
    from seqrec.data.demo import DemoOptions, generate_demo

    generate_demo(args.out, DemoOptions(n_users=args.users, n_items=args.items, seed=args.seed), SplitOptions(args.min_eval_len))
    _print_stats(Path(args.out))
    return 0


def _download(args: argparse.Namespace) -> int:
    from seqrec.data.download import download_category

    kwargs = {"base_url": args.base_url} if args.base_url else {}
    for path in download_category(args.category, args.out, **kwargs):
        print(path)
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare, generate, inspect and download datasets")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("prepare", help="convert a source dataset into the canonical Parquet layout")
    p.add_argument("--format", required=True, choices=["amazon2018", "unisrec", "lcrec"])
    p.add_argument("--input", required=True, help="directory with the source files")
    p.add_argument("--out", required=True, help="output directory (prepared dataset)")
    p.add_argument("--name", default=None, help="dataset name stored in meta.json (default: input folder name)")
    p.add_argument("--max-len", type=int, default=None, help="maximum sequence length (FLARE: 51); default keeps all")
    p.add_argument("--long-sequences", choices=["trim", "filter"], default="trim",
                   help="trim: keep the last --max-len items; filter: drop users longer than --max-len")
    p.add_argument("--min-eval-len", type=int, default=3, help="users shorter than this are training-only (Recformer: 4)")
    p.add_argument("--calrec-truncation", action="store_true", help="truncate title/category/brand/price to 25/15/15/15 words")
    g = p.add_argument_group("amazon2018 only")
    g.add_argument("--min-user-count", type=int, default=5, help="k-core threshold for users")
    g.add_argument("--min-item-count", type=int, default=5, help="k-core threshold for items")
    g.add_argument("--drop-missing-title", action="store_true", help="drop items without a usable title")
    g.add_argument("--no-dedup", action="store_true", help="keep exact duplicate consecutive events")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("demo", help="generate a synthetic catalog with sequential structure")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-eval-len", type=int, default=3)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_demo)

    p = sub.add_parser("stats", help="print users, items, interactions, lengths, duplicate and repeat rates")
    p.add_argument("path", help="a prepared dataset directory")
    p.add_argument("--json", default=None, help="also write the stats to this JSON file")
    p.set_defaults(func=_stats)

    p = sub.add_parser("download", help="fetch the public Amazon 2018 review and meta files of a category")
    p.add_argument("category", help="e.g. Magazine_Subscriptions, Industrial_and_Scientific")
    p.add_argument("--out", required=True)
    p.add_argument("--base-url", default=None, help="mirror base URL (default: the public UCSD location)")
    p.set_defaults(func=_download)
