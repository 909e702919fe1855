"""`seqrec evaluate`: full-ranking metrics of baselines and trained checkpoints, one table and a JSON file."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def build_scorer(name: str, dataset, params: dict | None = None):
    """A baseline by name, or a trained model from a checkpoint directory (`params` override its saved model
    config: --model-param)."""
    from seqrec.eval.baselines import BASELINES

    if name in BASELINES:
        return BASELINES[name].from_dataset(dataset)
    from seqrec.storage import is_remote, local_copy

    if "://" in name:
        is_remote(name)  # an unsupported scheme: ValueError naming the accepted ones
    path = local_copy(name, "checkpoints") if "://" in name else Path(name)  # s3:// gs://: a cached copy
    if path.is_dir():
        from seqrec.models.registry import load_model

        model, _ = load_model(path, dataset=dataset, params=params)  # Flare: text features; CALRec: item texts
        return model
    raise ValueError(f"unknown model {name!r}: expected one of {sorted(BASELINES)} or a checkpoint directory (or URI)")


USER_SUBSETS = ("all", "cold-target")


def select_users(dataset, rows, users: str):
    """'all', or 'cold-target': rows whose target never occurs in any training sequence (cold-start items)."""
    if users == "all":
        return rows
    if users == "cold-target":
        return rows.subset(np.flatnonzero(dataset.train_item_counts()[rows.targets] == 0))
    raise ValueError(f"unknown user subset {users!r}; expected one of {USER_SUBSETS}")


def seeded_user_subset(rows, max_users: int | None, seed: int = 0):
    """`max_users` rows drawn with `seed`, in their original order (all rows when max_users is None or >= their
    number): the subset `--max-users` scores, for models too slow to score every user on this machine."""
    if not max_users or max_users >= len(rows):
        return rows
    return rows.subset(np.sort(np.random.default_rng(seed).choice(len(rows), size=max_users, replace=False)))


def run_evaluation(dataset_path, models, split="test", max_users=None, seed=0, mask_history=False, memory_budget_mb=256.0,
                   users="all", model_params: dict | None = None, popularity_edges: tuple[int, ...] | None = None):
    """(dataset, results by model label). With `popularity_edges` each result also holds "buckets": its metrics
    by how often the row's target occurs in the training sequences (seqrec.eval.evaluator.bucket_metrics)."""
    from seqrec.data.dataset import PreparedDataset
    from seqrec.eval.evaluator import EvalSettings, bucket_metrics, evaluate

    dataset = PreparedDataset.load(dataset_path)
    rows = select_users(dataset, dataset.eval_rows(split), users)
    if len(rows) == 0:
        raise ValueError(f"no {split} rows in user subset {users!r}")
    rows = seeded_user_subset(rows, max_users, seed)
    settings = EvalSettings(mask_history=mask_history, memory_budget_mb=memory_budget_mb)
    target_counts = dataset.train_item_counts()[rows.targets] if popularity_edges else None
    results = {}
    for name in models:
        scorer = build_scorer(name, dataset, model_params)
        # a CALRec checkpoint ranks its samples two ways (QRR-BM25, hierarchical match): one entry each;
        # the samples are drawn once, so the first entry's seconds include the generation
        views = scorer.scorers() if hasattr(scorer, "scorers") else {getattr(scorer, "name", None) or Path(name).name: scorer}
        for label, view in views.items():
            result = evaluate(view, rows, dataset.n_items, settings)
            label = label if label not in results else f"{Path(name).name}:{label}"
            results[label] = {**result.as_dict(), "seconds_per_user": result.seconds / max(1, result.n_rows)}
            if hasattr(view, "match_report"):
                results[label]["match_shares"] = view.match_report()
            if popularity_edges:
                results[label]["buckets"] = bucket_metrics(result, target_counts, popularity_edges, settings)
    return dataset, results


def checkpoint_dataset(paths) -> str | None:
    """The dataset recorded in a checkpoint's config.json (CALRec records it), for --dataset's default."""
    from seqrec.storage import local_copy

    for p in paths:
        meta = (local_copy(p, "checkpoints") if "://" in str(p) else Path(p)) / "config.json"
        if meta.exists():
            found = json.loads(meta.read_text()).get("dataset_path")
            if found:
                return found
    return None


def parse_bucket_edges(text: str | None) -> tuple[int, ...]:
    """--buckets '1,5,20' -> (1, 5, 20); default POPULARITY_EDGES."""
    from seqrec.eval.evaluator import POPULARITY_EDGES, bucket_labels

    if not text:
        return POPULARITY_EDGES
    try:
        edges = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--buckets expects comma-separated integers like 1,5,20, got {text!r}") from None
    bucket_labels(edges)  # validates
    return edges


def print_buckets(results: dict, metrics: list[str]) -> None:
    """One line per model and popularity bucket: rows and the chosen metrics."""
    for name, r in results.items():
        for label, b in r["buckets"].items():
            values = "  ".join(f"{m}={b['metrics'][m]:.4f}" for m in metrics if m in b["metrics"])
            print(f"{name} target seen {label:>6} times in training: {b['n']:6d} rows  {values}")


