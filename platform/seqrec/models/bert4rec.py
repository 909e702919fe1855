"""Bert4Rec (Sun et al. 2019) as tuned in FLARE section 3.2 ("Flare ID").

Bidirectional transformer over item + learned position embeddings, cloze training:
  * every item is masked with probability `mask_prob` (0.15), at least one per sequence;
  * with probability `last_only_prob` a sequence instead has only its LAST item masked, which is exactly the
    inference situation (history fully visible, a mask token after it);
  * loss = mean NLL over masked positions with a full softmax over the item table (chunked for big catalogs);
  * output layer tied to the item embeddings or untied, configurable.
Inference appends the mask token after the history and scores all items from its representation. Scoring option
(not in the paper): the text-similarity prior `text_prior_weight` (models/text_prior.py), off by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from seqrec.models import text_prior, transition_prior
from seqrec.models.chunked_softmax import chunked_cross_entropy, chunked_scores
from seqrec.models.layers import Encoder, attention_mask, encode_queries, keep_recent


@dataclass
class Bert4RecConfig:
    max_len: int = 50  # history items read at inference; positions = max_len + 1 (history + mask token)
    dim: int = 64
    layers: int = 2
    heads: int = 2
    hidden: int = 256
    dropout: float = 0.2
    attn_dropout: float = 0.2
    init_std: float = 0.02
    mask_prob: float = 0.15
    last_only_prob: float = 0.1
    tied_output: bool = True
    output_bias: bool = True
    # Position ids counted from the END of each sequence (the last slot is 0), as in the original BERT4Rec whose
    # left-padded inputs put the query slot at a fixed index. Counted from the start, the slot being predicted at
    # test time (history + the validation item + mask) sits further right than any last position the user's own
    # training sequence had; from the end it is always position 0.
    positions_from_end: bool = False
    loss_chunk_items: int = 16384
    max_logit_elems: int = 2**24
    # scoring option (models/text_prior.py): score_j += text_prior_weight * cos(x_last, x_j) of the frozen
    # encoder's mean-pooled item features, lir_text's score; 0 = off. Not trained: chosen on validation.
    text_prior_weight: float = 0.0
    text_prior_encoder: str = "minilm"  # frozen encoder name or local path (the features come from the cache)
    # scoring option (models/transition_prior.py): score_j += transition_prior_weight * log(1 + count(last -> j))
    # of the training transitions, the markov baseline's evidence; 0 = off. Not trained: chosen on validation.
    transition_prior_weight: float = 0.0


def positions_from_end(positions: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """(B, L) per-sequence positions counted from each sequence's last item (0) backwards; padding stays 0.

    positions restart at 0 for every packed sequence, so a sequence's length is its largest position + 1."""
    b, length = segments.shape
    gid = torch.arange(b, device=segments.device)[:, None] * (length + 1) + segments  # unique id per (row, segment)
    last = torch.zeros(b * (length + 1), dtype=positions.dtype, device=positions.device)
    last = last.scatter_reduce(0, gid.flatten(), positions.flatten(), reduce="amax")  # largest position per segment
    return torch.where(segments > 0, last[gid] - positions, torch.zeros_like(positions))


