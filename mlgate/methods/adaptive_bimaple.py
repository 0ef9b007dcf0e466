"""AdaptiveBiMaPLe: BiMaPLe whose prompt length and depth are gated (the gating paper's main testbed).

Length gates: one sigmoid gate per prompt token at every depth 0..J-1 (shared by the text and vision
prompt of that depth). Depth gates: one insertion gate per deep layer 1..J-1 (all of them: the
reference's off-by-one left the first ungated). Training is soft — tokens are scaled by their gate,
deep prompts by their depth gate; inference is hard — tokens with σ ≤ threshold are dropped (the
sequences get shorter, the EOT position follows) and a layer whose depth gate is ≤ threshold inserts
nothing, carrying the previous layer's prompt tokens on.

Also the paper's Table II gate strategies (``per_token``, ``per_layer``, ``fixed`` all-on, ``random``)
and the EuroSAT controls (``param_matched``, ``always_frozen``, ``explicit_reg``).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from mlgate.config.methods import AdaptiveBiMaPLeConfig
from mlgate.methods._registry import register
from mlgate.methods.bimaple import BiMaPLe
from mlgate.methods.gates import GATE_ON, init_gate_logits, random_gate_logits


@register("adaptive_bimaple")
class AdaptiveBiMaPLe(BiMaPLe):
    Config = AdaptiveBiMaPLeConfig

    def __init__(self, clip, classnames: list[str], cfg: AdaptiveBiMaPLeConfig) -> None:
        super().__init__(clip, classnames, cfg)
        device = self.ctx.device
        gated = cfg.control in ("none", "always_frozen")
        use_length = gated and cfg.mode in ("full", "length_only")
        use_depth = gated and cfg.mode in ("full", "depth_only") and self.depth > 1
        width = cfg.n_ctx if cfg.gate_strategy != "per_layer" else 1
        length = init_gate_logits((self.depth, width), cfg.gate).to(device)
        depth = torch.full((max(self.depth - 1, 0),), cfg.depth_gate_init, device=device)
        if cfg.gate_strategy == "fixed":
            length, depth = torch.full_like(length, GATE_ON), torch.full_like(depth, GATE_ON)
        elif cfg.gate_strategy == "random":
            # From the global RNG, which train() seeds with the trial's seed before building the method.
            length = random_gate_logits(tuple(length.shape)).to(device)
            depth = random_gate_logits(tuple(depth.shape)).to(device)
        trainable = cfg.control == "none" and cfg.gate_strategy in ("per_token", "per_layer")
        # Fixed, random and frozen gates are buffers: they act, but nothing trains them.
        self._set_gate("length_gates", length if use_length else None, trainable)
        self._set_gate("depth_gates", depth if use_depth else None, trainable)
        self.token_bias = self.depth_scale = None
        if cfg.control == "param_matched":  # the same count of extra trainable parameters, no gating
            self.token_bias = nn.Parameter(torch.zeros(self.depth, cfg.n_ctx, 1, device=device))
            self.depth_scale = nn.Parameter(torch.zeros(max(self.depth - 1, 0), device=device))

    def _set_gate(self, name: str, logits: torch.Tensor | None, trainable: bool) -> None:
        if logits is None:
            setattr(self, name, None)
        elif trainable:
            setattr(self, name, nn.Parameter(logits))
        else:
            self.register_buffer(name, logits)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups()
        gates = [g for g in (self.length_gates, self.depth_gates) if isinstance(g, nn.Parameter)]
        if gates:
            groups["gate"] = gates
        if self.token_bias is not None:
            groups["coupling"] += [self.token_bias, self.depth_scale]
        return groups

    def swappable_gates(self) -> dict[str, torch.Tensor]:
        gates = {"token": self.length_gates, "depth": self.depth_gates}
        return {kind: g for kind, g in gates.items() if isinstance(g, nn.Parameter)}

    def _length_probs(self) -> torch.Tensor | None:
        if self.length_gates is None:
            return None
        return self.gate_activation(self.length_gates).expand(self.depth, self.cfg.n_ctx)

    def _depth_probs(self) -> torch.Tensor | None:
        return None if self.depth_gates is None else self.gate_activation(self.depth_gates)

    def gate_values(self) -> torch.Tensor | None:
        parts = [p.reshape(-1) for p in (self._length_probs(), self._depth_probs()) if p is not None]
        return torch.cat(parts) if parts else None

    def gate_logits(self) -> torch.Tensor | None:
        # Laid out as gate_values (length gates per depth and token, then depth gates); learned ones only.
        if not any(isinstance(g, nn.Parameter) for g in (self.length_gates, self.depth_gates)):
            return None
        parts = [] if self.length_gates is None else [self.length_gates.expand(self.depth, self.cfg.n_ctx).reshape(-1)]
        return torch.cat(parts + ([] if self.depth_gates is None else [self.depth_gates.reshape(-1)]))

    def metrics(self) -> dict[str, torch.Tensor]:
        out = super().metrics()
        for name, gates in (("length", self.length_gates), ("depth", self.depth_gates)):
            if isinstance(gates, nn.Parameter) and gates.grad is not None:
                norms = gates.grad.norm(dim=-1) if gates.dim() > 1 else gates.grad.abs()
                first = 0 if name == "length" else 1
                out.update({f"grad/gate_norm/{name}/d{k + first}": v for k, v in enumerate(norms)})
        for k in range(self.depth):  # the gap per depth, prompt tokens against their length gates
            prompt, gate = out.get(f"grad/prompt_norm/d{k}"), out.get(f"grad/gate_norm/length/d{k}")
            if prompt is not None and gate is not None:
                out[f"grad/gap_log10/d{k}"] = torch.log10(prompt.clamp_min(1e-30) / gate.clamp_min(1e-30))
        # Reported as σ(g), the temperature left out, as every gate metric (what the gates learned).
        if self.length_gates is not None:
            per_depth = torch.sigmoid(self.length_gates).expand(self.depth, self.cfg.n_ctx).sum(-1)
            out["gate/effective_length"] = per_depth.mean()
            out.update({f"gate/effective_length/d{k}": v for k, v in enumerate(per_depth)})
        if self.depth_gates is not None:
            depth = torch.sigmoid(self.depth_gates)
            out["gate/depth_prob"] = depth.mean()
            out.update({f"gate/depth_prob/d{k + 1}": v for k, v in enumerate(depth)})
        return out

    def features(self, images: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Every depth's prompts in one (J, n, D) tensor per tower, so each control and gate below is
        # one op for all depths (not one per depth, and as many again in the backward).
        text, vision = (torch.stack(p) for p in self.layer_prompts())
        if self.token_bias is not None:  # param_matched control
            scale = F.pad(1 + self.depth_scale, (1, 0), value=1.0)[:, None, None]  # depth 0 unscaled
            text, vision = (text + self.token_bias) * scale, (vision + self.token_bias) * scale
        if self.cfg.control == "explicit_reg" and self.training:
            text, vision = F.dropout(text, self.cfg.dropout), F.dropout(vision, self.cfg.dropout)
        length, depth = self._length_probs(), self._depth_probs()
        if self.training:  # soft: scale tokens by their length gate, deep prompts by their depth gate
            if length is not None:
                text, vision = text * length[:, :, None], vision * length[:, :, None]
            if depth is not None:
                depth = F.pad(depth, (1, 0), value=1.0)[:, None, None]  # the shallow prompt has none
                text, vision = text * depth, vision * depth
            return self.encode(images, class_ids, list(text.unbind(0)), list(vision.unbind(0)))
        return self.encode(images, class_ids, *self._hard_prompts(text.unbind(0), vision.unbind(0), length, depth))

    def _hard_prompts(self, text, vision, length, depth):
        """Inference: drop tokens whose gate is at or below the threshold, skip layers likewise."""
        t_out: list[torch.Tensor | None] = []
        v_out: list[torch.Tensor | None] = []
        for i, (t, v) in enumerate(zip(text, vision)):
            if i > 0 and depth is not None and depth[i - 1] <= self.cfg.threshold:
                t_out.append(None)
                v_out.append(None)
                continue
            if length is not None:
                keep = length[i] > self.cfg.threshold
                t, v = t[keep], v[keep]
            t_out.append(t)
            v_out.append(v)
        return t_out, v_out

    def regularizers(self) -> dict[str, torch.Tensor]:
        out = super().regularizers()  # cycle
        length, depth = self._length_probs(), self._depth_probs()
        if isinstance(self.length_gates, nn.Parameter) and self.cfg.gate.sparsity > 0:
            out["sparsity"] = self.cfg.gate.sparsity * length.sum()
        if isinstance(self.depth_gates, nn.Parameter) and self.cfg.depth_smoothness > 0 and len(depth) > 1:
            out["depth_smoothness"] = self.cfg.depth_smoothness * (depth[1:] - depth[:-1]).abs().sum()
        return out
