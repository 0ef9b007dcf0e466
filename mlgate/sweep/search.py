"""The spec's search block, samplers and pruners, as Optuna objects (the kinds: ``mlgate.spec``'s tables)."""

from __future__ import annotations

from typing import Any

import optuna

from mlgate.config.search import CategoricalDistribution, FloatDistribution
from mlgate.config.spec import StudySpec
from mlgate.tracking.runs import BASELINE


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``study.sampler`` names, with its settings."""
    sampler = spec.study.sampler
    return getattr(optuna.samplers, sampler.optuna_class)(**sampler.optuna_kwargs(spec))


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The Optuna pruner ``study.pruner`` names, with its settings, blind to the study's baselines."""
    pruner = spec.study.pruner
    inner = getattr(optuna.pruners, pruner.optuna_class)(**pruner.optuna_kwargs(spec))
    # Hyperband compares within its own brackets, which Optuna's samplers find by the pruner's class.
    return inner if isinstance(inner, optuna.pruners.HyperbandPruner) else WithoutBaselines(inner)


class WithoutBaselines(optuna.pruners.BasePruner):
    """``inner`` judging a trial against the searched trials only: a study's baselines are its reference
    points, not the runs a searched trial has to keep up with."""

    def __init__(self, inner: optuna.pruners.BasePruner) -> None:
        self.inner = inner

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return self.inner.prune(_Searched(study), trial)


class _Searched:
    # The study as a pruner reads it, with the baselines' trials left out.
    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(self, *args, **kwargs) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self._study.get_trials(*args, **kwargs) if not t.user_attrs.get(BASELINE)]

    @property
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.get_trials()


def suggest(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """Sample every entry of the spec's search block (Optuna param name = dotted spec path)."""
    values: dict[str, Any] = {}
    for key, dist in spec.search.items():
        if isinstance(dist, CategoricalDistribution):
            values[key] = trial.suggest_categorical(key, dist.choices)
        elif isinstance(dist, FloatDistribution):
            values[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            values[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return values