def cloze_mask(segments: torch.Tensor, mask_prob: float, last_only_prob: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, L) bool positions to mask. segments: (B, L), 0 = padding, k >= 1 = packed sequence id.

    Rules: Bernoulli(mask_prob) per real item; a sequence drawn with prob last_only_prob has only its last
    item masked; any sequence left without a masked item gets one uniformly chosen item masked.
    """
    b, length = segments.shape
    dev = segments.device
    real = segments > 0
    gid = torch.arange(b, device=dev)[:, None] * (length + 1) + segments  # (B, L) unique id per (row, segment)
    n_groups = b * (length + 1)
    rand = torch.rand(b, length, generator=generator, device=dev)
    mask = (rand < mask_prob) & real
    # last item of each segment: the next slot belongs to another segment (or the row ends)
    nxt = torch.cat([segments[:, 1:], torch.zeros(b, 1, dtype=segments.dtype, device=dev)], dim=1)
    is_last = real & (nxt != segments)
    seg_draw = torch.rand(n_groups, generator=generator, device=dev)
    last_only = seg_draw[gid] < last_only_prob  # (B, L), constant within a segment
    mask = torch.where(last_only, is_last, mask)
    # at least one: segments with no masked item mask the position with the largest random key
    count = torch.zeros(n_groups, device=dev).index_add_(0, gid.flatten(), mask.flatten().float())
    key = torch.where(real, torch.rand(b, length, generator=generator, device=dev), torch.full_like(rand, -1.0))
    best = torch.full((n_groups,), -2.0, device=dev).scatter_reduce(0, gid.flatten(), key.flatten(), reduce="amax")
    pick = real & (count[gid] == 0) & (key == best[gid])
    return mask | pick


class Bert4Rec(nn.Module):
    causal = False  # packing: whole sequence as input, masking happens in loss()

    def __init__(self, config: Bert4RecConfig, n_items: int):
        super().__init__()
        self.config = config
        self.n_items = n_items
        self.max_len = config.max_len  # read by the evaluator to truncate histories
        self.mask_token = n_items + 1  # tokens: 0 pad, 1..n items, n+1 mask
        self.encoder = Encoder(n_items + 2, config.max_len + 1, config.dim, config.heads, config.hidden,
                               config.layers, config.dropout, config.attn_dropout, config.init_std)
        # tied: the output layer IS the embedding table (no second tensor, so nothing to untie on save/load)
        self.out_weight = None if config.tied_output else nn.Parameter(torch.randn(n_items, config.dim) * config.init_std)
        self.out_bias = nn.Parameter(torch.zeros(n_items)) if config.output_bias else None
        text_prior.check_weight(config.text_prior_weight, "bert4rec")
        self.text_prior = text_prior.TextPrior(config.text_prior_encoder)  # table attached by registry.bind_dataset
        transition_prior.check_weight(config.transition_prior_weight, "bert4rec")
        self.transition_prior = transition_prior.TransitionPrior()  # attached by registry.bind_dataset

    prepare_params = staticmethod(text_prior.prepare_params)  # driver side: fill the prior's feature cache

    @property
    def packed_seq_len(self) -> int:
        return self.config.max_len + 1  # training sequences may be one longer than inference histories

    def item_table(self) -> torch.Tensor:
        return self.encoder.item_emb.weight[1 : self.n_items + 1] if self.out_weight is None else self.out_weight

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        items, segments = batch["items"], batch["segments"]
        masked = cloze_mask(segments, self.config.mask_prob, self.config.last_only_prob, generator)  # (B, L)
        tokens = torch.where(masked, torch.full_like(items, self.mask_token), (items + 1).clamp(min=0))
        positions = batch["positions"]
        if self.config.positions_from_end:
            positions = positions_from_end(positions, segments)
        h = self.encoder(tokens, positions, attention_mask(segments, causal=False))  # (B, L, D)
        return chunked_cross_entropy(h[masked], self.item_table(), items[masked], self.out_bias,
                                     self.config.loss_chunk_items, self.config.max_logit_elems)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss; DDP and DeepSpeed only synchronise gradients of calls that go through forward()."""
        return self.loss(batch)

    def user_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history, lengths = keep_recent(batch["history"], batch["lengths"], self.config.max_len)
        b, width = history.shape
        dev = history.device
        tokens = torch.cat([(history + 1).clamp(min=0), torch.zeros(b, 1, dtype=history.dtype, device=dev)], 1)
        rows = torch.arange(b, device=dev)
        tokens[rows, lengths] = self.mask_token  # mask token right after the last real item, (B, W+1)
        positions = torch.arange(width + 1, device=dev).expand(b, -1)
        segments = (positions <= lengths[:, None]).long()
        if self.config.positions_from_end:  # the mask token (at index `lengths`) gets 0, its predecessor 1, ...
            positions = (lengths[:, None] - positions).clamp(min=0)
        return encode_queries(self.encoder, (tokens, positions), segments, lengths, causal=False)  # (B, D)

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = chunked_scores(self.user_vectors(batch), self.item_table(), self.out_bias)  # (B, V)
        scores = self.text_prior.add(scores, batch, self.config.text_prior_weight)
        return self.transition_prior.add(scores, batch, self.config.transition_prior_weight)
