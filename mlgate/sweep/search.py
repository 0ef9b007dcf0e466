"""The spec's search block, samplers and pruners, as Optuna objects (the kinds: ``mlgate.spec``'s tables)."""

from __future__ import annotations

from typing import Any

import optuna

from mlgate.config.search import CategoricalDistribution, FloatDistribution
from mlgate.config.spec import StudySpec


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``study.sampler`` names, with its settings."""
    sampler = spec.study.sampler
    return getattr(optuna.samplers, sampler.optuna_class)(**sampler.optuna_kwargs(spec))


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The Optuna pruner ``study.pruner`` names, with its settings."""
    pruner = spec.study.pruner
    return getattr(optuna.pruners, pruner.optuna_class)(**pruner.optuna_kwargs(spec))


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
