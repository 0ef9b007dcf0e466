"""Gates on prompt tokens: how their logits start, the sigmoid with gradient equilibrium, and the
evaluation-time swaps of the gating paper's Table II."""

from __future__ import annotations

import torch

from mlgate.config.methods import GATE_SWAPS, GateConfig


#: Gate logit of a gate that is fully on (σ(10) ≈ 0.99995): the ``fixed`` all-on strategy.
GATE_ON = 10.0


#: Standard deviation of the noise ``swapped_gates("noise")`` adds to the gate logits (appendix C1).
GATE_NOISE_STD = 0.5


def random_gate_logits(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Random gate logits: ±2 with equal odds plus N(0, 0.5) noise, from ``generator`` (the global RNG
    when None)."""
    signs = torch.randint(0, 2, shape, generator=generator) * 4.0 - 2.0
    return signs + 0.5 * torch.randn(shape, generator=generator)


def swapped_logits(strategy: str, kind: str, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What ``strategy`` puts in place of gate ``logits`` of ``kind`` (``token``: (..., n) per-token
    gates, one row per layer; ``depth``: one insertion gate per layer)."""
    if strategy == "fixed":
        return torch.full_like(logits, GATE_ON)
    if strategy == "random":
        return random_gate_logits(tuple(logits.shape), generator).to(logits)
    if strategy == "per_layer" and kind == "token":
        return logits.mean(-1, keepdim=True).expand_as(logits)
    if strategy in ("per_layer", "per_token"):
        return logits
    if strategy == "noise":  # the learned gates, perturbed
        return logits + GATE_NOISE_STD * torch.randn(logits.shape, generator=generator).to(logits)
    raise ValueError(f"unknown gate swap {strategy!r}; valid: {', '.join((*GATE_SWAPS, 'noise'))}")


def init_gate_logits(shape: int | tuple[int, ...], cfg: GateConfig,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Gate logits of ``shape`` ((tokens,) or (depths, tokens)) initialised as ``cfg`` says; ``biased``
    decays over the token positions (the last dimension), the same at every depth."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if cfg.init == "constant":
        return torch.full(shape, cfg.init_value)
    if cfg.init == "zero":
        return torch.zeros(shape)
    if cfg.init == "normal":
        return cfg.init_value + cfg.init_std * torch.randn(shape, generator=generator)
    if cfg.init == "uniform":
        return torch.empty(shape).uniform_(cfg.init_low, cfg.init_high, generator=generator)
    return torch.linspace(cfg.init_high, cfg.init_low, shape[-1]).expand(shape).clone()


class _EqualizedSigmoid(torch.autograd.Function):
    """σ(g/T) whose backward undoes the sigmoid's attenuation (gradient equilibrium): the gradient
    reaching the logits g is ∂L/∂σ · σ'(g/T) / T scaled by min(T / (σ(1−σ) + eps), cap), i.e. about
    ∂L/∂σ itself wherever the cap allows. Every loss term's gate gradient passes through it alike."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: torch.Tensor, eps: float, cap: float) -> torch.Tensor:
        values = torch.sigmoid(logits / temperature)
        ctx.save_for_backward(values, temperature)
        ctx.eps, ctx.cap = eps, cap
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        values, temperature = ctx.saved_tensors
        slope = values * (1 - values)
        scale = (temperature / (slope + ctx.eps)).clamp(max=ctx.cap)
        return grad * slope / temperature * scale, None, None, None
