"""CALRec: template, each loss term against a hand computation, sampling log-probs, retrieval scorers,
checkpoints, and the two-stage run on Ray Train (tiny random Llama, SmolLM2's tokenizer, no hub).

QRR on hand-made corpora and BM25 parity with rank-bm25 are in test_qrr.py / test_bm25.py; hierarchical
matching in test_matching.py.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from seqrec.data.batching import make_batch
from seqrec.models.calrec import (
    HEAD,
    NEXT,
    CALRec,
    CALRecConfig,
    PromptBuilder,
    info_nce,
    sample_completions,
    sample_training_examples,
)

TEXTS = [
    "Title: Red gel pen Category: Office > Pens Brand: Bic Price: $1.00",
    "Title: Blue ink cartridge Category: Office > Ink Brand: Unknown Price: Unknown",
    "Title: Student microscope Category: Lab > Optics Brand: Zeiss Price: $500.00",
    "Title: Lab goggles Category: Lab > Safety Brand: 3M Price: $9.99",
    "Title: Lab goggles Category: Lab > Safety Brand: 3M Price: $9.99",  # a duplicate item text (ties)
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = CALRecConfig(lm="tiny", tiny_dim=32, tiny_layers=2, tiny_heads=2, max_seq_tokens=192, n_gen=3,
                       max_new_tokens=6, gen_batch_users=2)
    return CALRec(cfg, len(TEXTS)).attach_catalog(TEXTS)


def test_template_text_and_tokens_agree(tiny):
    b = tiny.prompts
    assert b.prompt_text(TEXTS[:2]) == (
        "This is the summary of a user's purchase history. The first item bought is as follows. " + TEXTS[0]
        + "\nThe next item bought is as follows. " + TEXTS[1] + "\nThe next item bought is as follows.")
    assert b.prompt_text([]) == HEAD and b.prompt_text(TEXTS[:1]) == HEAD + " " + TEXTS[0] + NEXT
    toks = tiny.catalog.item_tokens
    ids, p, tgt = b.train_example([toks[0], toks[1]], toks[2])
    decoded = tiny.tokenizer.decode(ids)
    assert decoded == b.prompt_text(TEXTS[:2]) + b.completion_text(TEXTS[2]) + tiny.tokenizer.eos_token
    assert ids[p:] == tgt + [b.eos] and tiny.tokenizer.decode(ids[:p]) == b.prompt_text(TEXTS[:2])


def test_template_keeps_most_recent_items_within_budget(tiny):
    toks = tiny.catalog.item_tokens
    small = PromptBuilder(tiny.tokenizer, max_seq_tokens=len(tiny.prompts.head) + 2 * (len(toks[2]) + len(tiny.prompts.next)) + 3,
                          max_item_tokens=128)
    ids = small.prompt_ids([toks[0], toks[1], toks[2]])
    text = tiny.tokenizer.decode(ids)
    assert TEXTS[0] not in text and TEXTS[1] in text and TEXTS[2] in text
    assert text == small.prompt_text(TEXTS[1:3]) and len(ids) <= small.max_seq_tokens
    assert small.prompt_ids([]) == small.head


def test_augmentation_drops_last_k(tiny):
    toks = tiny.catalog.item_tokens
    seq = np.array([0, 1, 2, 3, 4, 0, 1, 2])
    rng = np.random.default_rng(0)
    wide = PromptBuilder(tiny.tokenizer, max_seq_tokens=4096, max_item_tokens=128)  # no history truncation here
    ex = sample_training_examples([seq, np.array([3])], toks, wide, 200, drop_last_max=4, rng=rng)
    seen_k = set()
    for ids, p, tgt in ex:
        text = tiny.tokenizer.decode(ids[:p])
        n_hist = text.count("item bought is as follows.") - 1  # head + one separator per history item
        k = len(seq) - 1 - n_hist
        seen_k.add(k)
        assert tgt == toks[seq[len(seq) - k - 1]]  # the new last item is the target
        assert text == wide.prompt_text([TEXTS[i] for i in seq[: len(seq) - k - 1]])
    assert seen_k == {0, 1, 2, 3, 4}  # the 1-item user is never drawn (nothing to predict from)


def test_info_nce_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    # cosines: q0.k0 = 1, q0.k1 = 1/sqrt2, q1.k0 = 0, q1.k1 = 1/sqrt2
    c = 1 / math.sqrt(2)
    l0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(c / tau)))
    l1 = -math.log(math.exp(c / tau) / (math.exp(0) + math.exp(c / tau)))
    assert float(info_nce(q, k, tau)) == pytest.approx((l0 + l1) / 2, rel=1e-6)


def _examples(tiny):
    t = tiny.catalog.item_tokens
    return [tiny.prompts.train_example([t[0], t[1]], t[2]), tiny.prompts.train_example([t[2]], t[3]),
            tiny.prompts.train_example([t[3], t[0], t[2]], t[1])]


def test_loss_terms_match_hand_computation(tiny):
    examples = _examples(tiny)
    batch = tiny.prompts.collate_train(examples)
    cfg = tiny.config
    lm = tiny.lm.eval()
    with torch.no_grad():
        terms = tiny.loss_terms(batch)
        nig_nll, v_tu, v_u, v_t = [], [], [], []
        for ids, p, tgt in examples:  # one user at a time, no padding, full logits
            x = torch.tensor([ids])
            out = lm(input_ids=x, output_hidden_states=True)
            logp = torch.log_softmax(out.logits[0].float(), -1)
            nig_nll += [-logp[i - 1, ids[i]] for i in range(p, len(ids))]  # target tokens and EOS
            h = out.hidden_states[-1][0]
            v_tu.append(h[p : p + len(tgt)].mean(0))
            v_u.append(h[:p].mean(0))
            v_t.append(lm(input_ids=torch.tensor([tgt]), output_hidden_states=True).hidden_states[-1][0].mean(0))
        nig = torch.stack(nig_nll).mean()

        def nce(a, b):
            a, b = torch.stack(a), torch.stack(b)
            sims = torch.tensor([[float(x @ y / (x.norm() * y.norm())) for y in b] for x in a]) / cfg.tau_c
            return -torch.stack([sims[i, i] - torch.logsumexp(sims[i], 0) for i in range(len(a))]).mean()

        tt, ut = nce(v_tu, v_t), nce(v_u, v_t)
    assert float(terms["nig"]) == pytest.approx(float(nig), rel=1e-4)
    assert float(terms["tt"]) == pytest.approx(float(tt), rel=1e-4)
    assert float(terms["ut"]) == pytest.approx(float(ut), rel=1e-4)
    expected = (1 - cfg.alpha - cfg.beta) * nig + cfg.alpha * tt + cfg.beta * ut
    assert float(terms["loss"]) == pytest.approx(float(expected), rel=1e-4)
    assert (cfg.alpha, cfg.beta, cfg.tau_c) == (0.125, -0.025, 0.5)


def test_loss_without_contrastive_terms_is_nig(tiny):
    batch = tiny.prompts.collate_train(_examples(tiny))
    a, b = tiny.config.alpha, tiny.config.beta
    try:
        tiny.config.alpha = tiny.config.beta = 0.0
        terms = tiny.loss_terms(batch)
        assert "tt" not in terms and float(terms["loss"].detach()) == pytest.approx(float(terms["nig"].detach()))
        terms["loss"].backward()  # gradients flow through the sliced LM head
        assert tiny.lm.get_input_embeddings().weight.grad is not None
    finally:
        tiny.config.alpha, tiny.config.beta = a, b
        tiny.lm.zero_grad(set_to_none=True)


def test_sampled_logprobs_equal_teacher_forced(tiny):
    """KV-cached, left-padded, repeated-cache sampling: each sample's log-prob equals a fresh full forward's."""
    t = tiny.catalog.item_tokens
    prompts = [tiny.prompts.prompt_ids([t[0], t[1], t[2]]), tiny.prompts.prompt_ids([t[3]])]  # different lengths
    lm = tiny.lm.eval()
    g = torch.Generator().manual_seed(3)
    tokens, lengths, lps = sample_completions(lm, prompts, n_gen=3, temperature=0.5, max_new_tokens=6,
                                              eos=tiny.prompts.eos, pad=tiny.prompts.pad, generator=g)
    assert tokens.shape[0] == 6 and lps.dtype == torch.float64
    with torch.no_grad():
        for r in range(6):
            prompt, gen = prompts[r // 3], tokens[r, : int(lengths[r])].tolist()
            logp = torch.log_softmax(lm(input_ids=torch.tensor([prompt + gen])).logits[0].float(), -1)
            ref = sum(float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(gen))
            assert float(lps[r]) == pytest.approx(ref, abs=2e-3)
    g2 = torch.Generator().manual_seed(3)
    again = sample_completions(lm, prompts, 3, 0.5, 6, tiny.prompts.eos, tiny.prompts.pad, g2)
    assert torch.equal(again[0], tokens)


def test_sampling_stops_at_eos(tiny):
    """An LM whose EOS logit dominates ends every sample after one token; log-prob is that token's only."""
    lm = tiny.lm.eval()
    head = lm.get_output_embeddings()
    saved = head.weight.data[tiny.prompts.eos].clone()
    try:
        head.weight.data[tiny.prompts.eos] = 0.0
        if getattr(head, "bias", None) is None:
            # push EOS up through the final norm's output direction: align its row with the mean hidden state
            with torch.no_grad():
                h = lm.base_model(input_ids=torch.tensor([tiny.prompts.head])).last_hidden_state[0, -1]
            head.weight.data[tiny.prompts.eos] = 1e3 * h / h.norm() ** 2
        tokens, lengths, lps = sample_completions(lm, [tiny.prompts.head], 4, 0.5, 6, tiny.prompts.eos, tiny.prompts.pad)
        assert lengths.tolist() == [1, 1, 1, 1] and (tokens[:, 0] == tiny.prompts.eos).all()
        assert torch.all(lps <= 0) and torch.all(lps > -1e-3)
    finally:
        head.weight.data[tiny.prompts.eos] = saved


