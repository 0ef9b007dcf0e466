"""Gradient and gate diagnostics in mlgate's metric vocabulary (docs/metrics.md), computed on the device.

A recorded step keeps a few small copies on the training device (gradient norms, the gate gradient and
values); :meth:`Diagnostics.drain` computes every metric of the queued steps in one batched pass and moves
them to the host in a single transfer, so diagnostics never sync the host per parameter or per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from mlgate.verdicts import EVIDENCE_KEYS

_EPS = 1e-30  # keeps log10 finite when a gradient is exactly zero


def group_grad_norm(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """L2 norm of the gradients of ``params`` together (0 where none has a gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if len(grads) == 1:
        return torch.linalg.vector_norm(grads[0])
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # one fused pass


def cancellation(term_grads: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """1 − ‖Σₖ gₖ‖ / Σₖ ‖gₖ‖ over the loss terms' gradients (0 = all agree, →1 = they cancel): of a
    list of gradients, or of a stacked (..., terms, G) tensor, one value per leading index."""
    terms = term_grads if isinstance(term_grads, torch.Tensor) else torch.stack(list(term_grads))
    denominator = torch.linalg.vector_norm(terms, dim=-1).sum(-1)
    return 1.0 - torch.linalg.vector_norm(terms.sum(-2), dim=-1) / denominator.clamp_min(_EPS)


def regularizer_conflict(cls: torch.Tensor, reg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How the regularizers' gate gradient ``reg`` meets the classification term's ``cls`` ((..., G)
    each): their cosine (−1: opposed; the gating paper's appendix B1) and the ratio of their norms
    ‖reg‖ / ‖cls‖ (B3)."""
    cls_norm, reg_norm = torch.linalg.vector_norm(cls, dim=-1), torch.linalg.vector_norm(reg, dim=-1)
    cosine = (cls * reg).sum(-1) / (cls_norm * reg_norm).clamp_min(_EPS)
    return cosine, reg_norm / cls_norm.clamp_min(_EPS)


def depth_metrics(norms: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-depth prompt-gradient norms (K,) as ``grad/prompt_norm/d<k>``, and ``grad/depth_decay``: the
    least-squares slope of their log10 against depth (appendix A3; negative: gradients fade with depth)."""
    out = {f"grad/prompt_norm/d{k}": v for k, v in enumerate(norms)}
    if len(norms) > 1:
        depth = torch.arange(len(norms), dtype=norms.dtype, device=norms.device)
        logs = torch.log10(norms.clamp_min(_EPS))
        centred = depth - depth.mean()
        out["grad/depth_decay"] = (centred * (logs - logs.mean())).sum() / centred.square().sum()
    return out


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) in nats, elementwise (0 at p∈{0,1}, log 2 at p=0.5)."""
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])


GATE_KEYS = ("grad/gate_norm", "grad/gap_log10", "grad/gate_cancellation", "gate/mean", "gate/min", "gate/max",
             "gate/drift", "gate/effective_length", "gate/entropy")


# Sent to MLflow at every diagnostics step; every other diagnostic (the loss's parts, the gates' spread,
# entropy and cancellation, per-depth series, method-specific metrics) at a coarser interval, since each
# metric row costs the tracking store's Python about as much as a small model's step (docs/metrics.md).
HEADLINE_KEYS = frozenset({"loss/total", "grad/prompt_norm", "grad/gate_norm", *EVIDENCE_KEYS})


def at_interval(rows: list[tuple[int, dict[str, float]]], interval: int, last_step: int
                ) -> list[tuple[int, dict[str, float]]]:
    """``rows`` with the metrics outside :data:`HEADLINE_KEYS` kept only at multiples of ``interval``
    and at ``last_step``."""
    if interval <= 1:
        return rows
    return [(step, values if step % interval == 0 or step == last_step
             else {k: v for k, v in values.items() if k in HEADLINE_KEYS}) for step, values in rows]


def input_spread(values: torch.Tensor) -> torch.Tensor:
    """Mean over gates of the std of the activations across inputs, of (N, G) per-input gate values:
    how much the gates depend on the input (``gate/batch_std``, ``gate/input_std``)."""
    return values.float().std(0).mean()


@dataclass
class _Step:
    """What one recorded step leaves for :meth:`Diagnostics.drain`: its raw ingredients, on the device."""

    step: int
    loss_keys: tuple[str, ...]
    losses: torch.Tensor | None  # (n_losses,)
    prompt_norm: torch.Tensor  # ()
    gate_grad: torch.Tensor | None  # (G,), a copy (clipping later scales the gradients in place)
    gate_values: torch.Tensor | None  # σ(g): (G,), or (B, G) for input-dependent gates
    reg_gate_grads: torch.Tensor | None  # (n_regularizers, G)
    extra_keys: tuple[str, ...]
    extra: torch.Tensor | None  # (n_extra,)

    def signature(self) -> tuple:
        # Steps with the same signature stack into one batch at drain time.
        return (self.loss_keys, self.extra_keys, None if self.gate_values is None else tuple(self.gate_values.shape),
                None if self.reg_gate_grads is None else self.reg_gate_grads.shape[0])


def _gate_columns(steps: list[_Step], gate_init: torch.Tensor) -> tuple[tuple[str, ...], torch.Tensor]:
    # The gate metrics of K steps, computed together: their keys and a (K, len(keys)) table.
    prompt_norm = torch.stack([s.prompt_norm for s in steps])
    grad = torch.stack([s.gate_grad for s in steps])  # (K, G)
    gate_norm = torch.linalg.vector_norm(grad, dim=-1)
    prompt_norm = prompt_norm.to(grad.device)
    conflict = None
    if steps[0].reg_gate_grads is not None:
        # The classification term's gate gradient is the total minus the regularizers' (linearity).
        reg = torch.stack([s.reg_gate_grads for s in steps])  # (K, R, G)
        cls = grad - reg.sum(1)
        cancel = cancellation(torch.cat([cls.unsqueeze(1), reg], dim=1))
        conflict = regularizer_conflict(cls, reg.sum(1))
    else:  # with the classification term alone there is nothing to cancel: exactly 0
        cancel = torch.zeros_like(gate_norm)
    values = torch.stack([s.gate_values for s in steps])  # (K, G) or (K, B, G)
    act = values.mean(1) if values.dim() == 3 else values
    columns = [
        gate_norm,
        torch.log10(prompt_norm.clamp_min(_EPS) / gate_norm.clamp_min(_EPS)),
        cancel,
        act.mean(-1), act.amin(-1), act.amax(-1),
        (act - gate_init).abs().amax(-1),
        act.sum(-1),
        binary_entropy(act).mean(-1),
    ]
    keys = GATE_KEYS
    if values.dim() == 3 and values.shape[1] > 1:  # input-dependent gates, two inputs or more
        columns.append(values.float().std(1).mean(-1))
        keys += ("gate/batch_std",)
    if conflict is not None:  # a regularizer acts on the gates
        columns += list(conflict)
        keys += ("grad/conflict_cos", "grad/reg_dominance")
    return keys, torch.stack(columns, dim=1).float()


class Diagnostics:
    """Records ``loss/*``, ``grad/*`` and ``gate/*`` metrics for one model.

    ``prompt_params`` and ``gate_params`` are the parameter groups. ``gate_values()`` returns the gates'
    activations σ(g) (the temperature left out), flat (G,) or per input (B, G); by default σ of the gate
    parameters. ``gate_init`` is what ``gate/drift`` measures from: by default the gate values at
    construction (input-dependent gates must be given theirs: the mean over inputs at init).
    ``extra_metrics()`` adds model-specific metrics (per-depth gate values, ADAPT's mask lengths, say).
    ``record`` is called after ``backward()`` and before the optimizer step.
    """

    def __init__(self, prompt_params: Sequence[nn.Parameter], gate_params: Sequence[nn.Parameter] = (),
                 gate_values: Callable[[], torch.Tensor | None] | None = None,
                 extra_metrics: Callable[[], dict[str, torch.Tensor]] | None = None,
                 gate_init: torch.Tensor | None = None) -> None:
        self.prompt_params = list(prompt_params)
        self.gate_params = list(gate_params)
        self._gate_values = gate_values or (lambda: _flat([torch.sigmoid(p) for p in self.gate_params]))
        self._extra_metrics = extra_metrics or dict
        self.gate_init = None if gate_init is None else gate_init.detach().clone()
        if self.gate_params and self.gate_init is None:
            init = self._gate_values()
            if init is not None and init.dim() > 1:
                raise ValueError("input-dependent gates need their gate_init (the mean over inputs at init)")
            self.gate_init = None if init is None else init.detach().clone()
        self._queue: list[_Step] = []

    def gate_values(self) -> torch.Tensor:
        """Gate activations σ(g), flat (G,): averaged over the batch for input-dependent gates."""
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
        """Queue this step's metrics.

        ``losses`` maps metric names (``loss/total``...) to scalars. ``reg_gate_grads`` are the
        regularizers' gate gradients (:meth:`term_gate_grads`): the classification term's is the total
        minus theirs (linearity), so cancellation needs no extra backward pass through the model.
        Only the raw ingredients are kept here (a few small copies); every metric is computed at
        :meth:`drain`, for all queued steps at once, which keeps the per-step cost to a handful of kernels.
        """
        losses = losses or {}
        gate_grad = values = reg = None
        if self.gate_params:
            gate_grad = _flat([torch.zeros_like(p) if p.grad is None else p.grad for p in self.gate_params]).clone()
            values = self._gate_values().detach()
            reg = torch.stack(list(reg_gate_grads)) if reg_gate_grads else None
        extra = self._extra_metrics()
        self._queue.append(_Step(
            step=step, loss_keys=tuple(losses),
            losses=torch.stack([v.detach().float() for v in losses.values()]) if losses else None,
            prompt_norm=group_grad_norm(self.prompt_params), gate_grad=gate_grad, gate_values=values,
            reg_gate_grads=reg, extra_keys=tuple(extra),
            extra=torch.stack([v.detach().float() for v in extra.values()]) if extra else None))

    def drain(self) -> list[tuple[int, dict[str, float]]]:
        """Every metric of the steps queued since the last drain, computed together and moved to the
        host in one transfer."""
        if not self._queue:
            return []
        groups: dict[tuple, list[_Step]] = {}
        for entry in self._queue:
            groups.setdefault(entry.signature(), []).append(entry)
        tables, layout = [], []
        for steps in groups.values():
            first = steps[0]
            columns = [] if first.losses is None else [torch.stack([s.losses for s in steps])]
            columns.append(torch.stack([s.prompt_norm for s in steps]).float().unsqueeze(1))
            keys = [*first.loss_keys, "grad/prompt_norm"]
            if first.gate_grad is not None:
                gate_keys, gate_table = _gate_columns(steps, self.gate_init)
                columns.append(gate_table)
                keys += gate_keys
            if first.extra is not None:  # method-specific ones override the generic (e.g. effective_length)
                columns.append(torch.stack([s.extra for s in steps]))
                keys += first.extra_keys
            device = columns[-1].device
            tables.append(torch.cat([c.to(device) for c in columns], dim=1).reshape(-1))
            layout.append(([s.step for s in steps], keys))
        device = tables[0].device
        values = torch.cat([t.to(device) for t in tables]).cpu().tolist()
        out, start = [], 0
        for steps, keys in layout:
            for step in steps:
                out.append((step, dict(zip(keys, values[start : start + len(keys)]))))
                start += len(keys)
        self._queue = []
        out.sort(key=lambda row: row[0])
        return out
