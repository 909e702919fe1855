"""Critiquing evaluation (FLARE 3.4, Tables 10-11): the test target's slot is masked and given a critique S.

Variants (the critique is a category path; the model sees critique_text(path)):
    a  the target's own category
    b  the target's category broadened to its parent (skipped when the parent is shallower than min_depth)
    c  made more specific: the child category of the target's (present in the catalog) with the most items
    d  a category from elsewhere in the user's history: the most recent history item whose category is not
       the target's nor an ancestor/descendant of it
    e  a category outside the user's history: a seeded random catalog category with >= outside_min_items items,
       unrelated to every history category and to the target's
Users for whom a variant has no critique are skipped for that variant (counted). Metrics go through the one
evaluator (full ranking, opt/pes), on the variant's eligible users, next to the same users without critique.
Critique adherence@k = share of the top-k whose category is the critique's or below it.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from seqrec.data.dataset import EvalRows
from seqrec.eval.evaluator import EvalSettings, evaluate
from seqrec.eval.metrics import ranking_metrics
from seqrec.models.flare import category_paths, critique_text, encode_critiques

log = logging.getLogger(__name__)

VARIANTS = {
    "a": "target's category",
    "b": "parent of target's category",
    "c": "child of target's category",
    "d": "category from the user's history",
    "e": "category outside the user's history",
}
Path_ = tuple[str, ...]


@dataclass
class CritiqueSettings:
    variants: tuple[str, ...] = ("a", "b", "c", "d", "e")
    top_k: int = 10
    min_depth: int = 2  # a parent critique must keep at least this many levels (the root alone says nothing)
    outside_min_items: int = 10  # (e) only picks categories that can fill a top-10
    n_dump: int = 3
    dump_k: int = 5
    seed: int = 0
    eval: EvalSettings = field(default_factory=EvalSettings)


def related(a: Path_, b: Path_) -> bool:
    """One path is a prefix of the other (same branch of the tree)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def matches(item_path: Path_, critique: Path_) -> bool:
    return len(critique) > 0 and item_path[: len(critique)] == critique


class CategoryIndex:
    def __init__(self, paths: list[list[str]]):
        self.paths: list[Path_] = [tuple(p) for p in paths]
        self.count: Counter = Counter()
        for p in self.paths:
            for d in range(1, len(p) + 1):
                self.count[p[:d]] += 1
        self.children: dict[Path_, list[Path_]] = defaultdict(list)
        for prefix in self.count:
            if len(prefix) > 1:
                self.children[prefix[:-1]].append(prefix)
        self.leaves = sorted(p for p in set(self.paths) if p)

    def adherence(self, top: np.ndarray, critique: Path_) -> float:
        return float(np.mean([matches(self.paths[i], critique) for i in top])) if len(top) else 0.0


def choose_critique(variant: str, history: np.ndarray, target: int, index: CategoryIndex, settings: CritiqueSettings,
                    rng: np.random.Generator) -> Path_ | None:
    p = index.paths[target]
    if not p:
        return None
    if variant == "a":
        return p
    if variant == "b":
        return p[:-1] if len(p) - 1 >= settings.min_depth else None
    if variant == "c":
        kids = index.children.get(p, [])
        return max(kids, key=lambda k: (index.count[k], k)) if kids else None
    if variant == "d":
        for h in history[::-1]:
            q = index.paths[int(h)]
            if q and not related(q, p):
                return q
        return None
    if variant == "e":
        seen = [index.paths[int(h)] for h in history] + [p]
        pool = [c for c in index.leaves if index.count[c] >= settings.outside_min_items
                and not any(related(c, s) for s in seen if s)]
        return pool[int(rng.integers(len(pool)))] if pool else None
    raise ValueError(f"unknown critique variant {variant!r}; expected one of {sorted(VARIANTS)}")


class CritiqueScorer:
    """The evaluator's Scorer: adds each row's critique tokens to the batch and records the top-k per user."""

    def __init__(self, model, tokens: torch.Tensor, mask: torch.Tensor, crit_of_user: dict[int, int], top_k: int):
        self.model, self.tokens, self.mask = model, tokens, mask
        self.crit_of_user, self.top_k = crit_of_user, top_k
        self.max_len = getattr(model, "max_len", None)
        self.top: dict[int, np.ndarray] = {}

    @torch.no_grad()
    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        users = batch["user_idx"].tolist()
        ids = torch.tensor([self.crit_of_user.get(u, -1) for u in users], dtype=torch.long)
        tok = self.tokens[ids.clamp(min=0)]
        mask = self.mask[ids.clamp(min=0)] & (ids >= 0)[:, None]  # -1 = no critique: all-False row
        scores = self.model.score_all({**batch, "critique_tokens": tok, "critique_mask": mask})
        top = scores.topk(min(self.top_k, scores.shape[1]), dim=1).indices.cpu().numpy()
        for u, t in zip(users, top):
            self.top[u] = t
        return scores


