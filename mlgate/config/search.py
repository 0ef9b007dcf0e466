"""The search block's Optuna distributions, and the samplers and pruners a study can use.

Keys follow Optuna's own (type/low/high/step/log/choices). Samplers and pruners are one class per
Optuna kind: the spec's unions and the factory (``mlgate.sweep.search``) both read :data:`SAMPLERS` and
:data:`PRUNERS`, so adding a kind is one class here.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, model_validator

from mlgate.config.base import StrictModel



class FloatDistribution(StrictModel):
    type: Literal["float"]
    low: float
    high: float
    step: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _optuna_rules(self) -> FloatDistribution:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot both be set (Optuna: log xor step)")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale float needs low > 0 (got {self.low})")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be > 0 (got {self.step})")
        return self

    def contains(self, value: Any) -> bool:
        """Whether a trial may hold this setting at ``value`` (a baseline's fixed value)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        return self.step is None or abs((value - self.low) / self.step - round((value - self.low) / self.step)) < 1e-9


class IntDistribution(StrictModel):
    type: Literal["int"]
    low: int
    high: int
    step: int = 1
    log: bool = False

    @model_validator(mode="after")
    def _optuna_rules(self) -> IntDistribution:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.step <= 0:
            raise ValueError(f"step must be > 0 (got {self.step})")
        if self.log and (self.step != 1 or self.low < 1):
            raise ValueError("a log-scale int needs low >= 1 and step 1 (Optuna: log xor step)")
        return self

    def contains(self, value: Any) -> bool:
        """Whether a trial may hold this setting at ``value`` (a baseline's fixed value)."""
        return (isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high
                and (value - self.low) % self.step == 0)


class CategoricalDistribution(StrictModel):
    type: Literal["categorical"]
    choices: list[None | bool | int | float | str] = Field(min_length=1)

    def contains(self, value: Any) -> bool:
        """Whether a trial may hold this setting at ``value`` (a baseline's fixed value)."""
        return value in self.choices


Distribution = Annotated[
    Union[FloatDistribution, IntDistribution, CategoricalDistribution], Field(discriminator="type")
]

class OptunaKind(StrictModel):
    """A sampler or pruner setting: ``optuna_class`` names the Optuna class, built with ``optuna_kwargs``
    (of the whole study spec, for the kinds that read more than their own settings)."""

    optuna_class: ClassVar[str]

    def optuna_kwargs(self, spec: Any) -> dict[str, Any]:
        return self.model_dump(exclude={"type"})


class TPESamplerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "TPESampler"
    type: Literal["tpe"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int = Field(10, ge=0)
    multivariate: bool = True


class RandomSamplerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "RandomSampler"
    type: Literal["random"]
    seed: int | None = 0


class QMCSamplerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "QMCSampler"
    type: Literal["qmc"]
    seed: int | None = 0


class GPSamplerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "GPSampler"
    type: Literal["gp"]
    seed: int | None = 0
    n_startup_trials: int = Field(10, ge=0)


class GridSamplerSpec(OptunaKind):
    """Every combination of the search values once: categorical choices, and ints stepped low..high."""

    optuna_class: ClassVar[str] = "GridSampler"
    type: Literal["grid"]
    seed: int | None = 0

    def optuna_kwargs(self, spec: Any) -> dict[str, Any]:
        return {"search_space": spec.grid(), "seed": self.seed}


SAMPLERS = (TPESamplerSpec, RandomSamplerSpec, QMCSamplerSpec, GPSamplerSpec, GridSamplerSpec)
SamplerSpec = Annotated[Union[SAMPLERS], Field(discriminator="type")]  # type: ignore[valid-type]


class NoPrunerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "NopPruner"
    type: Literal["none"]


class _WarmupPrunerSpec(OptunaKind):
    """The warmup fields Optuna's median and percentile pruners share."""

    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(0, ge=0)
    interval_steps: int = Field(1, ge=1)


class MedianPrunerSpec(_WarmupPrunerSpec):
    optuna_class: ClassVar[str] = "MedianPruner"
    type: Literal["median"] = "median"


class PercentilePrunerSpec(_WarmupPrunerSpec):
    optuna_class: ClassVar[str] = "PercentilePruner"
    type: Literal["percentile"]
    percentile: float = Field(25.0, gt=0.0, lt=100.0)


class HyperbandPrunerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "HyperbandPruner"
    type: Literal["hyperband"]
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)

    def optuna_kwargs(self, spec: Any) -> dict[str, Any]:
        return {**super().optuna_kwargs(spec), "max_resource": spec.train.steps or "auto"}


class ThresholdPrunerSpec(OptunaKind):
    """Prune a trial whose objective leaves [lower, upper] after the warmup."""

    optuna_class: ClassVar[str] = "ThresholdPruner"
    type: Literal["threshold"]
    lower: float | None = None
    upper: float | None = None
    n_warmup_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> ThresholdPrunerSpec:
        if self.lower is None and self.upper is None:
            raise ValueError("set lower, upper or both")
        return self


PRUNERS = (NoPrunerSpec, MedianPrunerSpec, PercentilePrunerSpec, HyperbandPrunerSpec, ThresholdPrunerSpec)
PrunerSpec = Annotated[Union[PRUNERS], Field(discriminator="type")]  # type: ignore[valid-type]
