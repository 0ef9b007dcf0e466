"""The settings of every prompt-learning method, torch-free: the ``method`` section of a study spec.

Each config names the module that implements it (``module``, imported only to build the method), so
specs validate without importing torch. :data:`METHOD_CONFIGS` is the table of methods: the spec's
``method`` union and :func:`mlgate.methods.build_method` both read it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from mlgate.config.base import StrictModel


#: How a trained model's learned gates can be swapped at evaluation (the gating paper's Table II):
#: all on, random, one per layer, its own per token (``acc/gates/<strategy>``).
GATE_SWAPS = ("fixed", "random", "per_layer", "per_token")


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
    #: The module whose ``@register``-ed class implements the method.
    module: ClassVar[str]


class CoOpConfig(MethodConfig):
    name: Literal["coop"] = "coop"
    module: ClassVar[str] = "mlgate.methods.coop"
    n_ctx: int = Field(4, ge=1, le=64, description="Number of learnable context tokens M.")
    ctx_init: str | None = Field(
        "a photo of a",
        description="Phrase whose token embeddings initialise the context (its word count must equal "
        "n_ctx); null for random N(0, 0.02) init.",
    )
    csc: bool = Field(False, description="Class-specific context (one context per class).")
    class_token_position: Literal["end", "middle", "front"] = "end"
    gate: GateConfig = Field(default_factory=GateConfig)


class CoCoOpConfig(MethodConfig):
    name: Literal["cocoop"] = "cocoop"
    module: ClassVar[str] = "mlgate.methods.cocoop"
    n_ctx: int = Field(4, ge=1, le=64)
    ctx_init: str | None = "a photo of a"
    meta_net_reduction: int = Field(16, ge=1, description="Meta-net hidden width = feature dim // this.")
    gate: GateConfig = Field(default_factory=lambda: GateConfig(enabled=False))
    gate_mode: Literal["static", "conditional"] = Field(
        "static", description="static: per-token gates; conditional: gates from the meta-net's output.")


class MaPLeConfig(MethodConfig):
    name: Literal["maple"] = "maple"
    module: ClassVar[str] = "mlgate.methods.maple"
    n_ctx: int = Field(2, ge=1, le=64, description="Prompt tokens per depth (reference: 2).")
    ctx_init: str | None = Field("a photo", description="Init phrase of the shallow text context.")
    depth: int | None = Field(
        None, ge=1, description="Prompt depth J: layers 0..J-1 get prompts. Default: the reference's 9, "
        "or every layer of a backbone with fewer.")

    #: The reference depth, used when ``depth`` is not set.
    default_depth: ClassVar[int] = 9


class BiMaPLeConfig(MaPLeConfig):
    name: Literal["bimaple"] = "bimaple"  # type: ignore[assignment]
    module: ClassVar[str] = "mlgate.methods.bimaple"
    cycle_weight: float = Field(0.1, ge=0.0, description="Weight of the cycle-consistency loss.")
    fusion_init: float = Field(0.5, description="Initial fusion logits α, β (σ(0.5) ≈ 0.62).")


class AdaptiveBiMaPLeConfig(BiMaPLeConfig):
    name: Literal["adaptive_bimaple"] = "adaptive_bimaple"  # type: ignore[assignment]
    module: ClassVar[str] = "mlgate.methods.adaptive_bimaple"
    n_ctx: int = Field(4, ge=1, le=64, description="Maximum prompt length L (reference: 4).")
    ctx_init: str | None = "a photo of a"
    default_depth: ClassVar[int] = 8  # maximum prompt depth J of the reference
    mode: Literal["full", "length_only", "depth_only"] = Field(
        "full", description="Which gates exist: both, the length gates only, or the depth gates only.")
    gate_strategy: Literal["per_token", "per_layer", "fixed", "random"] = Field(
        "per_token", description="Length gates per token, one per layer, fixed all-on, or fixed random: "
        "length and depth gates drawn once (logits ±2 + N(0, 0.5)) from the trial's seed, not trained.")
    control: Literal["none", "param_matched", "always_frozen", "explicit_reg"] = Field(
        "none", description="EuroSAT controls: no gates with as many extra parameters; gates frozen "
        "from the start; prompt dropout instead of gates.")
    gate: GateConfig = Field(default_factory=lambda: GateConfig(init="constant", init_value=1.0, sparsity=1e-3))
    depth_gate_init: float = Field(1.0, description="Initial depth-gate logit (σ(1) ≈ 0.73).")
    depth_smoothness: float = Field(2e-4, ge=0.0, description="Weight of Σ|p_{d+1} − p_d| over depth gates.")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Inference keeps gates above this.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Prompt dropout of the explicit_reg control.")


class AdaptConfig(MethodConfig):
    name: Literal["adapt"] = "adapt"
    module: ClassVar[str] = "mlgate.methods.adapt"
    depth: int | None = Field(None, ge=1, description="Prompt depth per branch (paper: 12; default: every layer).")
    max_len: int = Field(16, ge=1, le=256, description="Maximum context length ξ per layer (paper: 16).")
    t_target: int = Field(32, ge=0, description="Total active context length (text + vision) to prune down to.")
    score: Literal["snip", "grad_norm", "l2"] = Field("snip", description="Saliency criterion (Eq. 6).")
    n_k: int | None = Field(None, ge=1, description="Accumulation period in steps (paper: 80). Default: derived "
                            "from train.steps so pruning finishes within the step budget.")
    r_p: int = Field(4, ge=1, description="Tokens pruned per pruning step (paper: 4).")
    warmup_steps: int = Field(0, ge=0, description="Steps before the first pruning.")
    warmup_epochs: float = Field(0.0, ge=0.0, description="Epochs before the first pruning (paper: 5), added to "
                                 "warmup_steps.")
    init: Literal["mean", "random"] = Field(
        "mean", description="How prompts start. mean: the mean token state of the layer's input (text: over "
        "the class prompts; vision: over training images, given by the trainer) at the random init's norm, plus "
        "the random init: near-inert. random: N(0, 0.02), the paper's randomly initialized prompt.")
    template: str = Field("a photo of a {}.", description="Text the prompts condition (the query tokens).")
    distill_weight: float = Field(0.0, ge=0.0, description="Angular knowledge distillation weight (0: off).")


#: The methods, by ``method.name`` (the order of ``mlgate describe``'s and the schema's listings).
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {
    cls.model_fields["name"].default: cls
    for cls in (CoOpConfig, CoCoOpConfig, MaPLeConfig, BiMaPLeConfig, AdaptiveBiMaPLeConfig, AdaptConfig)
}


def method_names() -> list[str]:
    """Every method name ``method.name`` accepts, sorted."""
    return sorted(METHOD_CONFIGS)


def method_config_class(name: str) -> type[MethodConfig]:
    """The config class of method ``name``; KeyError lists the valid names."""
    try:
        return METHOD_CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; valid: {', '.join(method_names())}") from None
