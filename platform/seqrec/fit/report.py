"""The fit report as text: what `seqrec fit` prints at the end."""
from __future__ import annotations

from typing import Any

SHOWN = ("ndcg@10/pes", "recall@10/pes", "recall@1/pes", "mrr/pes")


def summary_text(report: dict[str, Any]) -> str:
    m, t, plan, prior = report["metrics"], report["time_s"], report["plan"], report["priors"]
    sized = {d["setting"]: d["value"] for d in report["sizing"]["decisions"]}  # later decisions win
    lines = [
        f"seqrec fit {report['model']} on {report['profile']['name']} (seed {report['seed']}): "
        f"{len(report['trials'])} trials in {t['search']:.0f} s of search, {t['budgeted']:.0f} s of the "
        f"{t['budget']:.0f} s budget" + (f" (+{t['text_features']:.0f} s text features)" if t["text_features"] >= 1 else ""),
        "  sized: " + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in sized.items()
                                if k in ("model.params.dim", "model.params.max_len", "model.params.dropout",
                                         "model.params.mask_prob", "train.steps", "train.batch_size")),
        f"  winner: trial {report['winner']['trial_id']} step {report['winner']['step']} "
        f"{ {k.split('.')[-1]: v for k, v in report['winner']['params'].items()} }",
        "  priors: " + (", ".join(f"{k}={v:g}" for k, v in prior["weights"].items()) or "none")
        + f" ({prior['reason']})",
        f"  throughput: {report['throughput']['probe_s_per_step']:.3f} s/step "
        f"({report['throughput']['probe_tokens_per_s']:.0f} tokens/s, probe); peak memory (PSS) "
        f"{report['memory']['peak_pss_mb']:.0f} MB",
        "  " + "  ".join(f"{k:>13s}" for k in ("split", *SHOWN)),
    ]
    for split in ("valid", "test"):
        lines.append("  " + "  ".join([f"{split:>13s}", *(f"{m[split][k]:13.4f}" for k in SHOWN)]))
    if plan["notes"]:
        lines.append("  budget: " + "; ".join(plan["notes"]))
    lines.append(f"  best record: {report['best_record']}")
    return "\n".join(lines)