def _evaluate(args: argparse.Namespace) -> int:
    from seqrec.eval.evaluator import format_table

    from seqrec.config import parse_overrides

    try:  # the same KEY=VALUE parsing (values as YAML) as `seqrec train --set`
        args.model_params = parse_overrides(args.model_param)
    except ValueError as e:
        raise SystemExit(f"--model-param expects KEY=VALUE: {e}") from None
    models = list(args.model or []) + list(args.checkpoint or [])
    record_dataset = None
    if args.best_record:  # a best record names a checkpoint (and its dataset), read as `seqrec serve` reads it
        from seqrec.serve.config import read_best_record, resolve_best_record

        record_checkpoint, record = read_best_record(resolve_best_record(args.best_record, args.records_dir))
        models.append(record_checkpoint)  # its config.json carries the record's scoring params (text_prior_weight)
        record_dataset = record.get("dataset") if isinstance(record.get("dataset"), str) else None
    if args.critique:
        from seqrec.eval.critique import run_critique_cli

        return run_critique_cli(args, models)
    if not models:
        raise SystemExit("give at least one --model, --checkpoint or --best-record")
    dataset_path = args.dataset or record_dataset or checkpoint_dataset(models)
    if not dataset_path:
        raise SystemExit("--dataset is required (the checkpoints do not record one)")
    if checkpoint_dataset(args.checkpoint or []) and "lir_bm25" not in models:
        models.append("lir_bm25")  # CALRec's reference baseline, reported beside it
    edges = parse_bucket_edges(args.buckets) if (args.buckets or args.bucket_chart) else None
    dataset, results = run_evaluation(
        dataset_path, models, args.split, args.max_users, args.seed, args.mask_history, args.memory_budget_mb, args.users,
        args.model_params, edges,
    )
    print(f"dataset {dataset.name}: {results[next(iter(results))]['n_rows']} {args.split} rows ({args.users} users), "
          f"{dataset.n_items} items, full ranking")
    print(format_table({name: r["metrics"] for name, r in results.items()}))
    for name, r in results.items():
        line = f"{name}: {r['seconds_per_user']:.3f} s/user"
        if "match_shares" in r:
            sh = r["match_shares"]
            line += (f"; generations matching an item: {sh['any']:.3f} (4 fields {sh['level_4']:.3f}, 3 {sh['level_3']:.3f},"
                     f" 2 {sh['level_2']:.3f}, title {sh['level_1']:.3f}) of {sh['n']}")
        print(line)
    if edges:
        known = next(iter(results.values()))["metrics"]
        unknown = [m for m in args.bucket_metrics if m not in known]
        if unknown:
            raise ValueError(f"--bucket-metrics {unknown}: not among the evaluated metrics {sorted(known)}")
        print_buckets(results, args.bucket_metrics)
    if args.bucket_chart:
        from seqrec.plots import bucket_chart

        path = bucket_chart({name: r["buckets"] for name, r in results.items()}, args.bucket_metrics, args.bucket_chart,
                            f"{dataset.name} {args.split}: metrics by how often the target occurs in training")
        print(f"wrote {path}")
    if args.out:
        out = {"dataset": str(dataset_path), "split": args.split, "users": args.users, "mask_history": args.mask_history,
               "model_params": args.model_params, "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="full-ranking NDCG/Recall/MRR (optimistic and pessimistic ties) of models on a split"
    )
    p.add_argument("--dataset", default=None, help="a prepared dataset directory or its URI, file:// s3:// gs:// (default: the one a CALRec checkpoint records)")
    p.add_argument("--model", action="append", help="baseline name (mostpop, lir, lir_bm25, lir_text, markov) or checkpoint dir; repeatable")
    p.add_argument("--checkpoint", action="append", help="a trained model's checkpoint directory or its URI (s3://bucket/runs/<run>/checkpoint_...); repeatable")
    p.add_argument("--best-record", default=None,
                   help="a best record (best.json / summary.json path, its folder, or a name under --records-dir): "
                        "evaluates the checkpoint it names, with the scoring params saved in it (seqrec fit: the "
                        "chosen text_prior_weight), on the record's dataset unless --dataset is given")
    p.add_argument("--records-dir", default="runs/tune", help="where --best-record names are looked up")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--max-users", type=int, default=None, help="evaluate a seeded random subset of users")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--users", default="all", choices=USER_SUBSETS,
                   help="cold-target: only rows whose target item never occurs in training (cold start)")
    p.add_argument("--mask-history", action="store_true", help="exclude history items (except the target) from ranking")
    p.add_argument("--memory-budget-mb", type=float, default=256.0, help="memory for one chunk of scores")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--buckets", default=None, metavar="EDGES",
                   help="metrics by target popularity (occurrences in the training sequences) in buckets from these "
                        "lower edges, e.g. 1,5,20 -> 0 (cold), 1-4, 5-19, 20+ (the default); also in --out's JSON")
    p.add_argument("--bucket-chart", default=None, metavar="PNG",
                   help="write a grouped bar chart of the popularity buckets (one bar per model) to this PNG")
    p.add_argument("--bucket-metrics", default="ndcg@10/pes,recall@10/pes", type=lambda v: v.split(","),
                   help="metrics of the bucket lines and chart (comma-separated; default ndcg@10/pes,recall@10/pes)")
    p.add_argument("--model-param", action="append", metavar="KEY=VALUE",
                   help="override a checkpoint's model config for scoring, e.g. text_prior_weight=4 (SASRec, Bert4Rec, Flare); repeatable")
    p.add_argument("--critique", default=None, metavar="VARIANTS",
                   help="critiquing mode for one Flare checkpoint: variants among a,b,c,d,e (comma-separated, or 'all')")
    p.add_argument("--category-source", default=None,
                   help="critique mode: LC-Rec directory with proper category lists (default: the model's config)")
    p.add_argument("--dump-users", type=int, default=3, help="critique mode: users in the qualitative dump")
    p.set_defaults(func=_evaluate)
