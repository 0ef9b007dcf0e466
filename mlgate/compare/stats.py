"""The statistics of the report, done by the libraries made for them: bootstrap confidence intervals
(scipy) and which sampled settings decide an outcome (Optuna's fANOVA importance evaluator)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 4999


def mean_interval(values: Sequence[float]) -> list[float] | None:
    """Bootstrap 95% interval of the mean of ``values`` (None with fewer than 2)."""
    if len(values) < 2:
        return None
    return _bootstrap((np.asarray(values, dtype=float),), lambda x, axis: x.mean(axis))


def gain(treated: Sequence[float], baseline: Sequence[float]) -> dict[str, Any] | None:
    """mean(treated) − mean(baseline) with its bootstrap 95% interval; ``distinguishable`` when the
    interval excludes 0. None without values on both sides; no interval with fewer than 2 on either."""
    if not treated or not baseline:
        return None
    difference = float(np.mean(treated) - np.mean(baseline))
    if len(treated) < 2 or len(baseline) < 2:
        return {"mean": difference, "ci": None, "distinguishable": None}
    interval = _bootstrap((np.asarray(treated, dtype=float), np.asarray(baseline, dtype=float)),
                          lambda a, b, axis: a.mean(axis) - b.mean(axis))
    return {"mean": difference, "ci": interval, "distinguishable": not interval[0] <= 0.0 <= interval[1]}


def _bootstrap(samples: tuple[np.ndarray, ...], statistic) -> list[float]:
    from scipy.stats import bootstrap

    if all(np.ptp(s) == 0 for s in samples):  # no spread: the interval is the value itself
        value = float(statistic(*(s[None] for s in samples), axis=-1)[0])
        return [value, value]
    options = dict(confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile", vectorized=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about tiny samples; the interval says how wide it is
        try:
            result = bootstrap(samples, statistic, rng=np.random.default_rng(0), **options)
        except TypeError:  # scipy before 1.15 names the generator random_state
            result = bootstrap(samples, statistic, random_state=np.random.default_rng(0), **options)
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def importance(params: list[dict[str, str]], target: Sequence[float]) -> dict[str, float]:
    """How much each setting in ``params`` (one dict of sampled values, as logged, per run) decides
    ``target`` (one value per run): Optuna's fANOVA importances, summing to 1; {} when nothing varies."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    columns = {key: [_value(p.get(key)) for p in params] for key in sorted({k for p in params for k in p})}
    distributions = {key: dist for key, values in columns.items() if (dist := _distribution(values)) is not None}
    if not distributions or len(set(target)) < 2:
        return {}
    for key, dist in distributions.items():  # categorical choices are None or strings
        if not hasattr(dist, "low"):
            columns[key] = [v if v is None or isinstance(v, str) else str(v) for v in columns[key]]
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study()
    study.add_trials([
        optuna.trial.create_trial(params={k: columns[k][i] for k in distributions}, distributions=distributions,
                                  value=float(target[i]))
        for i in range(len(target))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    return {k: float(v) for k, v in scores.items()}


def _value(text: str | None) -> Any:
    # A logged param back as a number where it is one; everything else stays a string (or None).
    if text is None or text in ("null", "None"):
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def _distribution(values: list[Any]):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    distinct = list(dict.fromkeys(values))
    if len(distinct) < 2:
        return None  # nothing varies: no importance to tell
    if all(isinstance(v, float) for v in distinct):
        return FloatDistribution(min(distinct), max(distinct))
    return CategoricalDistribution([v if v is None or isinstance(v, str) else str(v) for v in distinct])