def test_scorers_rank_known_generations(tiny):
    """Retrieval on injected samples: QRR puts the best sample's BM25 top-1 first; exact match finds both
    copies of a duplicated text (a tie) and reports the share of matching generations."""
    batch = make_batch([np.array([0]), np.array([2, 1])], np.array([2, 3]))
    tiny.reset_samples()
    tiny._gen_cache[(0,)] = (["Title: Student microscope Category: Lab > Optics Brand: Zeiss Price: $500.00",
                              "Title: Red gel pen"], [-1.0, -3.0])
    tiny._gen_cache[(2, 1)] = (["Title: Lab goggles Category: Lab > Safety Brand: 3M Price: $9.99",
                                "Title: nothing like it"], [-2.0, -0.5])
    views = tiny.scorers()
    qrr = views["calrec_qrr_bm25"].score_all(batch)
    assert qrr.shape == (2, len(TEXTS)) and qrr.dtype == torch.float64
    assert int(qrr[0].argmax()) == 2 and float(qrr[0, 2]) == pytest.approx(math.exp(-1.0 / 5000))
    assert float(qrr[1, 3]) == float(qrr[1, 4]) == float(qrr[1].max())  # identical texts tie
    match = views["calrec_match"]
    m = match.score_all(batch)
    assert float(m[0, 2]) > float(m[0, 0]) > float("-inf") and torch.isinf(m[0, [1, 3, 4]]).all()
    assert float(m[1, 3]) == float(m[1, 4]) > float("-inf") and torch.isinf(m[1, :3]).all()
    shares = match.match_report()
    assert shares["n"] == 4 and shares["any"] == pytest.approx(0.75) and shares["level_4"] == pytest.approx(0.5)
    from seqrec.eval.evaluator import evaluate
    from seqrec.data.dataset import EvalRows

    rows = EvalRows(user_idx=np.array([0, 1]), histories=[np.array([0]), np.array([2, 1])], targets=np.array([2, 3]))
    res = evaluate(match, rows, len(TEXTS))
    assert res.opt_ranks.tolist() == [1, 1] and res.pes_ranks.tolist() == [1, 2]  # the duplicate ties
    tiny.reset_samples()


