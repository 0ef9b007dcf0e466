"""PromptedCLIP: a frozen open_clip CLIP whose towers take prompts, the forward every method shares."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from mlgate.data.images import ImageNorm
from mlgate.errors import MlgateError
from mlgate.model.kv_prompts import KeyValuePrompts
from mlgate.model.text import TextTower
from mlgate.model.vision import VisionTower


class PromptedCLIP(TextTower, VisionTower, KeyValuePrompts, nn.Module):
    """A frozen open_clip CLIP whose text tower takes token *embeddings*, so methods can insert prompts.

    The text tower is driven block by block (open_clip ≥2.26 is batch-first), which is what deep
    prompts need; sequences are trimmed to the longest prompt in use instead of the full 77 tokens,
    with the causal mask and positional embeddings cut to match.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str) -> None:
        super().__init__()
        text = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower in .text
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask"):
            if getattr(text, attr, None) is None:
                raise MlgateError(
                    f"backbone {name!r}: its text tower has no {attr!r}; mlgate prompts open_clip "
                    "models with a CLIP-style text transformer (not HF text towers)."
                )
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.text = text
        self.tokenizer = tokenizer
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", model.visual.image_size)
        self.image_norm = ImageNorm(
            size=int(size[0] if isinstance(size, (tuple, list)) else size),
            mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        )

    def train(self, mode: bool = True) -> PromptedCLIP:
        # The backbone stays in eval mode (no dropout, frozen statistics) whatever the method does.
        return self

    @property
    def text_width(self) -> int:
        return self.text.token_embedding.embedding_dim

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (N, context_length) on the backbone's device."""
        return self.tokenizer(texts).to(self.text.token_embedding.weight.device)

    @staticmethod
    def eot_index(tokens: torch.Tensor) -> torch.Tensor:
        """Position of the end-of-text token (the highest id in CLIP's vocabulary) per sequence."""
        return tokens.argmax(dim=-1)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings (N, L, D) of token ids."""
        return self.text.token_embedding(tokens)

    @property
    def num_layers(self) -> int:
        """Layers that both towers have (the deepest a per-layer prompt can go)."""
        return min(len(self.text.transformer.resblocks), len(self.model.visual.transformer.resblocks))

    @property
    def vision_width(self) -> int:
        return self.model.visual.conv1.out_channels

    @torch.no_grad()
    def encode_class_texts(self, texts: list[str]) -> torch.Tensor:
        """Normalized features of plain text prompts (zero-shot classifier weights)."""
        tokens = self.tokenize(texts)
        eot = self.eot_index(tokens)
        tokens = tokens[:, : int(eot.max()) + 1]
        return F.normalize(self.encode_text_embeddings(self.embed_tokens(tokens), eot), dim=-1)
