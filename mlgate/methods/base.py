"""What every prompt-learning method shares: its config base, gate settings, and the module interface.

A method is a small ``nn.Module`` on top of one frozen :class:`~mlgate.clip.PromptedCLIP`. It owns the
trainable prompt/gate parameters, scores images against a subset of classes, and names its parameter
groups so the optimizer, the diagnostics and ``mlgate describe`` all see the same split.
"""

from __future__ import annotations

import contextlib
from abc import ABCMeta, abstractmethod
from pathlib import Path
from typing import ClassVar, Iterator, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from mlgate.clip import kept


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
        "init_low linearly over the token positions of each depth (early tokens favoured).",
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


#: Gate logit of a gate that is fully on (σ(10) ≈ 0.99995): the ``fixed`` all-on strategy.
GATE_ON = 10.0

#: How :meth:`PromptMethod.swapped_gates` can replace learned gates at evaluation (the paper's Table II).
GATE_SWAPS = ("fixed", "random", "per_layer", "per_token")


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
    raise ValueError(f"unknown gate swap {strategy!r}; valid: {', '.join(GATE_SWAPS)}")


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


class PromptMethod(nn.Module, metaclass=ABCMeta):
    """Interface of a prompt-learning method.

    ``forward(images_or_features, class_ids)`` returns logits over ``class_ids`` (a LongTensor of
    indices into the method's full class list). ``prompts_vision`` says whether the vision tower is
    prompted; when it is not, the trainer feeds cached frozen image features instead of images.
    """

    Config: ClassVar[type[MethodConfig]]
    prompts_vision: ClassVar[bool] = False
    #: (eps, cap) of gradient equilibrium on the gate logits, set by the trainer; None: off.
    gate_equilibrium: tuple[float, float] | None = None

    def __init__(self, clip, cfg: MethodConfig) -> None:
        super().__init__()
        object.__setattr__(self, "clip", clip)  # frozen backbone: used, not owned (no params, no state)
        self.cfg = cfg
        # A tensor updated in place, not a float: a compiled step (train.compile) reads it as an input
        # rather than recompiling for every value an annealing schedule takes.
        device = clip.text.token_embedding.weight.device
        self.register_buffer("_gate_temperature", torch.ones((), device=device), persistent=False)
        self._gate_temperature_value = 1.0  # what it holds, read on the host

    @property
    def gate_temperature(self) -> torch.Tensor:
        """Temperature T of the gate sigmoid σ(g/T) (a 0-d tensor); the trainer anneals it when the spec asks."""
        return self._gate_temperature

    @gate_temperature.setter
    def gate_temperature(self, value: float) -> None:
        if value != self._gate_temperature_value:  # a constant temperature costs no kernel per step
            self._gate_temperature.fill_(value)
            self._gate_temperature_value = value

    def gate_activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Gate values σ(g/T) of gate logits (with gradient equilibrium in the backward when it is on)."""
        if self.gate_equilibrium is not None and torch.is_grad_enabled():
            return _EqualizedSigmoid.apply(logits, self.gate_temperature, *self.gate_equilibrium)
        return torch.sigmoid(logits / self.gate_temperature)

    @property
    def gates_depend_on_input(self) -> bool:
        """Whether the gates are computed from each input (then gate values are (B, G))."""
        return False

    @abstractmethod
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group (``prompt``, ``gate``, ...), in a stable order."""

    def regularizers(self) -> dict[str, torch.Tensor]:
        """Named regularization terms already multiplied by their weights (only the active ones)."""
        return {}

    def gate_logits(self) -> torch.Tensor | None:
        """The gate logits g: flat (G,) for static gates, (B, G) for input-dependent ones (from the
        last forward); None without learned gates. Default: the ``gate`` group's parameters."""
        gates = self.param_groups().get("gate", [])
        if not gates:
            return None
        return torch.cat([p.reshape(-1) for p in gates])

    def gate_values(self) -> torch.Tensor | None:
        """The gate activations σ(g/T) the forward applies, laid out as :meth:`gate_logits`."""
        gates = self.param_groups().get("gate", [])
        if not gates:
            return None
        return torch.cat([self.gate_activation(p).reshape(-1) for p in gates])

    def gate_states(self) -> torch.Tensor | None:
        """σ(g) of the gate logits, the temperature left out: what the gates have learned, which the
        diagnostics and the gate artifacts report (an annealed temperature alone moves nothing)."""
        logits = self.gate_logits()
        return None if logits is None else torch.sigmoid(logits)

    def swappable_gates(self) -> dict[str, torch.Tensor]:
        """The learned static gate logits by kind: ``token`` (per-token gates, (n,) or one row per layer
        (layers, n)) and ``depth`` (one insertion gate per deep layer). Empty for a method without
        learned gates, or whose gates are computed from the input (a head's weights are no logits)."""
        return {}

    @contextlib.contextmanager
    def swapped_gates(self, strategy: str, seed: int = 0) -> Iterator[None]:
        """Inside, the learned gates are replaced as ``strategy`` (one of :data:`GATE_SWAPS`) says:
        ``fixed`` all on, ``random`` logits ±2 + N(0, 0.5) drawn from a generator seeded with ``seed``
        (depth gates included), ``per_layer`` each layer's token gates set to their mean logit,
        ``per_token`` the learned gates as they are. Values are written into the gate tensors in place
        and restored bit for bit on exit: the Parameter objects, which the optimizer holds, stay."""
        gates = self.swappable_gates()
        saved = {kind: t.detach().clone() for kind, t in gates.items()}
        generator = torch.Generator().manual_seed(seed)
        try:
            with torch.no_grad():
                for kind, t in gates.items():
                    t.copy_(swapped_logits(strategy, kind, t, generator))
            yield
        finally:
            with torch.no_grad():
                for kind, t in gates.items():
                    t.copy_(saved[kind])

    def metrics(self) -> dict[str, torch.Tensor]:
        """Method-specific metrics for the diagnostics row (device scalars), e.g. ``gate/depth_prob/d3``."""
        return {}

    # ---- training-loop hooks (no-ops unless a method needs them, like ADAPT's pruning) ---------------

    def init_from_data(self, images: torch.Tensor) -> None:
        """Before the first step, for methods that prompt the vision tower: some training images."""

    def on_train_start(self, total_steps: int, steps_per_epoch: int) -> None:
        """Called once before the first step with the trial's step budget and epoch length."""

    def on_backward(self, step: int) -> None:
        """After ``backward()`` of ``step`` (1-based), before the optimizer step: gradients are there."""

    def on_step(self, step: int, total_steps: int) -> None:
        """After the optimizer step of ``step``."""

    def on_epoch_end(self, step: int) -> None:
        """At each epoch boundary (and the last step)."""

    def save_artifacts(self, folder: Path) -> None:
        """Write method artifacts (masks, schedules) into ``folder``; they land in the trial run."""

    def images(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        """Step-aware images to log (key → [(step, RGB uint8 array)]), e.g. ADAPT's masks."""
        return {}

    def use_full_context(self) -> None:
        """Push the full 77-token context instead of trimmed prompts, as the reference trainers do
        (``mlgate bench``'s reference configuration)."""
        for name, child in list(self.named_children()):
            if isinstance(child, ClassTokens):
                setattr(self, name, ClassTokens(self.clip, child.classnames, child.n_ctx, trim=False).to(child.eot.device))

    def finalize(self) -> dict[str, float]:
        """After training: make the model final (e.g. compact pruned prompts); final metrics to log."""
        return {}


def init_context(clip, n_ctx: int, phrase: str | None, shape_prefix: tuple[int, ...] = ()) -> torch.Tensor:
    """Context vectors (*shape_prefix, n_ctx, D): the token embeddings of ``phrase`` (whose word count
    must be ``n_ctx``), or N(0, 0.02) when ``phrase`` is None."""
    if phrase:
        tokens = clip.tokenize([phrase])
        n_words = int(clip.eot_index(tokens)[0]) - 1
        if n_words != n_ctx:
            raise ValueError(f"method.ctx_init {phrase!r} has {n_words} tokens but n_ctx is {n_ctx}")
        with torch.no_grad():
            ctx = clip.embed_tokens(tokens)[0, 1 : 1 + n_ctx].clone().float()
        return ctx.expand(*shape_prefix, -1, -1).clone() if shape_prefix else ctx
    device = clip.text.token_embedding.weight.device
    return torch.randn(*shape_prefix, n_ctx, clip.text_width, device=device) * 0.02


class ClassTokens(nn.Module):
    """Frozen embeddings of ``[SOS] X…X <classname>. [EOS]`` for every class, split around the
    n_ctx placeholder slots, so learned context can be dropped in (CoOp's token prefix/suffix).
    Sequences are trimmed to the longest class prompt instead of the full 77 tokens."""

    def __init__(self, clip, classnames: list[str], n_ctx: int, trim: bool = True) -> None:
        super().__init__()
        placeholder = " ".join(["X"] * n_ctx)
        tokens = clip.tokenize([f"{placeholder} {name}." if n_ctx else f"{name}." for name in classnames])
        eot = clip.eot_index(tokens)
        if trim:  # (the untrimmed 77 tokens are what the reference trainers push: `mlgate bench` compares)
            tokens = tokens[:, : int(eot.max()) + 1]
        with torch.no_grad():
            embedded = clip.embed_tokens(tokens)
        self.n_ctx = n_ctx
        self.trimmed = trim  # untrimmed: the reference trainers' way, shortcuts off
        self.classnames = list(classnames)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        # Class-name token count (everything between the context and '.'), for front/middle positions.
        self.register_buffer("name_len", eot - 2 - n_ctx, persistent=False)

    def assemble(self, ctx: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (C, L, D) and EOT positions (C,) for ``class_ids`` with context ``ctx``: (n, D)
        shared, or (C, n, D) one per prompt (class-specific or per image)."""
        prefix, suffix = self.prefix[class_ids], self.suffix[class_ids]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(len(class_ids), -1, -1)
        return torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1), self.eot[class_ids]

    def assemble_shared(self, ctx: torch.Tensor, class_ids: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`assemble`'s prompts in the two parts :meth:`PromptedCLIP.encode_text_shared_prefix`
        takes: what they open with, SOS + context, (G, 1 + n, D) for a context (n, D) shared by all
        (G = 1) or one per group (G, n, D); each class's own frozen tokens (C, L − 1 − n, D); and the
        EOT positions (C,)."""
        ctx = ctx.unsqueeze(0) if ctx.dim() == 2 else ctx
        sos = self.prefix[:1].expand(ctx.shape[0], -1, -1)  # every class prompt opens with the same SOS
        # The frozen parts are kept from step to step (the same object each time: what is derived from
        # them downstream is kept too).
        own, eot = kept(self, "_own", (class_ids, self.suffix, self.eot),
                        lambda: (self.suffix[class_ids], self.eot[class_ids]))
        return torch.cat([sos, ctx.to(sos.dtype)], 1), own, eot

    def assemble_positioned(self, ctx: torch.Tensor, class_ids: torch.Tensor, position: str
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`assemble`, with the class name at the ``front`` or in the ``middle`` of the context."""
        if position == "end":
            return self.assemble(ctx, class_ids)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(len(class_ids), -1, -1)
        rows = []
        half = self.n_ctx // 2
        for row, c in enumerate(class_ids.tolist()):
            n = int(self.name_len[c])
            name, rest = self.suffix[c, :n], self.suffix[c, n:]
            parts = ([name, ctx[row]] if position == "front" else [ctx[row, :half], name, ctx[row, half:]])
            rows.append(torch.cat([self.prefix[c], *[p.to(self.prefix.dtype) for p in parts], rest]))
        return torch.stack(rows), self.eot[class_ids]