def test_real_sampling_through_score_all(tiny):
    batch = make_batch([np.array([0, 1]), np.array([3])], np.array([2, 0]))
    tiny.reset_samples()
    scores = tiny.score_all(batch)
    gens = tiny.generations(batch)
    assert scores.shape == (2, len(TEXTS)) and torch.isfinite(scores).all()
    assert [len(g[0]) for g in gens] == [3, 3] and all(lp < 0 for g in gens for lp in g[1])
    assert not any("\n" in text for g in gens for text in g[0])  # a newline ends a sample
    assert len(tiny.newline_ids()) > 0 and all("\n" in tiny.tokenizer.decode([i]) for i in tiny.newline_ids().tolist())
    tiny.reset_samples()


def test_checkpoint_roundtrip(tiny, tmp_path):
    from dataclasses import asdict

    from seqrec.models.registry import load_model
    from seqrec.train.checkpoint import save_model_files

    save_model_files(tiny, tmp_path, {"model_name": "calrec", "model": asdict(tiny.config), "n_items": len(TEXTS)})
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model"]["lm_config"]["model_type"] == "llama"
    loaded, _ = load_model(tmp_path)
    batch = tiny.prompts.collate_train(_examples(tiny))
    with torch.no_grad():
        assert float(loaded.loss_terms(batch)["loss"]) == pytest.approx(float(tiny.eval().loss_terms(batch)["loss"]), rel=1e-6)
    assert loaded.lm.get_output_embeddings().weight.data_ptr() == loaded.lm.get_input_embeddings().weight.data_ptr()
    with pytest.raises(ValueError, match="attach_catalog"):
        loaded.score_all(make_batch([np.array([0])], np.array([1])))
    with pytest.raises(ValueError, match="catalog has"):
        loaded.attach_catalog(TEXTS[:2])


