"""Gradient and gate diagnostics in the contract's metric vocabulary, computed on the device.

Every recorded step adds one small tensor on the training device; :meth:`Diagnostics.drain` moves all
of them to the host in a single transfer, so diagnostics never sync the host per parameter or per step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_EPS = 1e-30  # keeps log10 finite when a gradient is exactly zero


def group_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """L2 norm of the gradients of ``params`` together (0 where none has a gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def cancellation(term_grads: list[torch.Tensor]) -> torch.Tensor:
    """1 − ‖Σₖ gₖ‖ / Σₖ ‖gₖ‖ over the loss terms' gradients (0 = all agree, →1 = they cancel)."""
    total = torch.stack(term_grads).sum(0)
    denominator = torch.stack([torch.linalg.vector_norm(g) for g in term_grads]).sum()
    return 1.0 - torch.linalg.vector_norm(total) / denominator.clamp_min(_EPS)


class Diagnostics:
    """Records the contract's ``loss/*``, ``grad/*`` and ``gate/*`` metrics for one method.

    ``record`` is called after ``backward()`` and before the optimizer step (gradients unclipped).
    """

    def __init__(self, prompt_params: list[nn.Parameter], gate_logits: torch.Tensor | None) -> None:
        self.prompt_params = prompt_params
        self.gate_logits = gate_logits
        self.gate_init = None if gate_logits is None else torch.sigmoid(gate_logits.detach()).clone()
        self.keys: list[str] = ["loss/total", "loss/cls", "loss/reg", "grad/prompt_norm"]
        if gate_logits is not None:
            self.keys += [
                "grad/gate_norm", "grad/gap_log10", "grad/gate_cancellation",
                "gate/mean", "gate/min", "gate/max", "gate/drift", "gate/batch_std", "gate/effective_length",
            ]
        self._steps: list[int] = []
        self._rows: list[torch.Tensor] = []

    def term_gate_grads(self, regularizers: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Gradients of each regularizer on the gates. Call before ``backward()`` (graphs are kept)."""
        if self.gate_logits is None:
            return []
        grads = []
        for term in regularizers.values():
            (g,) = torch.autograd.grad(term, self.gate_logits, retain_graph=True, allow_unused=True)
            grads.append(torch.zeros_like(self.gate_logits) if g is None else g)
        return grads

    @torch.no_grad()
    def record(self, step: int, total: torch.Tensor, cls: torch.Tensor, reg: torch.Tensor,
               reg_gate_grads: list[torch.Tensor] | None = None) -> None:
        """Queue this step's metrics (as one device tensor)."""
        prompt_norm = group_grad_norm(self.prompt_params).to(total.device)
        row = [total.detach(), cls.detach(), reg.detach(), prompt_norm]
        if self.gate_logits is not None:
            gate_grad = self.gate_logits.grad
            gate_grad = torch.zeros_like(self.gate_logits) if gate_grad is None else gate_grad
            gate_norm = torch.linalg.vector_norm(gate_grad)
            gap = torch.log10(prompt_norm.clamp_min(_EPS) / gate_norm.clamp_min(_EPS))
            # The classification term's gate gradient is the total minus the regularizers' (linearity),
            # so cancellation costs no extra backward pass through CLIP.
            reg_grads = reg_gate_grads or []
            terms = [gate_grad - sum(reg_grads)] + reg_grads if reg_grads else [gate_grad]
            act = torch.sigmoid(self.gate_logits)
            row += [
                gate_norm, gap, cancellation(terms),
                act.mean(), act.min(), act.max(), (act - self.gate_init).abs().max(),
                torch.zeros((), device=act.device),  # static gates do not depend on the input
                act.sum(),
            ]
        self._steps.append(step)
        self._rows.append(torch.stack([r.float().reshape(()) for r in row]))

    def drain(self) -> list[tuple[int, dict[str, float]]]:
        """Everything queued since the last drain, moved to the host in one transfer."""
        if not self._rows:
            return []
        values = torch.stack(self._rows).cpu().tolist()
        out = [(s, dict(zip(self.keys, v))) for s, v in zip(self._steps, values)]
        self._steps, self._rows = [], []
        return out


def finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))
