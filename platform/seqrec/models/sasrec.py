"""SASRec (Kang & McAuley 2018) in the strong modern setup: causal transformer, full-softmax next-item CE.

Training batch (packed, see models/packing.py): items, targets (next item per position), positions, segments.
Scoring batch (data/batching.py): left-aligned `history` with PAD = -1 and `lengths`; the representation of
the last real item scores every catalog item through the (tied) item embedding table. Scoring option (not in
the paper): the text-similarity prior `text_prior_weight` (models/text_prior.py), off by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from seqrec.models import text_prior, transition_prior
from seqrec.models.chunked_softmax import chunked_cross_entropy, chunked_scores
from seqrec.models.layers import Encoder, attention_mask, encode_queries, keep_recent


@dataclass
class SASRecConfig:
    max_len: int = 50  # history items the model reads (positions 0..max_len-1)
    dim: int = 64
    layers: int = 2
    heads: int = 2
    hidden: int = 256
    dropout: float = 0.2
    attn_dropout: float = 0.2
    init_std: float = 0.02
    output_bias: bool = False
    loss_chunk_items: int = 16384  # item chunk of the full softmax when the (N, V) logits would be too big
    max_logit_elems: int = 2**24  # below this many logits the plain (unchunked) softmax is used
    # scoring option (models/text_prior.py): score_j += text_prior_weight * cos(x_last, x_j) of the frozen
    # encoder's mean-pooled item features, lir_text's score; 0 = off. Not trained: chosen on validation.
    text_prior_weight: float = 0.0
    text_prior_encoder: str = "minilm"  # frozen encoder name or local path (the features come from the cache)
    # scoring option (models/transition_prior.py): score_j += transition_prior_weight * log(1 + count(last -> j))
    # of the training transitions, the markov baseline's evidence; 0 = off. Not trained: chosen on validation.
    transition_prior_weight: float = 0.0


class SASRec(nn.Module):
    causal = True  # packing: input s[:-1], target s[1:]

    def __init__(self, config: SASRecConfig, n_items: int):
        super().__init__()
        self.config = config
        self.n_items = n_items
        self.max_len = config.max_len  # read by the evaluator to truncate histories
        # token = item + 1; token 0 = padding
        self.encoder = Encoder(n_items + 1, config.max_len, config.dim, config.heads, config.hidden,
                               config.layers, config.dropout, config.attn_dropout, config.init_std)
        self.out_bias = nn.Parameter(torch.zeros(n_items)) if config.output_bias else None
        text_prior.check_weight(config.text_prior_weight, "sasrec")
        self.text_prior = text_prior.TextPrior(config.text_prior_encoder)  # table attached by registry.bind_dataset
        transition_prior.check_weight(config.transition_prior_weight, "sasrec")
        self.transition_prior = transition_prior.TransitionPrior()  # attached by registry.bind_dataset

    prepare_params = staticmethod(text_prior.prepare_params)  # driver side: fill the prior's feature cache

    @property
    def packed_seq_len(self) -> int:
        """Longest training segment (in input positions)."""
        return self.config.max_len

    def item_table(self) -> torch.Tensor:
        return self.encoder.item_emb.weight[1:]  # (V, D), tied input/output embeddings

    def encode(self, items: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """(B, L, D) causal outputs at every position."""
        tokens = (items + 1).clamp(min=0)  # PAD -1 -> token 0
        return self.encoder(tokens, positions, attention_mask(segments, causal=True))

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.encode(batch["items"], batch["positions"], batch["segments"])  # (B, L, D)
        targets = batch["targets"]
        keep = targets >= 0  # positions with a next item
        return chunked_cross_entropy(h[keep], self.item_table(), targets[keep], self.out_bias,
                                     self.config.loss_chunk_items, self.config.max_logit_elems)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss; DDP and DeepSpeed only synchronise gradients of calls that go through forward()."""
        return self.loss(batch)

    def user_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history, lengths = keep_recent(batch["history"], batch["lengths"], self.config.max_len)
        width = history.shape[1]
        positions = torch.arange(width, device=history.device).expand_as(history)
        segments = (positions < lengths[:, None]).long()  # 1 = real, 0 = padding
        tokens = (history + 1).clamp(min=0)  # PAD -1 -> token 0
        last = (lengths - 1).clamp(min=0)
        return encode_queries(self.encoder, (tokens, positions), segments, last, causal=True)  # (B, D)

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = chunked_scores(self.user_vectors(batch), self.item_table(), self.out_bias)  # (B, V)
        scores = self.text_prior.add(scores, batch, self.config.text_prior_weight)
        return self.transition_prior.add(scores, batch, self.config.transition_prior_weight)