def test_sampling_weights_and_config_errors():
    from seqrec.train.staged_loop import StageData, load_staged_config, resolve_data, sampling_weights

    w = sampling_weights([1000, 10], 0.3)
    assert w == pytest.approx(np.array([1000**0.3, 10**0.3]) / (1000**0.3 + 10**0.3))
    cfg = load_staged_config("calrec_tiny", {"stages.1.train.steps": 7, "model.params.n_gen": 2})
    assert cfg.stages[1].train.steps == 7 and cfg.model.params["n_gen"] == 2 and len(cfg.stages[0].datasets) == 2
    with pytest.raises(ValueError, match="exactly one"):
        resolve_data(StageData())
    with pytest.raises(ValueError, match="retrieval"):
        CALRecConfig(retrieval="dense")


def test_two_stage_training_and_evaluate_cli(ray_session, scientific_dataset, demo_dataset, tmp_path, capsys):
    """`seqrec train --config calrec_tiny`: stage 1 on Scientific + demo, stage 2 on Scientific from stage 1's
    checkpoint, test subset with QRR-BM25, hierarchical match and LIR-BM25; then `seqrec evaluate`."""
    from seqrec.cli import main

    sci, demo = str(scientific_dataset.path), str(demo_dataset.path)
    rc = main(["train", "--config", "calrec_tiny",
               "--set", f"stages.0.datasets=[{{path: {sci}}}, {{path: {demo}}}]",
               "--set", f"stages.1.datasets=[{{path: {sci}}}]",
               "--set", "stages.0.train.steps=4", "--set", "stages.1.train.steps=3",
               "--set", "stages.0.train.valid_max_rows=2", "--set", "stages.1.train.valid_max_rows=2",
               "--set", "eval_max_users=4", "--set", f"run.storage_path={tmp_path}", "--set", "run.name=t"])
    assert rc == 0
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    s1, s2 = summary["stages"]
    assert s1["datasets"] == [sci, demo] and s2["datasets"] == [sci] and s1["final_step"] == 4 and s2["final_step"] == 3
    assert summary["best_checkpoint"] == s2["best_checkpoint"]
    out = capsys.readouterr().out
    assert f"initialised from {s1['best_checkpoint']}" in out and "sampling rates" in out
    test = summary["test"]
    assert set(test) == {"calrec_qrr_bm25", "calrec_match", "lir_bm25"}
    for r in test.values():
        assert r["n_rows"] == 4 and {"ndcg@10/opt", "ndcg@10/pes", "recall@1/pes", "recall@10/pes", "mrr/pes"} <= set(r["metrics"])
        assert r["metrics"]["ndcg@10/opt"] >= r["metrics"]["ndcg@10/pes"]
    assert test["calrec_match"]["match_shares"]["n"] == 4 * 4  # n_gen samples per user
    meta = json.loads((Path(s2["best_checkpoint"]) / "config.json").read_text())
    assert meta["model_name"] == "calrec" and meta["dataset_path"] == sci

    rc = main(["evaluate", "--checkpoint", s2["best_checkpoint"], "--max-users", "3", "--out", str(tmp_path / "e.json")])
    assert rc == 0
    res = json.loads((tmp_path / "e.json").read_text())["results"]
    assert set(res) == {"calrec_qrr_bm25", "calrec_match", "lir_bm25"} and res["lir_bm25"]["n_rows"] == 3
    assert "generations matching an item" in capsys.readouterr().out
    check_pipeline_benchmark(s2["best_checkpoint"], sci, tmp_path / "pipeline")