def evaluate_critiques(model, dataset, rows: EvalRows, encoder, settings: CritiqueSettings | None = None,
                       category_source: str | None = None) -> dict[str, Any]:
    """Metrics, adherence and a qualitative dump for every variant. `encoder`: the model's frozen encoder."""
    settings = settings or CritiqueSettings()
    if not getattr(model, "needs_item_features", False):
        raise ValueError("critique evaluation needs a model with a text path (Flare T+ID)")
    if len(set(rows.user_idx.tolist())) != len(rows):
        raise ValueError("critique evaluation needs one row per user")
    model.eval()
    index = CategoryIndex(category_paths(dataset, category_source))
    rng = np.random.default_rng(settings.seed)
    chosen: dict[str, list[Path_ | None]] = {
        v: [choose_critique(v, rows.histories[i], int(rows.targets[i]), index, settings, rng) for i in range(len(rows))]
        for v in settings.variants}
    uniq = sorted({c for cs in chosen.values() for c in cs if c is not None})
    crit_id = {c: i for i, c in enumerate(uniq)}
    texts = [critique_text(c) for c in uniq]
    tok_parts, mask_parts = [], []
    for lo in range(0, len(texts), 256):
        t, m = encode_critiques(texts[lo : lo + 256], encoder)
        tok_parts.append(t)
        mask_parts.append(m)
    width = max((t.shape[1] for t in tok_parts), default=1)
    tokens = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in tok_parts]) if tok_parts \
        else torch.zeros(1, 1, encoder.dim)
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in mask_parts]) if mask_parts \
        else torch.zeros(1, 1, dtype=torch.bool)

    base = CritiqueScorer(model, tokens, mask, {}, settings.top_k)
    base_res = evaluate(base, rows, dataset.n_items, settings.eval)
    users = rows.user_idx.tolist()
    target_adh = [index.adherence(base.top[u], index.paths[int(t)]) for u, t in zip(users, rows.targets)
                  if index.paths[int(t)]]
    table = {"none": {"users": len(rows), "skipped": 0, "critique": "-", **_pick(base_res.metrics),
                      "adherence@k (target category)": float(np.mean(target_adh)) if target_adh else float("nan")}}
    scorers = {"none": base}
    for v in settings.variants:
        keep = np.array([i for i, c in enumerate(chosen[v]) if c is not None], dtype=np.int64)
        if not len(keep):
            table[v] = {"users": 0, "skipped": len(rows), "critique": VARIANTS[v]}
            continue
        sub = rows.subset(keep)
        scorer = CritiqueScorer(model, tokens, mask, {users[i]: crit_id[chosen[v][i]] for i in keep}, settings.top_k)
        res = evaluate(scorer, sub, dataset.n_items, settings.eval)
        scorers[v] = scorer
        none_same = ranking_metrics(base_res.opt_ranks[keep], base_res.pes_ranks[keep],
                                    settings.eval.ndcg_ks, settings.eval.recall_ks)
        adh = [index.adherence(scorer.top[users[i]], chosen[v][i]) for i in keep]
        adh_none = [index.adherence(base.top[users[i]], chosen[v][i]) for i in keep]
        table[v] = {"users": int(len(keep)), "skipped": int(len(rows) - len(keep)), "critique": VARIANTS[v],
                    **_pick(res.metrics), **{f"{k} (no critique)": x for k, x in _pick(none_same).items()},
                    "adherence@k": float(np.mean(adh)), "adherence@k (no critique)": float(np.mean(adh_none))}
    dump = _dump(dataset, rows, chosen, scorers, index, settings)
    return {"top_k": settings.top_k, "n_rows": len(rows), "table": table, "dump": dump}


def _pick(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(("ndcg@10", "recall@10"))}


