"""Gradient and gate diagnostics in the contract's metric vocabulary, computed on the device.

Every recorded step adds one small tensor on the training device; :meth:`Diagnostics.drain` moves all
of them to the host in a single transfer, so diagnostics never sync the host per parameter or per step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

_EPS = 1e-30  # keeps log10 finite when a gradient is exactly zero


def group_grad_norm(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """L2 norm of the gradients of ``params`` together (0 where none has a gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if len(grads) == 1:
        return torch.linalg.vector_norm(grads[0])
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # one fused pass


def cancellation(term_grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """1 − ‖Σₖ gₖ‖ / Σₖ ‖gₖ‖ over the loss terms' gradients (0 = all agree, →1 = they cancel)."""
    total = torch.stack(list(term_grads)).sum(0)
    denominator = torch.stack([torch.linalg.vector_norm(g) for g in term_grads]).sum()
    return 1.0 - torch.linalg.vector_norm(total) / denominator.clamp_min(_EPS)


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) in nats, elementwise (0 at p∈{0,1}, log 2 at p=0.5)."""
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])


class Diagnostics:
    """Records ``loss/*``, ``grad/*`` and ``gate/*`` metrics for one model.

    ``prompt_params`` and ``gate_params`` are the parameter groups. ``gate_values()`` returns the gate
    activations, flat (G,) or per input (B, G); by default σ of the gate parameters. ``extra_metrics()``
    adds model-specific metrics (per-depth gate values, ADAPT's mask lengths, say). ``record`` is called after ``backward()``
    and before the optimizer step.
    """

    def __init__(self, prompt_params: Sequence[nn.Parameter], gate_params: Sequence[nn.Parameter] = (),
                 gate_values: Callable[[], torch.Tensor | None] | None = None,
                 extra_metrics: Callable[[], dict[str, torch.Tensor]] | None = None) -> None:
        self.prompt_params = list(prompt_params)
        self.gate_params = list(gate_params)
        self._gate_values = gate_values or (lambda: _flat([torch.sigmoid(p) for p in self.gate_params]))
        self._extra_metrics = extra_metrics or dict
        self.gate_init: torch.Tensor | None = None
        if self.gate_params:
            init = self._gate_values()
            self.gate_init = None if init is None or init.dim() > 1 else init.detach().clone()
        self._steps: list[int] = []
        self._keys: list[tuple[str, ...]] = []
        self._rows: list[torch.Tensor] = []

    def gate_values(self) -> torch.Tensor:
        """Gate activations, flat (G,) — averaged over the batch for input-dependent gates."""
        values = self._gate_values()
        return values.mean(0) if values.dim() > 1 else values

    def term_gate_grads(self, terms: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Flat gate gradients of each loss term. Call before ``backward()`` (graphs are kept)."""
        if not self.gate_params:
            return []
        out = []
        for term in terms.values():
            grads = torch.autograd.grad(term, self.gate_params, retain_graph=True, allow_unused=True)
            out.append(_flat([torch.zeros_like(p) if g is None else g for p, g in zip(self.gate_params, grads)]))
        return out

    @torch.no_grad()
    def record(self, step: int, losses: dict[str, torch.Tensor] | None = None,
               reg_gate_grads: Sequence[torch.Tensor] | None = None) -> None:
        """Queue this step's metrics as one device tensor.

        ``losses`` maps metric names (``loss/total``...) to scalars. ``reg_gate_grads`` are the
        regularizers' gate gradients (:meth:`term_gate_grads`): the classification term's is the total
        minus theirs (linearity), so cancellation needs no extra backward pass through the model.
        """
        keys: list[str] = []
        row: list[torch.Tensor] = []
        for key, value in (losses or {}).items():
            keys.append(key)
            row.append(value.detach())
        prompt_norm = group_grad_norm(self.prompt_params)
        keys.append("grad/prompt_norm")
        row.append(prompt_norm)
        if self.gate_params:
            gate_grad = _flat([torch.zeros_like(p) if p.grad is None else p.grad for p in self.gate_params])
            gate_norm = torch.linalg.vector_norm(gate_grad)
            prompt_norm = prompt_norm.to(gate_grad.device)
            reg = list(reg_gate_grads or [])
            # With the classification term alone there is nothing to cancel: exactly 0, no kernels.
            cancel = cancellation([gate_grad - torch.stack(reg).sum(0)] + reg) if reg else gate_norm.new_zeros(())
            values = self._gate_values()
            act = values.mean(0) if values.dim() > 1 else values
            if self.gate_init is None:  # input-dependent gates: drift from their first measured mean
                self.gate_init = act.detach().clone()
            # Input dependence: std across the batch, averaged over gates (0 for static gates).
            batch_std = values.std(0).mean() if values.dim() > 1 and values.shape[0] > 1 else act.new_zeros(())
            keys += ["grad/gate_norm", "grad/gap_log10", "grad/gate_cancellation", "gate/mean", "gate/min",
                     "gate/max", "gate/drift", "gate/batch_std", "gate/effective_length", "gate/entropy"]
            row += [
                gate_norm,
                torch.log10(prompt_norm.clamp_min(_EPS) / gate_norm.clamp_min(_EPS)),
                cancel,
                act.mean(), act.min(), act.max(),
                (act - self.gate_init).abs().max(),
                batch_std,
                act.sum(),
                binary_entropy(act).mean(),
            ]
        extra = self._extra_metrics()
        keys += list(extra)  # method-specific ones override the generic (e.g. effective_length)
        row += list(extra.values())
        device = row[-1].device
        self._steps.append(step)
        self._keys.append(tuple(keys))
        row = [r if r.dtype == torch.float32 and r.device == device else r.to(device, torch.float32) for r in row]
        self._rows.append(torch.stack(row))

    def drain(self) -> list[tuple[int, dict[str, float]]]:
        """Everything queued since the last drain, moved to the host in one transfer."""
        if not self._rows:
            return []
        values = torch.cat(self._rows).cpu().tolist()
        out, start = [], 0
        for step, keys in zip(self._steps, self._keys):
            out.append((step, dict(zip(keys, values[start : start + len(keys)]))))
            start += len(keys)
        self._steps, self._keys, self._rows = [], [], []
        return out