def check_pipeline_benchmark(checkpoint: str, dataset: str, work: Path) -> None:
    """benchmarks/bench_calrec_pipeline.py evaluate + report on a trained checkpoint: 6 test users in chunks of 4;
    a lost chunk is scored again with the same ranks (each chunk's sampling RNG is seeded by the chunk); the report
    computes the metrics from the stored ranks, and its lir_bm25 equals `seqrec evaluate --max-users 6`'s."""
    from conftest import load_benchmark
    from seqrec.eval.cli import run_evaluation

    bench = load_benchmark("bench_calrec_pipeline")
    evaluate = ["evaluate", "--work", str(work), "--checkpoint", checkpoint, "--users", "6", "--chunk-users", "4"]
    bench.main(evaluate)
    chunks = sorted((work / "chunks").glob("*.json"))
    assert [p.name for p in chunks] == ["0000.json", "0001.json"]
    first = json.loads(chunks[1].read_text())
    n_gen = first["identity"]["sampling"]["n_gen"]
    assert len(first["users"]) == 2 and len(first["generations"]) == 2 * n_gen
    chunks[1].unlink()
    bench.main(evaluate)
    again = json.loads(chunks[1].read_text())
    assert again["views"]["calrec_qrr_bm25"]["pes"] == first["views"]["calrec_qrr_bm25"]["pes"]
    assert again["generations"] == first["generations"]
    with pytest.raises(SystemExit, match="use another --work"):  # other sampling settings over the same chunks
        bench.main(evaluate + ["--n-gen", str(n_gen + 1)])

    out = work / "result.json"
    bench.main(["report", "--work", str(work), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["complete"] and result["n_users"] == 6 and result["match_shares"]["n"] == 6 * n_gen
    assert result["stages"] == {} and result["train_args"] is None  # trained elsewhere: no train.json
    _, reference = run_evaluation(dataset, ["lir_bm25"], "test", 6, 0)
    for key in ("ndcg@10/opt", "ndcg@10/pes", "recall@10/pes", "mrr/pes"):
        assert result["metrics"]["lir_bm25"][key] == pytest.approx(reference["lir_bm25"]["metrics"][key])
    for view in ("calrec_qrr_bm25", "calrec_match"):
        m = result["metrics"][view]
        assert 0 <= m["ndcg@10/pes"] <= m["ndcg@10/opt"] <= 1
    with pytest.raises(SystemExit, match="no train.json"):
        bench.main(["report", "--work", str(work), "--out", str(out), "--register"])


def test_pipeline_benchmark_train_overrides():
    """bench_calrec_pipeline.py train: the preset with the given steps, one validation at each stage's end."""
    from conftest import load_benchmark
    from seqrec.train.staged_loop import load_staged_config

    bench = load_benchmark("bench_calrec_pipeline")
    args = argparse.Namespace(stage1_steps=30, stage2_steps=12, valid_users=16, n_gen=8, max_new_tokens=40,
                              gen_batch_users=None, temperature=None, lm=None, set=["stages.1.train.lr=2.0e-5"])
    cfg = load_staged_config(bench.PRESET, bench.train_overrides(args, Path("/tmp/w")))
    s1, s2 = (st.train for st in cfg.stages)
    assert (s1.steps, s1.eval_every, s1.valid_max_rows, s1.warmup_steps) == (30, 30, 16, 3)
    assert (s2.steps, s2.eval_every, s2.warmup_steps, s2.lr) == (12, 12, 1, 2.0e-5)
    assert cfg.model.params["n_gen"] == 8 and cfg.model.params["max_new_tokens"] == 40
    assert cfg.model.params["gen_batch_users"] == 2  # the preset's, not overridden
    assert not cfg.run.test and cfg.run.storage_path == "/tmp/w/train"

