"""Flare T+ID (FLARE sections 3.2-3.5): Bert4Rec over c_i = e_i + t_i, where e_i is the item's ID embedding and
t_i a Perceiver summary of the item text's frozen-encoder token embeddings; trained with the cloze (MLM) loss
plus an ID-text InfoNCE with an additive margin; optional critiques S as an extra Perceiver modality.

Where this departs from / fills in the paper (and why):
  * Cost: t_i is computed only for the unique items of the batch (never the whole catalog per step). The output
    softmax is over the tied ID table e (FLARE predicts IDs); the contrastive loss aligns e_i with t_i. At eval
    time t for every item is computed once (no grad, in chunks) and cached until the next train() call.
  * Masked positions: e_mask + t_mask, both learned (the paper: "the mask embedding for both ID and text").
    With a critique, the text part is Perceiver(S) instead of t_mask: ID and T are masked, S stays visible.
    Critiques are attached to masked positions only (at visible positions T already contains the category).
    Training critiques (prob `critique_prob` per masked position) are the target's category path cut to a
    random depth >= `critique_min_depth`, so broader (parent) critiques are seen in training too.
  * Contrastive (eq. 2): cosine similarities over the batch's unique items, s_ii - margin on the positive,
    divided by tau, cross-entropy in both directions (e->t and t->e) averaged. Total loss
    alpha * MLM + (1 - alpha) * contrastive; with contrastive off the loss is the MLM alone. The alignment pulls
    e_i onto t_i's direction (median cosine 0.95 after training on Scientific).
    `frequent_weight` (our option; 1 = the paper) scales the InfoNCE rows of items with >= `frequent_min_count`
    training occurrences: 0 takes popular items out as anchors (they stay in-batch negatives), so their IDs are
    free to memorise while rare items keep the text alignment (the shipped Scientific preset).
  * Cold start: items with text but no trained ID (never in the training sequences, or added later with
    add_items) use the learned "unknown ID" embedding e_unk + t_i at the input. Their OUTPUT row is
    t_i / |t_i| * median_j |e_j| over trained IDs (the contrastive loss aligns e_i's direction with t_i's; the
    median norm puts them on the trained rows' scale) with the median trained output bias. e_unk is trained
    by replacing visible trained IDs with it at rate `id_dropout`, so the model learns to read t_i alone.
  * Scale: t_i starts on the ID embeddings' scale (perceiver.py: the output layer's init), so that c = e + t is
    not mostly text at the start; `text_norm` pins every t_i to a constant norm (the text's weight against the ID
    set by hand).
  * Item token features are catalog data, not weights: they are not in the checkpoint. The config keeps the
    encoder name and token limit; `load_flare_features(model, dataset)` attaches them (training loop,
    evaluator CLI, serving).
  * Text-similarity prior (`text_prior_weight`, our option, off by default; models/text_prior.py, shared with
    the ID models): score_all adds w * cos(x_last, x_j) of the frozen encoder's mean-pooled features (lir_text's
    score), pooled from the model's own item token features; the trained text path ranks rare targets below
    what that similarity alone does.
  * Item text: the dataset's key-value text (title, category, brand, price).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqrec.features.cache import pooled_tokens
from seqrec.models import text_prior, transition_prior
from seqrec.models.bert4rec import cloze_mask
from seqrec.models.chunked_softmax import chunked_cross_entropy, chunked_scores
from seqrec.models.layers import Encoder, attention_mask, encode_queries, keep_recent, run_blocks
from seqrec.models.perceiver import TYPE_CRITIQUE, TYPE_TEXT, PerceiverResampler

log = logging.getLogger(__name__)


@dataclass
class FlareConfig:
    max_len: int = 50  # history items read at inference; positions = max_len + 1
    dim: int = 64
    layers: int = 2
    heads: int = 2
    hidden: int = 256
    dropout: float = 0.2
    attn_dropout: float = 0.2
    init_std: float = 0.02
    mask_prob: float = 0.15
    last_only_prob: float = 0.1
    output_bias: bool = True
    loss_chunk_items: int = 16384
    max_logit_elems: int = 2**24
    # text path
    use_text: bool = True  # False = the "no text" ablation (a Bert4Rec with this model's ID handling)
    perceiver_latents: int = 2
    perceiver_layers: int = 2
    perceiver_heads: int = 8
    perceiver_dim: int = 256
    text_norm: float | None = None  # a constant norm for every t_i and critique hint (not learned); None = free
    contrastive: bool = True
    alpha: float = 0.5
    tau: float = 0.3
    margin: float = 0.2
    # our option, not the paper's: items with >= frequent_min_count training occurrences weigh frequent_weight in
    # the ID-text InfoNCE (1.0 = the paper). Measured (docs/models/flare.md): 0 (frequent
    # items' rows leave the InfoNCE; they stay in-batch negatives) helps. The counts come from the training split.
    frequent_weight: float = 1.0
    frequent_min_count: int = 20
    # our option, not the paper's: the text-similarity prior at scoring (models/text_prior.py), score_j +=
    # text_prior_weight * cos(x_last, x_j) of the mean-pooled frozen-encoder features (lir_text's score), pooled
    # from this model's own item features. Why: on Scientific lir_text alone ranks rare targets (1-4 training
    # occurrences) 2-3x better than the trained text path does (docs/models/flare.md).
    text_prior_weight: float = 0.0
    # our option too: score_j += transition_prior_weight * log(1 + count(last -> j)) of the training transitions
    # (models/transition_prior.py, the markov baseline's evidence), chosen on validation; 0 = off
    transition_prior_weight: float = 0.0
    encoder: str = "minilm"  # frozen encoder name or local path (features come from the feature cache)
    max_text_tokens: int = 64
    text_dim: int | None = None  # encoder hidden size; None = read from the encoder's config at build time
    id_dropout: float = 0.05  # visible trained IDs replaced by e_unk (trains the cold-start input)
    # critiques
    critique_prob: float = 0.0  # per masked position in training; 0 = no critique training
    critique_min_depth: int = 2  # shortest category prefix used as a training critique
    category_source: str | None = None  # LC-Rec directory with proper category lists (matched by title)
    text_chunk_items: int = 1024  # items per Perceiver call when caching t for the whole catalog


# ------------------------------------------------------------------------------------------- losses
def info_nce_margin(e: torch.Tensor, t: torch.Tensor, tau: float, margin: float,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between rows of e (U, D) and t (U, D): positives on the diagonal, margin subtracted
    from the positive cosine before the temperature. weight (U,) scales item i's two row losses (anchor e_i over
    all t, anchor t_i over all e); the mean stays over U rows, so weight 1 everywhere is the plain loss and
    weight < 1 only removes pull."""
    sim = F.normalize(e.float(), dim=-1) @ F.normalize(t.float(), dim=-1).t()  # (U, U) cosines
    sim = (sim - margin * torch.eye(sim.shape[0], device=sim.device)) / tau
    labels = torch.arange(sim.shape[0], device=sim.device)
    rows = F.cross_entropy(sim, labels, reduction="none") + F.cross_entropy(sim.t(), labels, reduction="none")
    if weight is None:
        return 0.5 * rows.mean()
    return 0.5 * (rows * weight.to(rows.dtype)).mean()


