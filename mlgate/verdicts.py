"""Did a run's gates adapt, collapse, or was its prompt pruned? (the rule: docs/verdicts.md)

The verdict is computed in two steps. :func:`evidence` reads a run's metric histories into a few
threshold-free numbers (the median gradient gap over the second half, the gates' drift and mean at
the middle and the end, ...); :func:`judge` applies the thresholds to them. The trainer (on its own
run), the collapse pruner, ``mlgate.monitor`` and ``mlgate.compare`` (on any run that logs mlgate's
metric vocabulary) all go through these two functions, so they always agree.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, fields
from typing import Mapping, Sequence

COLLAPSED, ADAPTIVE, PRUNED, STATIC = "collapsed", "adaptive", "pruned", "static"
VERDICTS = (COLLAPSED, ADAPTIVE, PRUNED, STATIC)

Points = Sequence[tuple[int, float]]  # (step, value), in step order

# The metrics the verdict reads; every other key of a history is ignored.
EVIDENCE_KEYS = ("grad/gap_log10", "gate/drift", "gate/mean", "gate/input_std", "gate/batch_std",
                 "mask/active_tokens")
# A run's Evidence logged as metrics at its end (verdict/has_gates, verdict/gap_median, ...).
SUMMARY_PREFIX = "verdict/"


@dataclass(frozen=True)
class Thresholds:
    """When gates count as collapsed (each one a study-spec setting and a compare option)."""

    gap_log10: float = 2.0  # median grad/gap_log10 over the second half at or above this: starved of gradient
    drift: float = 0.05  # final gate/drift below this: the gates ended near their init
    input_std: float = 0.01  # final gate/input_std (else gate/batch_std) below this: no input dependence
    stillness: float = 0.01  # gate/drift and gate/mean each changed less than this from the middle to the end


@dataclass(frozen=True)
class Evidence:
    """What the verdict reads from a run's metrics, before any threshold (None: not measured)."""

    has_gates: bool  # the run logged gate metrics: it has learned gates
    gap_median: float | None  # median grad/gap_log10 over the second half of training
    drift_final: float | None
    drift_middle: float | None  # gate/drift at the middle of training
    mean_final: float | None
    mean_middle: float | None
    input_std: float | None  # final gate/input_std, else final gate/batch_std (input-dependent gates only)
    active_first: float | None  # mask/active_tokens at its first and last logged steps, and the one before
    active_final: float | None
    active_previous: float | None

    def as_dict(self) -> dict[str, float | bool | None]:
        return asdict(self)

    def as_metrics(self) -> dict[str, float]:
        """``verdict/<field>`` metrics: ``has_gates`` as 0 or 1, fields not measured left out. Logged at
        the end of a run, they let the verdict be judged again under any thresholds without its histories."""
        return {SUMMARY_PREFIX + k: float(v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> Evidence | None:
        """The Evidence a run's ``verdict/*`` metrics carry; None when it logged none."""
        if SUMMARY_PREFIX + "has_gates" not in metrics:
            return None
        values = {f.name: metrics.get(SUMMARY_PREFIX + f.name) for f in fields(cls)}
        return cls(**{**values, "has_gates": bool(values["has_gates"])})


def second_half(points: Points) -> list[float]:
    """The values logged at or after the middle step of ``points`` (all of a one-point history)."""
    if not points:
        return []
    middle = (points[0][0] + points[-1][0]) / 2
    return [v for s, v in points if s >= middle]


def second_half_median(points: Points) -> float | None:
    """Median of :func:`second_half` (None for an empty history)."""
    values = second_half(points)
    return statistics.median(values) if values else None


def value_at_middle(points: Points) -> float | None:
    """The last value logged at or before the middle step of ``points``."""
    if not points:
        return None
    middle = (points[0][0] + points[-1][0]) / 2
    return [v for s, v in points if s <= middle][-1]


def _final(points: Points | None) -> float | None:
    return points[-1][1] if points else None


def evidence(history: Mapping[str, Points]) -> Evidence:
    """The threshold-free summary of a run's metric histories (key → (step, value) points)."""
    drift, mean = history.get("gate/drift") or [], history.get("gate/mean") or []
    active = history.get("mask/active_tokens") or []
    input_std = _final(history.get("gate/input_std"))
    return Evidence(
        has_gates=bool(drift or mean),
        gap_median=second_half_median(history.get("grad/gap_log10") or []),
        drift_final=_final(drift), drift_middle=value_at_middle(drift),
        mean_final=_final(mean), mean_middle=value_at_middle(mean),
        input_std=input_std if input_std is not None else _final(history.get("gate/batch_std")),
        active_first=active[0][1] if active else None, active_final=_final(active),
        active_previous=active[-2][1] if len(active) > 1 else None,
    )


def judge(e: Evidence, thresholds: Thresholds = Thresholds(), t_target: float | None = None) -> str:
    """The verdict from :func:`evidence`.

    ``pruned``: the active-token count fell and ended at ``t_target`` (without a target: it stopped
    falling). ``collapsed``: learned gates that do not depend on the input and either ended near their
    init, or stood still while starved of gradient. ``adaptive``: learned gates, not collapsed.
    ``static``: neither learned gates nor pruning.
    """
    if e.active_first is not None and e.active_final < e.active_first:
        reached = (e.active_final <= t_target if t_target is not None
                   else e.active_previous == e.active_final)
        if reached:
            return PRUNED
    if not e.has_gates:
        return STATIC
    if e.input_std is not None and e.input_std >= thresholds.input_std:
        return ADAPTIVE  # the gates follow the input: not static scalars
    near_init = e.drift_final is not None and e.drift_final < thresholds.drift
    measured = None not in (e.gap_median, e.drift_final, e.drift_middle, e.mean_final, e.mean_middle)
    starved_and_still = measured and (
        e.gap_median >= thresholds.gap_log10
        and abs(e.drift_final - e.drift_middle) < thresholds.stillness
        and abs(e.mean_final - e.mean_middle) < thresholds.stillness)
    return COLLAPSED if near_init or starved_and_still else ADAPTIVE


def verdict(history: Mapping[str, Points], thresholds: Thresholds = Thresholds(),
            t_target: float | None = None) -> str:
    """The verdict of one run from its metric histories (key → (step, value) points in step order)."""
    return judge(evidence(history), thresholds, t_target)


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

    def points(self, key: str) -> list[tuple[int, float]]:
        """``key``'s (step, value) points."""
        return list(zip(self.steps.get(key, []), self.series.get(key, [])))

    def evidence(self) -> Evidence:
        return evidence({key: self.points(key) for key in EVIDENCE_KEYS if key in self.series})

    def verdict(self, thresholds: Thresholds = Thresholds(), t_target: float | None = None) -> str:
        return judge(self.evidence(), thresholds, t_target)
