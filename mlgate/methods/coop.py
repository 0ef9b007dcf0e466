"""CoOp (Zhou et al., 2022) with the gating paper's optional per-token sigmoid gates (CoOp-gating).

Prompt for class c: ``[SOS] σ(g₁)v₁ … σ(g_M)v_M  <classname> . [EOS]`` — the M context vectors v are
shared across classes (or class-specific with ``csc``), and each is scaled by its gate σ(gᵢ).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mlgate.methods import register
from mlgate.methods.base import GateConfig, MethodConfig, PromptMethod, init_gate_logits


class CoOpConfig(MethodConfig):
    name: Literal["coop"] = "coop"
    n_ctx: int = Field(4, ge=1, le=64, description="Number of learnable context tokens M.")
    ctx_init: str | None = Field(
        "a photo of a",
        description="Phrase whose token embeddings initialise the context (its word count must equal "
        "n_ctx); null for random N(0, 0.02) init.",
    )
    csc: bool = Field(False, description="Class-specific context (one context per class).")
    gate: GateConfig = Field(default_factory=GateConfig)


@register("coop")
class CoOp(PromptMethod):
    Config = CoOpConfig
    prompts_vision = False

    def __init__(self, clip, classnames: list[str], cfg: CoOpConfig) -> None:
        super().__init__()
        object.__setattr__(self, "clip", clip)  # frozen backbone: used, not owned (no params, no state)
        self.cfg = cfg
        n_ctx, width = cfg.n_ctx, clip.text_width
        placeholder = " ".join(["X"] * n_ctx)
        prompts = [f"{placeholder} {name}." for name in classnames]
        tokens = clip.tokenize(prompts)
        eot = clip.eot_index(tokens)
        tokens = tokens[:, : int(eot.max()) + 1]  # trim to the longest prompt instead of 77
        with torch.no_grad():
            embedded = clip.embed_tokens(tokens)
        # SOS before the context; class name, '.', EOS (and padding) after it. Frozen, so buffers.
        self.register_buffer("token_prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer("eot", eot, persistent=False)

        if cfg.ctx_init:
            init_tokens = clip.tokenize([cfg.ctx_init])
            n_words = int(clip.eot_index(init_tokens)[0]) - 1
            if n_words != n_ctx:
                raise ValueError(f"method.ctx_init {cfg.ctx_init!r} has {n_words} tokens but n_ctx is {n_ctx}")
            with torch.no_grad():
                ctx = clip.embed_tokens(init_tokens)[0, 1 : 1 + n_ctx].clone()
            if cfg.csc:
                ctx = ctx.unsqueeze(0).repeat(len(classnames), 1, 1)
        else:
            shape = (len(classnames), n_ctx, width) if cfg.csc else (n_ctx, width)
            ctx = torch.randn(shape, device=tokens.device) * 0.02
        self.ctx = nn.Parameter(ctx.float())
        self.gates = (
            nn.Parameter(init_gate_logits(n_ctx, cfg.gate).to(ctx.device)) if cfg.gate.enabled else None
        )

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"prompt": [self.ctx]}
        if self.gates is not None:
            groups["gate"] = [self.gates]
        return groups

    def context(self) -> torch.Tensor:
        """The (gated) context vectors: (M, D), or (C, M, D) with class-specific context."""
        if self.gates is None:
            return self.ctx
        return self.ctx * self.gate_activation(self.gates).unsqueeze(-1)

    def text_features(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Normalized text features (len(class_ids), E) of the learned prompts, in one batched pass."""
        ctx = self.context()
        ctx = ctx[class_ids] if ctx.dim() == 3 else ctx.unsqueeze(0).expand(len(class_ids), -1, -1)
        prefix, suffix = self.token_prefix[class_ids], self.token_suffix[class_ids]
        prompts = torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)
        return F.normalize(self.clip.encode_text_embeddings(prompts, self.eot[class_ids]), dim=-1)

    def forward(self, image_features: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        image_features = F.normalize(image_features, dim=-1)
        text = self.text_features(class_ids)
        return self.clip.logit_scale * image_features @ text.t()

    def regularizers(self) -> dict[str, torch.Tensor]:
        if self.gates is None or self.cfg.gate.sparsity == 0:
            return {}
        return {"sparsity": self.cfg.gate.sparsity * self.gate_activation(self.gates).sum()}