# ---------------------------------------------------------------------------------------- critiques
def critique_text(levels: Sequence[str]) -> str:
    """The critique string for a category path (also what serving should send for a category critique)."""
    return "Category: " + " > ".join(levels)


_WORDS = re.compile(r"\W+")


def _norm_title(s: str | None) -> str:
    return _WORDS.sub(" ", (s or "").lower()).strip()


def _segment(joined: str, vocab: set[str], max_words: int) -> list[str] | None:
    """Greedy longest-match split of a space-joined category path into known level names (None if it fails)."""
    words, out, i = joined.split(), [], 0
    while i < len(words):
        for j in range(min(len(words), i + max_words), i, -1):
            if " ".join(words[i:j]) in vocab:
                out.append(" ".join(words[i:j]))
                i = j
                break
        else:
            return None
    return out


def category_paths(dataset, source: str | Path | None = None) -> list[list[str]]:
    """Per item, its category path as a list of levels (root first; [] when unknown).

    Items whose `categories` already hold several levels are used as they are. UniSRec's text has one
    space-joined string per item; with `source` (an LC-Rec directory of the same catalog) the levels come from
    the LC-Rec item with the same normalised title, else from a greedy split into LC-Rec's level names, else
    the whole string is one level.
    """
    cats = dataset.items.column("categories").to_pylist()
    titles = dataset.items.column("title").to_pylist()
    by_title: dict[str, list[str]] = {}
    vocab: set[str] = set()
    if source:
        from seqrec.data.lcrec import read_item_records, split_categories

        for value in read_item_records(source, "category_source"):
            levels = split_categories(value.get("categories") or "")
            if levels:
                by_title.setdefault(_norm_title(value.get("title")), levels)
                vocab.update(levels)
    max_words = max((len(v.split()) for v in vocab), default=1)
    out, stats = [], {"levels": 0, "title": 0, "split": 0, "whole": 0, "none": 0}
    for c, title in zip(cats, titles):
        c = [x for x in (c or []) if x]
        if len(c) > 1:
            out.append(list(c)); stats["levels"] += 1
        elif not c:
            out.append([]); stats["none"] += 1
        elif _norm_title(title) in by_title and " ".join(by_title[_norm_title(title)]) == c[0]:
            out.append(list(by_title[_norm_title(title)])); stats["title"] += 1
        elif vocab and (seg := _segment(c[0], vocab, max_words)):
            out.append(seg); stats["split"] += 1
        else:
            out.append([c[0]]); stats["whole"] += 1
    log.info("category paths of %d items: %s", len(out), stats)
    return out


