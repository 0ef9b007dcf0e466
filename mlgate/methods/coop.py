"""CoOp (Zhou et al., 2022) with the gating paper's optional per-token sigmoid gates (CoOp-gating).

Prompt for class c: ``[SOS] σ(g₁)v₁ … σ(g_M)v_M  <classname> . [EOS]`` — the M context vectors v are
shared across classes (or class-specific with ``csc``), and each is scaled by its gate σ(gᵢ).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from mlgate.config.methods import CoOpConfig
from mlgate.methods._registry import register
from mlgate.methods.base import PromptMethod
from mlgate.methods.gates import init_gate_logits
from mlgate.methods.prompts import ClassTokens, init_context


@register("coop")
class CoOp(PromptMethod):
    Config = CoOpConfig
    prompts_vision = False

    def __init__(self, clip, classnames: list[str], cfg: CoOpConfig) -> None:
        super().__init__(clip, cfg)
        self.tokens = ClassTokens(clip, classnames, cfg.n_ctx)
        self.ctx = nn.Parameter(init_context(clip, cfg.n_ctx, cfg.ctx_init, (len(classnames),) if cfg.csc else ()))
        self.gates = (nn.Parameter(init_gate_logits(cfg.n_ctx, cfg.gate).to(self.ctx.device))
                      if cfg.gate.enabled else None)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"prompt": [self.ctx]}
        if self.gates is not None:
            groups["gate"] = [self.gates]
        return groups

    def swappable_gates(self) -> dict[str, torch.Tensor]:
        return {} if self.gates is None else {"token": self.gates}

    def context(self) -> torch.Tensor:
        """The (gated) context vectors: (M, D), or (C, M, D) with class-specific context."""
        if self.gates is None:
            return self.ctx
        return self.ctx * self.gate_activation(self.gates).unsqueeze(-1)

    def text_features(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Normalized text features (len(class_ids), E) of the learned prompts, in one batched pass."""
        ctx = self.context()
        if ctx.dim() == 3:
            ctx = ctx[class_ids]
        if ctx.dim() == 2 and self.cfg.class_token_position == "end":
            # SOS + the shared context open every prompt: encoded once, not once per class.
            text = self.clip.encode_text_shared_prefix(*self.tokens.assemble_shared(ctx, class_ids))
        else:
            text = self.clip.encode_text_embeddings(
                *self.tokens.assemble_positioned(ctx, class_ids, self.cfg.class_token_position))
        return F.normalize(text, dim=-1)

    def features(self, image_features: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(image_features, dim=-1), self.text_features(class_ids)

    def regularizers(self) -> dict[str, torch.Tensor]:
        if self.gates is None or self.cfg.gate.sparsity == 0:
            return {}
        return {"sparsity": self.cfg.gate.sparsity * self.gate_activation(self.gates).sum()}
