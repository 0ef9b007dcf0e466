"""What every prompt-learning method shares: its config base, gate settings, and the module interface.

A method is a small ``nn.Module`` on top of one frozen :class:`~mlgate.clip.PromptedCLIP`. It owns the
trainable prompt/gate parameters, scores images against a subset of classes, and names its parameter
groups so the optimizer, the diagnostics and ``mlgate describe`` all see the same split.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class StrictModel(BaseModel):
    """Pydantic base for every spec section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GateConfig(StrictModel):
    """Per-token sigmoid gates σ(g) on the learned context (the gating paper's CoOp-gating)."""

    enabled: bool = Field(True, description="Multiply each context token by a learnable sigmoid gate.")
    init: Literal["constant", "zero", "normal", "uniform", "biased"] = Field(
        "normal",
        description="How gate logits start: constant=init_value; zero=0 (σ=0.5); normal=init_value+"
        "N(0, init_std) (the reference CoOp-gating); uniform=U(init_low, init_high); biased=init_high→"
        "init_low linearly across tokens (early tokens favoured).",
    )
    init_value: float = Field(0.0, description="Gate logit at init (0 → σ=0.5; 1 → σ≈0.73).")
    init_std: float = Field(0.02, ge=0.0, description="Std of the normal init around init_value.")
    init_low: float = Field(-2.0, description="Lower logit for uniform/biased init.")
    init_high: float = Field(2.0, description="Upper logit for uniform/biased init.")
    sparsity: float = Field(0.0, ge=0.0, description="Weight of the sparsity regularizer λ·Σσ(g).")

    @model_validator(mode="after")
    def _range(self) -> GateConfig:
        if self.init in ("uniform", "biased") and self.init_low > self.init_high:
            raise ValueError(f"init_low ({self.init_low}) must be <= init_high ({self.init_high})")
        return self


class MethodConfig(StrictModel):
    """Base of every method's settings; subclasses add a ``name`` literal and their own fields."""

    name: str


def init_gate_logits(n: int, cfg: GateConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gate logits of length ``n`` initialised as ``cfg`` says."""
    if cfg.init == "constant":
        return torch.full((n,), cfg.init_value)
    if cfg.init == "zero":
        return torch.zeros(n)
    if cfg.init == "normal":
        return cfg.init_value + cfg.init_std * torch.randn(n, generator=generator)
    if cfg.init == "uniform":
        return torch.empty(n).uniform_(cfg.init_low, cfg.init_high, generator=generator)
    return torch.linspace(cfg.init_high, cfg.init_low, n)


class PromptMethod(nn.Module, metaclass=ABCMeta):
    """Interface of a prompt-learning method.

    ``forward(images_or_features, class_ids)`` returns logits over ``class_ids`` (a LongTensor of
    indices into the method's full class list). ``prompts_vision`` says whether the vision tower is
    prompted; when it is not, the trainer feeds cached frozen image features instead of images.
    """

    Config: ClassVar[type[MethodConfig]]
    prompts_vision: ClassVar[bool] = False
    #: Temperature T of the gate sigmoid σ(g/T); the trainer anneals it when the spec asks.
    gate_temperature: float = 1.0

    def gate_activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Gate values σ(g/T) of gate logits."""
        return torch.sigmoid(logits / self.gate_temperature)

    @abstractmethod
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group (``prompt``, ``gate``, ...), in a stable order."""

    def regularizers(self) -> dict[str, torch.Tensor]:
        """Named regularization terms already multiplied by their weights (only the active ones)."""
        return {}