@dataclass
class CritiqueTable:
    """Training critiques: every category prefix (depth >= min_depth) encoded once; item -> its prefixes."""

    tokens: torch.Tensor  # (C, Tc, Dt) float16
    mask: torch.Tensor  # (C, Tc) bool
    item_prefixes: torch.Tensor  # (N, max_depth) long, prefix id by depth (shallowest first), -1 = none


class CritiqueCache:
    """LRU of encoded critique texts for serving: text -> (tokens (T, D), mask (T,)), trimmed after its last real
    token. The encoder is frozen, so a cached row is the text's encoding (equal to a fresh one up to the float
    noise of a different batch shape; padding is masked out downstream). Critiques repeat in practice (category
    names, stock phrases), and one MiniLM forward costs ~15 ms of CPU, the bulk of a critique request."""

    def __init__(self, max_entries: int = 4096):
        import threading
        from collections import OrderedDict

        self.max_entries = max_entries
        self._rows: "OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
        self._hints: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def lookup(self, texts: Sequence[str], encoder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        unique = list(dict.fromkeys(texts))
        with self._lock:
            found = {t: self._rows[t] for t in unique if t in self._rows}
            for t in found:
                self._rows.move_to_end(t)
        missing = [t for t in unique if t not in found]
        if missing:
            tok, mask = encoder.encode(missing)
            for j, t in enumerate(missing):
                real = mask[j].nonzero()
                n = int(real[-1]) + 1 if len(real) else 1
                found[t] = (tok[j, :n].float().cpu(), mask[j, :n].cpu())
            with self._lock:
                for t in missing:
                    self._rows[t] = found[t]
                while len(self._rows) > self.max_entries:
                    self._rows.popitem(last=False)
        with self._lock:
            self.hits += len(texts) - len(missing)
            self.misses += len(missing)
        return found

    def hints(self, texts: Sequence[str], encoder, model: "Flare") -> torch.Tensor:
        """(B, D): the model's critique hint vector (its Perceiver over the critique tokens) per text. One cache
        serves one loaded model (serving creates it with the model), so a text's hint is computed once; the
        encodings come from `lookup`, so hits and misses count encoder work."""
        with self._lock:
            found = {t: self._hints[t] for t in dict.fromkeys(texts) if t in self._hints}
            for t in found:
                self._hints.move_to_end(t)
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            tokens, mask = encode_critiques(missing, encoder, cache=self)
            with torch.no_grad():
                vec = model.critique_hints(tokens, mask)  # (M, D)
            with self._lock:
                for j, t in enumerate(missing):
                    found[t] = self._hints[t] = vec[j].clone()
                while len(self._hints) > self.max_entries:
                    self._hints.popitem(last=False)
        with self._lock:  # texts already hinted never reach `lookup`: count them here
            self.hits += len(texts) - len(missing)
        return torch.stack([found[t] for t in texts])


def encode_critiques(texts: Sequence[str | None], encoder, cache: CritiqueCache | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Critique strings -> (tokens (B, Tc, D) float32, mask (B, Tc) bool); None or "" gives an all-False row
    (= no critique). `encoder` is a FrozenTextEncoder (the model's own encoder: config.encoder); `cache`
    (serving) reuses the encodings of texts seen before."""
    texts = list(texts)
    present = [i for i, t in enumerate(texts) if t]
    if not present:
        return torch.zeros(len(texts), 1, encoder.dim), torch.zeros(len(texts), 1, dtype=torch.bool)
    if cache is None:
        tok, mask = encoder.encode([texts[i] for i in present])
        tokens = torch.zeros(len(texts), tok.shape[1], tok.shape[2])
        full_mask = torch.zeros(len(texts), tok.shape[1], dtype=torch.bool)
        tokens[present] = tok.float().cpu()
        full_mask[present] = mask.cpu()
        return tokens, full_mask
    rows = cache.lookup([texts[i] for i in present], encoder)
    width = max(r[0].shape[0] for r in rows.values())
    tokens = torch.zeros(len(texts), width, encoder.dim)
    full_mask = torch.zeros(len(texts), width, dtype=torch.bool)
    for i in present:
        tok, mask = rows[texts[i]]
        tokens[i, : tok.shape[0]] = tok
        full_mask[i, : mask.shape[0]] = mask
    return tokens, full_mask


# -------------------------------------------------------------------------------------------- model
class Flare(nn.Module):
    causal = False  # packing: whole sequences, masking happens in loss()
    # options removed after they measured worse (issue #32), with the defaults older checkpoints saved them at:
    # registry.load_model drops them at these values and refuses a checkpoint trained with another
    RETIRED_OPTIONS = {"output_residual": False, "text_fixed_norm": False, "contrastive_id_grad": True,
                       "tau_frequent": None, "frequent_weighted_mean": False, "seq_text_weight": 0.0,
                       "seq_text_tau": 0.1, "description_source": None, "description_words": 32}

    def __init__(self, config: FlareConfig, n_items: int):
        super().__init__()
        self.config = config
        if not 0.0 <= config.alpha <= 1.0 or config.tau <= 0:
            raise ValueError("flare: alpha must be in [0, 1] and tau > 0")
        text_prior.check_weight(config.text_prior_weight, "flare")
        if config.text_prior_weight > 0 and not config.use_text:
            raise ValueError("flare: text_prior_weight pools the text path's features (use_text: true)")
        if config.frequent_weight < 0:
            raise ValueError("flare: frequent_weight must be >= 0")
        if config.critique_prob > 0 and not config.use_text:
            raise ValueError("flare: critiques need the text path (use_text: true)")
        self.n_id_items = n_items  # rows of the trained ID table
        self.n_items = n_items  # catalog size; grows with add_items (text-only items)
        self.max_len = config.max_len
        self.mask_token, self.unk_token = n_items + 1, n_items + 2  # tokens: 0 pad, 1..n items, mask, unknown ID
        self.encoder = Encoder(n_items + 3, config.max_len + 1, config.dim, config.heads, config.hidden,
                               config.layers, config.dropout, config.attn_dropout, config.init_std)
        self.out_bias = nn.Parameter(torch.zeros(n_items)) if config.output_bias else None
        # which IDs were trained (set from the training data by load_flare_features; saved with the weights)
        self.register_buffer("id_seen", torch.ones(n_items, dtype=torch.bool))
        # training occurrences per item (training only: frequent_weight; not saved)
        self.register_buffer("id_count", torch.zeros(n_items), persistent=False)
        self.perceiver = None
        if config.use_text:
            if config.text_dim is None:
                config.text_dim = _encoder_dim(config.encoder)
            self.perceiver = PerceiverResampler(
                config.text_dim, config.perceiver_dim, config.dim, config.perceiver_latents, config.perceiver_layers,
                config.perceiver_heads, config.dropout, config.attn_dropout, init_std=config.init_std,
                norm_value=config.text_norm)
            self.text_mask = nn.Parameter(torch.randn(config.dim) * config.init_std)  # t at masked positions
        # catalog features (not saved: attach_item_features)
        self.register_buffer("item_tokens", None, persistent=False)  # (N, T, Dt) float16
        self.register_buffer("item_token_mask", None, persistent=False)  # (N, T) bool
        self.critiques: CritiqueTable | None = None
        self._cache: dict[str, torch.Tensor] | None = None
        self.text_prior = text_prior.TextPrior()  # pooled from item_tokens when first needed (_tables)
        transition_prior.check_weight(config.transition_prior_weight, "flare")
        self.transition_prior = transition_prior.TransitionPrior()  # attached by registry.bind_dataset

    # ------------------------------------------------------------------------------ features and catalog
    @staticmethod
    def prepare_params(params: dict[str, Any], dataset) -> dict[str, Any]:
        """Driver-side hook of the training loop (see prepare_experiment_params)."""
        return prepare_experiment_params(params, dataset)

    @property
    def needs_item_features(self) -> bool:
        return self.perceiver is not None

    @property
    def packed_seq_len(self) -> int:
        return self.config.max_len + 1

    def attach_item_features(self, tokens: torch.Tensor, mask: torch.Tensor, critiques: CritiqueTable | None = None) -> None:
        """Catalog token features (N, T, Dt) aligned with item_idx (0..N-1), N = the trained catalog size."""
        if tokens.dim() != 3 or mask.shape != tokens.shape[:2]:
            raise ValueError(f"item features must be (N, T, D) with a (N, T) mask, got {tuple(tokens.shape)} / {tuple(mask.shape)}")
        if tokens.shape[0] != self.n_id_items:
            raise ValueError(f"item features cover {tokens.shape[0]} items, the model has {self.n_id_items}")
        if tokens.shape[2] != self.config.text_dim:
            raise ValueError(f"item features have dim {tokens.shape[2]}, the model expects {self.config.text_dim} "
                             f"(encoder {self.config.encoder!r})")
        if not bool(mask.any(1).all()):
            raise ValueError("every item needs at least one text token")
        dev = self.id_seen.device
        self.item_tokens = tokens.to(dev, torch.float16)
        self.item_token_mask = mask.to(dev, torch.bool)
        self.n_items = self.n_id_items
        self.critiques = critiques
        self._cache = None
        self.text_prior.clear()

    def set_trained_ids(self, trained: torch.Tensor | np.ndarray) -> None:
        """trained: a (N,) bool mask of IDs seen in training, or the (N,) training occurrence counts."""
        trained = self._per_id(trained, "trained-ID mask or counts")
        if trained.dtype != torch.bool:
            self.set_item_counts(trained)
        self.id_seen.copy_(trained.to(self.id_seen.device) > 0)
        self._cache = None

    def set_item_counts(self, counts: torch.Tensor | np.ndarray) -> None:
        """(N,) training occurrence counts only (frequent_weight), leaving the trained-ID mask as it is:
        a loaded checkpoint knows which IDs its weights trained (a refit also trained the validation targets)."""
        counts = self._per_id(counts, "training counts")
        self.id_count.copy_(counts.to(self.id_count.device, self.id_count.dtype))

    def _per_id(self, values: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
        values = torch.as_tensor(np.asarray(values))
        if values.shape != (self.n_id_items,):
            raise ValueError(f"{what} must be ({self.n_id_items},), got {tuple(values.shape)}")
        return values

    def _contrastive(self, e: torch.Tensor, t: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """InfoNCE with margin for the batch's trained items (K,), frequent items' rows weighted frequent_weight."""
        cfg = self.config
        if cfg.frequent_weight == 1.0:
            return info_nce_margin(e, t, cfg.tau, cfg.margin)
        if not bool((self.id_count > 0).any()):
            raise ValueError("flare: frequent_weight needs the training counts (set_trained_ids)")
        frequent = self.id_count[items] >= cfg.frequent_min_count  # (K,)
        return info_nce_margin(e, t, cfg.tau, cfg.margin, torch.where(frequent, cfg.frequent_weight, 1.0))

    def add_items(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[int]:
        """Append items known only by their text (K, T, Dt) / (K, T); returns their new item indices, which
        are scorable at once through the text path (cold start) without retraining."""
        if self.item_tokens is None:
            raise RuntimeError("attach_item_features first (load_flare_features)")
        if tokens.dim() != 3 or mask.shape != tokens.shape[:2] or tokens.shape[2] != self.item_tokens.shape[2]:
            raise ValueError(f"new item features must be (K, T, {self.item_tokens.shape[2]}) with a (K, T) mask")
        if not bool(mask.any(1).all()):
            raise ValueError("every new item needs at least one text token")
        cur_t, new_t = self.item_tokens.shape[1], tokens.shape[1]
        width = max(cur_t, new_t)
        old_tok, old_mask = _pad_tokens(self.item_tokens, self.item_token_mask, width)
        new_tok, new_mask = _pad_tokens(tokens.to(old_tok.device, torch.float16), mask.to(old_tok.device), width)
        start = self.n_items
        self.item_tokens = torch.cat([old_tok, new_tok])
        self.item_token_mask = torch.cat([old_mask, new_mask])
        self.n_items = int(self.item_tokens.shape[0])
        if self.critiques is not None:  # new items have no category prefixes
            pad = torch.full((tokens.shape[0], self.critiques.item_prefixes.shape[1]), -1, dtype=torch.long)
            self.critiques.item_prefixes = torch.cat([self.critiques.item_prefixes, pad])
        self._cache = None
        self.text_prior.clear()  # rebuilt over the grown catalog when next scored
        return list(range(start, self.n_items))

    def train(self, mode: bool = True):
        self._cache = None  # weights are about to change (or just changed): cached t / output rows are stale
        return super().train(mode)

    # ------------------------------------------------------------------------------------ building blocks
    def _has_id(self, items: torch.Tensor) -> torch.Tensor:
        """(…) bool: item index has a trained ID row (items >= 0)."""
        inside = items < self.n_id_items
        return inside & self.id_seen[items.clamp(max=self.n_id_items - 1)]

    def _item_text(self, idx: torch.Tensor) -> torch.Tensor:
        """t for item indices (M,) -> (M, D), through the Perceiver (with grad when training)."""
        if self.item_tokens is None:
            raise RuntimeError("Flare needs item text features: call load_flare_features(model, dataset)")
        mask = self.item_token_mask[idx]  # (M, T)
        width = int(mask.sum(1).max())  # trim the padding common to this subset
        mask = mask[:, :width]
        tokens = self.item_tokens[idx, :width]
        types = torch.full(mask.shape, TYPE_TEXT, dtype=torch.long, device=mask.device)
        return self.perceiver(tokens, mask, types)

    def critique_hints(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(M, D) the hint vectors of critique tokens (M, Tc, Dt) / mask (M, Tc), as scoring computes them;
        `score_all` takes them precomputed as batch["critique_hint"] (serving caches them per text)."""
        return self._critique_text(tokens, mask)

    def _critique_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Perceiver over critique tokens only (the masked position's T is hidden) -> (M, D); rows with
        no critique token get t_mask."""
        has = mask.any(1)
        out = self.text_mask.expand(tokens.shape[0], -1)
        if bool(has.any()):
            sel = has.nonzero(as_tuple=True)[0]
            m = mask[sel]
            width = int(m.sum(1).max())
            m = m[:, :width]
            types = torch.full(m.shape, TYPE_CRITIQUE, dtype=torch.long, device=m.device)
            vec = self.perceiver(tokens[sel, :width].to(self.text_mask.device), m, types)
            out = out.index_put((sel,), vec.to(out.dtype))
        return out  # (M, D)

    def _encode(self, ids: torch.Tensor, text: torch.Tensor | None, positions: torch.Tensor,
                attn: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """The Bert4Rec stack over c = e + t (+ position). ids (B, L) tokens, text (B, L, D) or None.
        (B, L, D), or (B, D) at the `query` positions only (layers.run_blocks)."""
        enc = self.encoder
        x = enc.item_emb(ids) + enc.pos_emb(positions)  # (B, L, D)
        if text is not None:
            x = x + text
        return run_blocks(enc.blocks, enc.ln_f, enc.drop(x), attn, query)

    def id_table(self) -> torch.Tensor:
        """(N_id, D) output rows: the tied ID embeddings e."""
        return self.encoder.item_emb.weight[1 : self.n_id_items + 1]

    # ------------------------------------------------------------------------------------------ training
    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        return self.loss_terms(batch, generator)["loss"]

    def loss_terms(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        cfg = self.config
        items, segments, positions = batch["items"], batch["segments"], batch["positions"]
        dev = items.device
        real = segments > 0
        masked = cloze_mask(segments, cfg.mask_prob, cfg.last_only_prob, generator)  # (B, L)
        safe = items.clamp(min=0)
        ids = safe + 1
        drop = torch.rand(items.shape, generator=generator, device=dev) < cfg.id_dropout
        ids = torch.where(real & (~self._has_id(safe) | drop), torch.full_like(ids, self.unk_token), ids)
        ids = torch.where(masked, torch.full_like(ids, self.mask_token), ids)
        ids = torch.where(real, ids, torch.zeros_like(ids))
        text, terms = None, {}
        uniq = t_u = None
        if self.perceiver is not None:
            uniq, inv = torch.unique(items[real], return_inverse=True)  # (U,), (R,)
            t_u = self._item_text(uniq)  # (U, D): only the batch's items, never the catalog
            where_real = real.nonzero(as_tuple=True)
            text = t_u.new_zeros(*items.shape, t_u.shape[1]).index_put(where_real, t_u[inv])  # (B, L, D)
            hint = self._training_hints(items, masked, generator)  # (B, L, D) at masked positions
            text = torch.where(masked[..., None], hint, text)
        h = self._encode(ids, text, positions, attention_mask(segments, causal=False))
        mlm = chunked_cross_entropy(h[masked], self.id_table(), items[masked], self.out_bias,
                                    cfg.loss_chunk_items, cfg.max_logit_elems)
        terms["mlm"] = mlm
        loss = mlm
        if self.perceiver is not None and cfg.contrastive:
            keep = self._has_id(uniq)
            if int(keep.sum()) >= 2:
                e_u = self.encoder.item_emb(uniq[keep] + 1)  # (K, D)
                con = self._contrastive(e_u, t_u[keep], uniq[keep])
                terms["contrastive"] = con
                loss = cfg.alpha * mlm + (1 - cfg.alpha) * con
        terms["loss"] = loss
        return terms

    def _training_hints(self, items: torch.Tensor, masked: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(B, L, D): t_mask at masked positions, or with prob critique_prob Perceiver(S) where S is a prefix of
        the target's category path of random depth >= critique_min_depth."""
        b, length = items.shape
        hint = self.text_mask.expand(b, length, -1)
        table = self.critiques
        if self.config.critique_prob <= 0 or table is None:
            return hint
        dev = items.device
        pick = masked & (torch.rand(items.shape, generator=generator, device=dev) < self.config.critique_prob)
        where = pick.nonzero(as_tuple=True)
        if not where[0].numel():
            return hint
        prefixes = table.item_prefixes.to(dev)[items[where]]  # (P, max_depth)
        avail = prefixes >= 0
        n_avail = avail.sum(1)
        ok = n_avail > 0
        if not bool(ok.any()):
            return hint
        choice = (torch.rand(prefixes.shape[0], generator=generator, device=dev) * n_avail.clamp(min=1)).long()
        chosen = prefixes.gather(1, choice[:, None]).squeeze(1)  # (P,) a random available prefix
        where = tuple(w[ok] for w in where)
        chosen = chosen[ok]
        cu, cinv = torch.unique(chosen, return_inverse=True)
        tok, m = table.tokens.to(dev)[cu], table.mask.to(dev)[cu]
        vec = self._critique_text(tok, m)  # (Cu, D)
        return hint.index_put(where, vec[cinv])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss; DDP and DeepSpeed only synchronise gradients of calls that go through forward()."""
        return self.loss(batch)

    # ----------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def _tables(self) -> dict[str, torch.Tensor]:
        """Cached for the whole catalog (eval only): t (N, D), output rows (N, D) and bias (N,)."""
        if self._cache is not None and self._cache["out"].shape[0] == self.n_items:
            return self._cache
        weight = self.id_table()
        n_new = self.n_items - self.n_id_items
        bias = self.out_bias
        if self.perceiver is None:
            self._cache = {"text": None, "out": weight, "bias": bias}
            return self._cache
        text = torch.cat([self._item_text(torch.arange(lo, min(lo + self.config.text_chunk_items, self.n_items),
                                                       device=weight.device))
                          for lo in range(0, self.n_items, self.config.text_chunk_items)])  # (N, D)
        has_id = self._has_id(torch.arange(self.n_items, device=weight.device))
        seen = has_id[: self.n_id_items]
        ref = weight[seen] if bool(seen.any()) else weight
        scale = ref.norm(dim=-1).median()
        cold_rows = F.normalize(text, dim=-1) * scale  # (N, D) the text path's output rows
        out = torch.cat([weight, weight.new_zeros(n_new, weight.shape[1])])
        out = torch.where(has_id[:, None], out, cold_rows)
        if bias is not None:
            ref_b = bias[seen] if bool(seen.any()) else bias
            bias = torch.cat([bias, bias.new_zeros(n_new)])
            bias = torch.where(has_id, bias, ref_b.median())
        self._cache = {"text": text, "out": out, "bias": bias}
        return self._cache

    def user_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history, lengths = keep_recent(batch["history"], batch["lengths"], self.config.max_len)
        b, width = history.shape
        dev = history.device
        real = history >= 0
        safe = history.clamp(min=0)
        if bool((safe >= self.n_items).any()):
            raise ValueError(f"history references items >= catalog size {self.n_items}")
        ids = torch.where(self._has_id(safe), safe + 1, torch.full_like(safe, self.unk_token))
        ids = torch.where(real, ids, torch.zeros_like(ids))
        ids = torch.cat([ids, torch.zeros(b, 1, dtype=ids.dtype, device=dev)], 1)  # (B, W+1)
        rows = torch.arange(b, device=dev)
        ids[rows, lengths] = self.mask_token  # the query slot right after the last real item
        positions = torch.arange(width + 1, device=dev).expand(b, -1)
        segments = (positions <= lengths[:, None]).long()
        text = None
        if self.perceiver is not None:
            t_all = self._tables()["text"]
            text = torch.where(real[..., None], t_all[safe], torch.zeros((), device=dev))  # (B, W, D)
            text = torch.cat([text, text.new_zeros(b, 1, text.shape[2])], 1)  # (B, W+1, D)
            crit_tok, crit_mask = batch.get("critique_tokens"), batch.get("critique_mask")
            crit_hint = batch.get("critique_hint")
            if crit_hint is not None:
                if crit_hint.shape != (b, text.shape[2]):
                    raise ValueError(f"critique_hint must be (B, D) = ({b}, {text.shape[2]}); got {tuple(crit_hint.shape)}")
                hint = crit_hint.to(dev, text.dtype)
            elif crit_tok is not None:
                if crit_mask is None or crit_tok.shape[0] != b or crit_mask.shape != crit_tok.shape[:2]:
                    raise ValueError("critique_tokens (B, Tc, D) needs critique_mask (B, Tc) with the same B")
                hint = self._critique_text(crit_tok.to(dev), crit_mask.to(dev))  # (B, D)
            else:
                hint = self.text_mask.expand(b, -1)
            text[rows, lengths] = hint
        return encode_queries(self._encode, (ids, text, positions), segments, lengths, causal=False)  # (B, D)

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, n_items) scores. Optional batch keys: critique_tokens (B, Tc, D) float, critique_mask (B, Tc) bool
        (an all-False row = no critique), or critique_hint (B, D) = `critique_hints` of those, precomputed."""
        tables = self._tables()
        scores = chunked_scores(self.user_vectors(batch), tables["out"], tables["bias"])  # (B, V)
        if self.config.text_prior_weight > 0 and self.text_prior.table is None:  # a scoring setting: set any time
            with torch.no_grad():  # (N, Dt) unit rows of the features held, so new items (add_items) are in it
                self.text_prior.attach(pooled_tokens(self.item_tokens, self.item_token_mask,
                                                     self.config.text_chunk_items), self.n_items)
        scores = self.text_prior.add(scores, batch, self.config.text_prior_weight)
        return self.transition_prior.add(scores, batch, self.config.transition_prior_weight)


def _pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    if tokens.shape[1] == width:
        return tokens, mask
    pad = width - tokens.shape[1]
    return F.pad(tokens, (0, 0, 0, pad)), F.pad(mask, (0, pad), value=False)


def _encoder_dim(name: str) -> int:
    """Hidden size of a frozen encoder from its config.json alone (no weights loaded)."""
    from transformers import AutoConfig

    from seqrec.features.encoder import resolve_encoder_path

    cfg = AutoConfig.from_pretrained(resolve_encoder_path(name))
    return int(getattr(cfg, "hidden_size", None) or cfg.d_model)


# ----------------------------------------------------------------------------------- feature loading
def build_critique_table(dataset, model: Flare, cache_dir=None, use_ray: bool = True) -> CritiqueTable:
    """Every category prefix of depth >= critique_min_depth, encoded through the feature cache."""
    from seqrec.features.cache import FeatureCache

    cfg = model.config
    paths = category_paths(dataset, cfg.category_source)
    prefix_id: dict[tuple[str, ...], int] = {}
    per_item = []
    for levels in paths:
        lo = min(cfg.critique_min_depth, len(levels))
        ids = []
        for depth in range(max(lo, 1), len(levels) + 1):
            ids.append(prefix_id.setdefault(tuple(levels[:depth]), len(prefix_id)))
        per_item.append(ids)
    max_depth = max((len(x) for x in per_item), default=0) or 1
    item_prefixes = torch.full((len(paths), max_depth), -1, dtype=torch.long)
    for i, ids in enumerate(per_item):
        item_prefixes[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    texts = [critique_text(p) for p in prefix_id]
    if not texts:
        raise ValueError("critique_prob > 0 but no item has a category")
    cache = FeatureCache(cache_dir or Path(dataset.path) / "features", cfg.encoder, cfg.max_text_tokens)
    cache.ensure(texts, use_ray=use_ray)
    feats = cache.load(texts)
    return CritiqueTable(feats.tokens, feats.mask, item_prefixes)


def load_flare_features(model: torch.nn.Module, dataset, cache_dir=None, use_ray: bool = True,
                        keep_trained_ids: bool = False) -> None:
    """Attach the catalog's frozen-encoder features (and training critiques) to a model that needs them;
    a no-op for other models. Encodes only texts not yet in the cache. Everyone (training loop, evaluator,
    serving) calls this. The trained-ID mask comes from the dataset's training split, or with
    `keep_trained_ids` (a loaded checkpoint) stays the one saved with the weights."""
    if not getattr(model, "needs_item_features", False):
        return
    from seqrec.features.cache import dataset_features

    cfg = model.config
    feats = dataset_features(dataset, cfg.encoder, cfg.max_text_tokens, cache_dir=cache_dir, use_ray=use_ray)
    critiques = build_critique_table(dataset, model, cache_dir, use_ray) if cfg.critique_prob > 0 else None
    model.attach_item_features(feats.tokens, feats.mask, critiques)
    counts = dataset.train_item_counts()
    if keep_trained_ids:
        model.set_item_counts(counts)
    else:
        model.set_trained_ids(counts)


def prepare_experiment_params(params: dict[str, Any], dataset) -> dict[str, Any]:
    """Driver side, before Ray Train starts: make category_source absolute (workers run elsewhere) and fill the
    feature cache once with Ray Data (the item features, which the text prior is pooled from too), so workers
    only read it."""
    params = dict(params)
    if params.get("category_source"):
        params["category_source"] = str(Path(params["category_source"]).resolve())
    from seqrec.config import from_dict

    model = Flare(from_dict(FlareConfig, params, where="model[flare]"), dataset.n_items)
    load_flare_features(model, dataset, use_ray=True)
    params["text_dim"] = model.config.text_dim
    return params
