"""MaPLe (Khattak et al., 2023): deep multi-modal prompts.

Text prompts at depths 0..J-1 (the shallow context plus J-1 deep prompts that replace the prompt
tokens at the input of layers 1..J-1); each is coupled to a vision prompt by one linear projection
per depth (F: D_text → D_vision). Vision prompts are appended to the ViT sequence before ``ln_pre``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlgate.config.methods import MaPLeConfig
from mlgate.diagnostics import depth_metrics
from mlgate.methods._registry import register
from mlgate.methods.base import PromptMethod
from mlgate.methods.prompts import ClassTokens, init_context


def resolve_depth(clip, cfg: MaPLeConfig) -> int:
    """``cfg.depth``, or the method's reference depth capped at the backbone's layer count."""
    layers = clip.num_layers
    if cfg.depth is None:
        return min(cfg.default_depth, layers)
    if cfg.depth > layers:
        raise ValueError(f"method.depth {cfg.depth} exceeds the {layers} layers of backbone {clip.name!r}")
    return cfg.depth


def linear_per_layer(layers: Sequence[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """``layers[k](x[k])`` for every depth k at once, (K, n, D_in) → (K, n, D_out): one batched matmul
    instead of K small ones (and, under autocast, one cast of the stacked weights instead of K)."""
    weight = torch.stack([layer.weight for layer in layers])  # (K, D_out, D_in)
    bias = torch.stack([layer.bias for layer in layers]).unsqueeze(1)
    return torch.baddbmm(bias, x, weight.transpose(1, 2))


@register("maple")
class MaPLe(PromptMethod):
    Config = MaPLeConfig
    prompts_vision = True

    def __init__(self, clip, classnames: list[str], cfg: MaPLeConfig) -> None:
        super().__init__(clip, cfg)
        self.depth = resolve_depth(clip, cfg)
        d_text, d_vision = clip.text_width, clip.vision_width
        self.tokens = ClassTokens(clip, classnames, cfg.n_ctx)
        self.ctx = nn.Parameter(init_context(clip, cfg.n_ctx, cfg.ctx_init))
        device = self.ctx.device
        self.proj = nn.Linear(d_text, d_vision).to(device)
        self.deep_text = nn.Parameter(torch.randn(self.depth - 1, cfg.n_ctx, d_text, device=device) * 0.02)
        self.deep_proj = nn.ModuleList(nn.Linear(d_text, d_vision) for _ in range(self.depth - 1)).to(device)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"prompt": [self.ctx, self.deep_text],
                "coupling": [*self.proj.parameters(), *self.deep_proj.parameters()]}

    def metrics(self) -> dict[str, torch.Tensor]:
        # Per-depth prompt gradient norms and their decay with depth: how far gradients reach down.
        if self.ctx.grad is None:
            return {}
        norms = [self.ctx.grad.norm().unsqueeze(0)]
        if self.deep_text.grad is not None:
            norms.append(torch.linalg.vector_norm(self.deep_text.grad, dim=(1, 2)))
        return depth_metrics(torch.cat(norms))

    def layer_prompts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Text and vision prompts per depth 0..J-1 (each (n_ctx, D))."""
        text, vision = [self.ctx, *self.deep_text], [self.proj(self.ctx)]
        if len(self.deep_proj):
            vision += linear_per_layer(self.deep_proj, self.deep_text).unbind(0)
        return text, vision

    def encode(self, images: torch.Tensor, class_ids: torch.Tensor, text: list[torch.Tensor | None],
               vision: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized image and text features from per-depth prompts (None at a depth: carry the previous
        layer's tokens). The shallow prompt may have fewer than n_ctx tokens (gated ones dropped): the
        EOT position follows."""
        n0 = text[0].shape[0]
        prompts, eot = self.tokens.assemble(text[0], class_ids)
        eot = eot - (self.cfg.n_ctx - n0)
        text_features = self.clip.encode_text_embeddings(prompts, eot, n0, [None, *text[1:]])
        image_features = self.clip.encode_image_prompted(images, vision[0], [None, *vision[1:]])
        return F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)

    def features(self, images: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text, vision = self.layer_prompts()
        return self.encode(images, class_ids, text, vision)
