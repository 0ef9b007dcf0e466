"""CoCoOp (Zhou et al., 2022): image-conditioned context through a meta-net, with the gating paper's
optional gates.

Per image x: π(x) = meta_net(f(x)) shifts every context token, ``ctxᵢ(x) = vᵢ + π(x)``. Gates:
``static`` per-token gates give ``σ(gᵢ)·vᵢ + π(x)`` (the released CoCoOp-gating); ``conditional``
gates are computed from the meta-net's conditioning vector, ``(vᵢ + π(x))·σ(h(π(x))ᵢ)``, so they
depend on the input (``gate/batch_std`` and ``gate/input_std`` measure how much).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from mlgate.config.methods import CoCoOpConfig
from mlgate.methods._registry import register
from mlgate.methods.base import PromptMethod
from mlgate.methods.gates import init_gate_logits
from mlgate.methods.prompts import ClassTokens, init_context


@register("cocoop")
class CoCoOp(PromptMethod):
    Config = CoCoOpConfig
    prompts_vision = False

    def __init__(self, clip, classnames: list[str], cfg: CoCoOpConfig) -> None:
        super().__init__(clip, cfg)
        self.tokens = ClassTokens(clip, classnames, cfg.n_ctx)
        self.ctx = nn.Parameter(init_context(clip, cfg.n_ctx, cfg.ctx_init))
        feature_dim, width = clip.model.visual.output_dim, clip.text_width
        hidden = max(1, feature_dim // cfg.meta_net_reduction)
        device = self.ctx.device
        self.meta_net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, width)).to(device)
        self.gates = self.gate_head = None
        if cfg.gate.enabled and cfg.gate_mode == "static":
            self.gates = nn.Parameter(init_gate_logits(cfg.n_ctx, cfg.gate).to(device))
        elif cfg.gate.enabled:
            self.gate_head = nn.Linear(width, cfg.n_ctx).to(device)
            with torch.no_grad():  # start as the configured static init; the input then modulates it
                self.gate_head.weight.mul_(0.01)
                self.gate_head.bias.copy_(init_gate_logits(cfg.n_ctx, cfg.gate))
        self._last_logits: torch.Tensor | None = None  # (B, n_ctx) conditional gate logits of the last forward

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"prompt": [self.ctx], "meta_net": list(self.meta_net.parameters())}
        if self.gates is not None:
            groups["gate"] = [self.gates]
        elif self.gate_head is not None:
            groups["gate"] = list(self.gate_head.parameters())
        return groups

    @property
    def gates_depend_on_input(self) -> bool:
        return self.gate_head is not None

    def gate_logits(self) -> torch.Tensor | None:
        if self.gate_head is not None:
            return self._last_logits
        return super().gate_logits()

    def swappable_gates(self) -> dict[str, torch.Tensor]:
        return {} if self.gates is None else {"token": self.gates}  # conditional gates have no logits to swap

    def gate_values(self) -> torch.Tensor | None:
        if self.gate_head is not None:
            return None if self._last_logits is None else self.gate_activation(self._last_logits)
        return super().gate_values()

    def features(self, image_features: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = F.normalize(image_features, dim=-1)
        bias = self.meta_net(image_features.to(self.ctx.dtype))  # (B, D): the conditioning vector π(x)
        if self.gates is not None:
            ctx = self.gate_activation(self.gates).unsqueeze(-1) * self.ctx + bias[:, None]
        else:
            ctx = self.ctx.unsqueeze(0) + bias[:, None]  # (B, n, D)
            if self.gate_head is not None:
                self._last_logits = self.gate_head(bias)  # (B, n)
                ctx = ctx * self.gate_activation(self._last_logits).unsqueeze(-1)
        n_img, n_cls = ctx.shape[0], len(class_ids)
        # Every image gets its own prompts for every class, B×C sequences in one batched text pass; an
        # image's prompts all open with SOS and its context, which are encoded once per image.
        text = self.clip.encode_text_shared_prefix(*self.tokens.assemble_shared(ctx, class_ids))
        return image_features, F.normalize(text, dim=-1).view(n_img, n_cls, -1)

    def regularizers(self) -> dict[str, torch.Tensor]:
        values = self.gate_values()
        if values is None or self.cfg.gate.sparsity == 0:
            return {}
        return {"sparsity": self.cfg.gate.sparsity * values.reshape(-1, self.cfg.n_ctx).mean(0).sum()}
