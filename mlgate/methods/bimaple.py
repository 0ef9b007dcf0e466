"""BiMaPLe: MaPLe with bidirectional coupling (the gating paper's testbed before gates).

Per deep layer i: vᵢ = Fᵢ(tᵢ) as in MaPLe, then text←vision and vision←text MLPs fused with learnable
coefficients a = σ(αᵢ), b = σ(βᵢ):  tᵢ' = a·tᵢ + (1−a)·V2Lᵢ(vᵢ),  vᵢ' = b·vᵢ + (1−b)·L2Vᵢ(tᵢ').
A cycle-consistency loss keeps the round trip close: mean_i MSE(tᵢ, V2Lᵢ(L2Vᵢ(tᵢ))).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from mlgate.config.methods import BiMaPLeConfig
from mlgate.methods._registry import register
from mlgate.methods.maple import MaPLe, linear_per_layer


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    hidden = max(d_in // 2, 64)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


def _mlp_per_layer(mlps: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    # mlps[k](x[k]) for every depth k at once, (K, n, D_in) → (K, n, D_out) (see linear_per_layer).
    hidden = F.relu(linear_per_layer([m[0] for m in mlps], x))
    return linear_per_layer([m[2] for m in mlps], hidden)


@register("bimaple")
class BiMaPLe(MaPLe):
    Config = BiMaPLeConfig

    def __init__(self, clip, classnames: list[str], cfg: BiMaPLeConfig) -> None:
        super().__init__(clip, classnames, cfg)
        d_text, d_vision, n_deep = clip.text_width, clip.vision_width, self.depth - 1
        device = self.ctx.device
        self.l2v = nn.ModuleList(_mlp(d_text, d_vision) for _ in range(n_deep)).to(device)
        self.v2l = nn.ModuleList(_mlp(d_vision, d_text) for _ in range(n_deep)).to(device)
        self.alpha = nn.Parameter(torch.full((n_deep,), cfg.fusion_init, device=device))
        self.beta = nn.Parameter(torch.full((n_deep,), cfg.fusion_init, device=device))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups()
        groups["coupling"] += [*self.l2v.parameters(), *self.v2l.parameters(), self.alpha, self.beta]
        return groups

    def layer_prompts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Every deep layer at once: (K, n, D) stacks through batched couplings (one matmul per
        # coupling layer for all K depths, not K of them), then one view per depth.
        text, vision = [self.ctx], [self.proj(self.ctx)]
        if len(self.deep_text):
            t = self.deep_text
            v = linear_per_layer(self.deep_proj, t)
            a, b = torch.sigmoid(self.alpha)[:, None, None], torch.sigmoid(self.beta)[:, None, None]
            t_fused = a * t + (1 - a) * _mlp_per_layer(self.v2l, v)
            text += t_fused.unbind(0)
            vision += (b * v + (1 - b) * _mlp_per_layer(self.l2v, t_fused)).unbind(0)
        return text, vision

    def regularizers(self) -> dict[str, torch.Tensor]:
        if self.cfg.cycle_weight == 0 or len(self.deep_text) == 0:
            return {}
        t = self.deep_text  # the mean over depths of each depth's MSE: every depth has as many values
        cycle = F.mse_loss(_mlp_per_layer(self.v2l, _mlp_per_layer(self.l2v, t)), t)
        return {"cycle": self.cfg.cycle_weight * cycle}
