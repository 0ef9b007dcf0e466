"""Contract §4: did a run's gates adapt, collapse, or was its prompt pruned?

Works on plain metric histories, so the trainer (on its own run) and ``mlgate.compare`` (on any run that
logs the contract's vocabulary) reach the same verdict.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

COLLAPSED, ADAPTIVE, PRUNED, STATIC = "collapsed", "adaptive", "pruned", "static"


@dataclass(frozen=True)
class Thresholds:
    gap_log10: float = 2.0
    drift: float = 0.05
    batch_std: float = 0.01


def second_half_median(values: Sequence[float]) -> float | None:
    """Median over the second half of a history (the whole of a one-point history)."""
    if not values:
        return None
    return statistics.median(values[len(values) // 2 :])


def verdict(history: Mapping[str, Sequence[float]], thresholds: Thresholds = Thresholds(),
            t_target: float | None = None) -> str:
    """The verdict of one run from its metric histories (values in step order).

    ``pruned``: mask metrics whose final ``mask/active_tokens`` reached ``t_target`` (or, without a
    target, stopped falling). Otherwise runs with gate metrics are ``collapsed`` or ``adaptive`` and
    runs with neither are ``static``.
    """
    active = history.get("mask/active_tokens") or []
    if active:
        reached = active[-1] <= t_target if t_target is not None else len(active) > 1 and active[-1] == active[-2]
        if reached:
            return PRUNED
    if not history.get("gate/mean"):
        return STATIC
    gap = second_half_median(history.get("grad/gap_log10") or [])
    drift = (history.get("gate/drift") or [None])[-1]
    batch_std = (history.get("gate/batch_std") or [None])[-1]
    collapsed = (
        gap is not None
        and gap >= thresholds.gap_log10
        and drift is not None
        and drift < thresholds.drift
        and (batch_std is None or batch_std < thresholds.batch_std)
    )
    return COLLAPSED if collapsed else ADAPTIVE


class MetricHistory:
    """Metric values in step order, as logged: what a verdict is computed from."""

    def __init__(self) -> None:
        self.series: dict[str, list[float]] = {}
        self.steps: dict[str, list[int]] = {}
        self.final: dict[str, float] = {}

    def add(self, rows: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        for step, metrics in rows:
            for key, value in metrics.items():
                self.series.setdefault(key, []).append(value)
                self.steps.setdefault(key, []).append(step)
                self.final[key] = value

    def verdict(self, thresholds: Thresholds = Thresholds(), t_target: float | None = None) -> str:
        return verdict(self.series, thresholds, t_target)