def _dump(dataset, rows, chosen, scorers, index: CategoryIndex, settings: CritiqueSettings) -> list[dict[str, Any]]:
    titles = dataset.items.column("title").to_pylist()
    users = rows.user_idx.tolist()
    complete = [i for i in range(len(rows)) if all(chosen[v][i] is not None for v in settings.variants)]
    pick = np.random.default_rng(settings.seed + 1).permutation(complete)[: settings.n_dump] if complete else []
    out = []
    for i in pick:
        u = users[int(i)]
        entry = {"user_idx": int(u),
                 "history": [titles[int(h)] for h in rows.histories[int(i)][-5:]],
                 "target": f"{titles[int(rows.targets[int(i)])]} [{' > '.join(index.paths[int(rows.targets[int(i)])])}]",
                 "top": {}}
        for v, scorer in scorers.items():
            crit = None if v == "none" else chosen[v][int(i)]
            items = scorer.top[u][: settings.dump_k]
            entry["top"][v] = {"critique": " > ".join(crit) if crit else None,
                               "items": [{"title": titles[int(j)], "category": " > ".join(index.paths[int(j)]),
                                          "matches": bool(crit and matches(index.paths[int(j)], crit)),
                                          "is_target": bool(int(j) == int(rows.targets[int(i)]))} for j in items]}
        out.append(entry)
    return out


def format_critique_report(result: dict[str, Any]) -> str:
    k = result["top_k"]
    cols = ["users", "ndcg@10/pes", "recall@10/opt", "recall@10/pes", "recall@10/pes (no critique)",
            "ndcg@10/pes (no critique)", "adherence@k", "adherence@k (no critique)"]
    lines = ["variant  " + "  ".join(c.replace("@k", f"@{k}") for c in cols) + "  critique"]
    for v, row in result["table"].items():
        cells = []
        for c in cols:
            x = row.get(c, row.get("adherence@k (target category)") if c == "adherence@k" and v == "none" else None)
            cells.append(("-" if x is None else (f"{x}" if isinstance(x, int) else f"{x:.4f}")).rjust(len(c.replace("@k", f"@{k}"))))
        lines.append(f"{v:<8} " + "  ".join(cells) + f"  {row.get('critique', '')}")
    lines.append("(none row: adherence to the target's own category; 'no critique' columns: the same users without S)")
    for entry in result["dump"]:
        lines.append(f"\n--- user {entry['user_idx']}: target {_short(entry['target'], 110)}")
        lines.append("  history (last 5): " + " | ".join(_short(t, 45) for t in entry["history"]))
        for v, top in entry["top"].items():
            head = "no critique" if v == "none" else f"({v}) {top['critique']}"
            lines.append(f"  {head}")
            for it in top["items"]:
                mark = ("*" if it["is_target"] else " ") + ("+" if it["matches"] else " ")
                lines.append(f"    {mark} {_short(it['title'], 70)}  [{_short(it['category'], 70)}]")
    if result["dump"]:
        lines.append("(* = the target, + = in the critique's category)")
    return "\n".join(lines)


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def run_critique_cli(args, models: list[str]) -> int:
    """`seqrec evaluate --critique a,b,c,d,e --checkpoint DIR --dataset D [--max-users N] [--out F]`."""
    import json
    from pathlib import Path

    from seqrec.data.dataset import PreparedDataset
    from seqrec.eval.cli import build_scorer, seeded_user_subset
    from seqrec.features.encoder import FrozenTextEncoder

    if len(models) != 1:
        raise SystemExit("--critique evaluates exactly one Flare checkpoint (--checkpoint DIR)")
    variants = tuple(VARIANTS) if args.critique == "all" else tuple(v.strip() for v in args.critique.split(",") if v.strip())
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise SystemExit(f"--critique: unknown variants {bad}; expected a comma-separated subset of {sorted(VARIANTS)} or 'all'")
    if not args.dataset:
        raise SystemExit("--critique needs --dataset")
    dataset = PreparedDataset.load(args.dataset)
    model = build_scorer(models[0], dataset, getattr(args, "model_params", None))
    if not getattr(model, "needs_item_features", False):
        raise SystemExit(f"{models[0]} is not a model with a text path; critiques need Flare T+ID")
    rows = dataset.eval_rows(args.split)
    rows = seeded_user_subset(rows, args.max_users, args.seed)
    encoder = FrozenTextEncoder.load(model.config.encoder, max_tokens=model.config.max_text_tokens)
    settings = CritiqueSettings(variants=variants, n_dump=args.dump_users, seed=args.seed,
                                eval=EvalSettings(mask_history=args.mask_history, memory_budget_mb=args.memory_budget_mb))
    source = args.category_source or model.config.category_source
    result = evaluate_critiques(model, dataset, rows, encoder, settings, source)
    print(f"dataset {dataset.name}: {len(rows)} {args.split} rows, {dataset.n_items} items, full ranking, critiques")
    print(format_critique_report(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"dataset": str(args.dataset), "checkpoint": models[0], "split": args.split,
                                              **result}, indent=2))
        print(f"wrote {args.out}")
    return 0
