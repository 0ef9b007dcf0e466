"""Groups, headline and the report object built from run summaries."""

from __future__ import annotations

import functools
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

from mlgate.compare import analysis
from mlgate.compare.collect import RunSummary, heterogeneity
from mlgate.verdicts import ADAPTIVE, COLLAPSED, PRUNED, STATIC

VERDICT_ORDER = (COLLAPSED, ADAPTIVE, PRUNED, STATIC)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def group_stats(method: str, runs: list[RunSummary]) -> dict[str, Any]:
    """A method's group: counts per verdict, collapse rate, mean and best acc/hm (plus pruning extras)."""
    verdicts = Counter(r.verdict for r in runs)
    gated = verdicts[COLLAPSED] + verdicts[ADAPTIVE]
    hm = [r.acc_hm for r in runs if r.acc_hm is not None]
    pruning = [r for r in runs if r.active_tokens is not None]
    return {
        "method": method,
        "n_runs": len(runs),
        "verdicts": {v: verdicts[v] for v in VERDICT_ORDER if verdicts[v]},
        "collapse_rate": verdicts[COLLAPSED] / gated if gated else None,
        "acc_hm_mean": _mean(hm),
        "acc_hm_best": max(hm) if hm else None,
        "trainable_params_mean": _mean([r.trainable_params for r in runs if r.trainable_params is not None]),
        "acc_vs_t_target": sorted((r.t_target, r.acc_hm) for r in pruning if r.t_target is not None
                                  and r.acc_hm is not None),
        "depth_heterogeneity": _mean([h for r in pruning if (h := heterogeneity(r.depth_lengths)) is not None]),
    }


def headline(runs: list[RunSummary]) -> list[dict[str, Any]]:
    """Gating methods (did the gates adapt, what they cost, what they gained over the matched ungated
    baseline, and how the baselines themselves came out) side by side with pruning methods (what
    compression, at what accuracy). A study's baselines are the reference points, not counted among
    the runs they are compared with."""
    rows = []
    for method in sorted({r.method for r in runs}):
        mine = [r for r in runs if r.method == method]
        gated = [r for r in mine if r.verdict in (COLLAPSED, ADAPTIVE) and not r.baseline]
        pruning = [r for r in mine if r.active_tokens is not None and not r.baseline]
        baselines = {r.baseline: {"verdict": r.verdict, "acc_hm": r.acc_hm}
                     for r in sorted(mine, key=lambda r: (r.trial is None, r.trial)) if r.baseline}
        if gated:
            matched = analysis.gain_vs_baseline(method, runs)
            n_adapted = sum(r.verdict == ADAPTIVE for r in gated)
            rows.append({
                "kind": "gating", "method": method, "n_runs": len(gated),
                "n_adapted": n_adapted, "adapted": n_adapted / len(gated),
                "trainable_params": _mean([r.trainable_params for r in gated if r.trainable_params is not None]),
                "acc_hm": _mean([r.acc_hm for r in gated if r.acc_hm is not None]),
                "gain_vs_baseline": None if matched is None else matched["mean"],
                "compression": None,
                "baselines": baselines,
            })
        if pruning:
            n_pruned = sum(r.verdict == PRUNED for r in pruning)
            rows.append({
                "kind": "pruning", "method": method, "n_runs": len(pruning),
                "n_adapted": n_pruned, "adapted": n_pruned / len(pruning),
                "trainable_params": _mean([r.trainable_params for r in pruning if r.trainable_params is not None]),
                "acc_hm": _mean([r.acc_hm for r in pruning if r.acc_hm is not None]),
                "gain_vs_baseline": None,
                "compression": _mean([r.compression for r in pruning if r.compression is not None]),
                "baselines": baselines,
            })
    return rows


@dataclass
class Report:
    experiment: str
    runs: list[RunSummary]
    rank_by: str = "acc_hm"
    ui: str | None = None  # the experiment in the MLflow UI's training view

    def ranked(self) -> list[RunSummary]:
        """Runs by ``rank_by`` (descending; runs without the value last)."""
        return sorted(self.runs, key=lambda r: (getattr(r, self.rank_by) is None, -(getattr(r, self.rank_by) or 0.0)))

    def groups(self) -> list[dict[str, Any]]:
        methods = sorted({r.method for r in self.runs})
        return [{**group_stats(m, [r for r in self.runs if r.method == m]), **analysis.group_intervals(m, self.runs)}
                for m in methods]

    @functools.cached_property
    def importance(self) -> dict[str, dict[str, float]]:
        """What decides the verdict and HM accuracy: the sampled settings' importances."""
        return analysis.importances(self.runs)

    def to_json(self) -> dict[str, Any]:
        """The JSON report: ``{"experiment", "ui", "runs", "groups", "importance", ...}`` (docs/compare.md)."""
        return self._json

    @functools.cached_property
    def _json(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "ui": self.ui,
            "runs": [r.as_json() for r in self.ranked()],
            "groups": self.groups(),
            "importance": self.importance,
            "importance_study": analysis.sampled_study(self.runs)[0],
            "representation": analysis.representation_rows(self.runs),
            "gate_strategies": analysis.gate_strategy_rows(self.runs),
            "headline": headline(self.runs),
            "notes": analysis.notes(self.runs, self.importance),
        }
