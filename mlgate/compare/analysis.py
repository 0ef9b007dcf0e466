"""The report's answers beyond counting: is a difference real (intervals, gains against the matched
ungated baseline), what decides the verdict (importance of the sampled settings), and the gating
paper's Table III and Table II side by side per method."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from mlgate.compare.collect import RunSummary
from mlgate.compare.stats import gain, importance, mean_interval
from mlgate.config.methods import GATE_SWAPS
from mlgate.verdicts import ADAPTIVE, COLLAPSED, STATIC

# A gated method's ungated counterpart, where it is another method (the gating paper's Table I).
UNGATED = {"adaptive_bimaple": "bimaple"}
REPRESENTATION = ("repr_alignment", "repr_silhouette", "repr_separation")


def _hm(runs: list[RunSummary]) -> list[float]:
    return [r.acc_hm for r in runs if r.acc_hm is not None]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def gain_vs_baseline(method: str, runs: list[RunSummary]) -> dict[str, Any] | None:
    """``method``'s gated runs against the matched ungated baseline of the same studies: the study's
    own baselines without learned gates (its ``baselines:`` trials), else its runs of the method with
    the gates off (static), else those of the method's ungated counterpart; their HM gain with its
    bootstrap 95% interval, ``distinguishable`` when the interval excludes 0."""
    gated = [r for r in runs if r.method == method and r.verdict in (COLLAPSED, ADAPTIVE) and not r.baseline]
    studies = {r.study for r in gated}
    ungated = [r for r in runs if r.verdict == STATIC and r.study in studies]
    for candidate, pick in ((method, lambda r: r.baseline and r.method == method),
                            (method, lambda r: r.method == method),
                            (UNGATED.get(method), lambda r: r.method == UNGATED.get(method))):
        result = gain(_hm(gated), _hm([r for r in ungated if pick(r)]))
        if result is not None:
            return {"baseline": candidate, **result}
    return None


def group_intervals(method: str, runs: list[RunSummary]) -> dict[str, Any]:
    """The group's HM interval (``acc_hm_ci``, null with fewer than 2 runs) and its gain over the
    matched ungated baseline (``gain_vs_baseline``, absent without one)."""
    out: dict[str, Any] = {"acc_hm_ci": mean_interval(_hm([r for r in runs if r.method == method]))}
    matched = gain_vs_baseline(method, runs)
    if matched is not None:
        out["gain_vs_baseline"] = matched
    return out


def sampled_study(runs: list[RunSummary]) -> tuple[str | None, list[RunSummary]]:
    """The study whose runs sampled settings (the one with most such runs), and those runs; a study's
    baselines are fixed points, not samples."""
    sampled = [r for r in runs if r.sampled and not r.baseline]
    by_study = Counter(r.study for r in sampled)
    if not by_study:
        return None, []
    study = by_study.most_common(1)[0][0]
    return study, [r for r in sampled if r.study == study]


def importances(runs: list[RunSummary]) -> dict[str, dict[str, float]]:
    """How much each sampled setting decides collapsed-or-not (``verdict``) and ``acc_hm``: Optuna's
    fANOVA importances over the runs of the study that sampled settings; {} when nothing was sampled."""
    _, sampled = sampled_study(runs)
    if not sampled:
        return {}
    scored = [r for r in sampled if r.acc_hm is not None]
    return {"verdict": importance([r.sampled for r in sampled], [float(r.verdict == COLLAPSED) for r in sampled]),
            "acc_hm": importance([r.sampled for r in scored], [r.acc_hm for r in scored])}


def phase_axes(scores: dict[str, dict[str, float]]) -> list[str]:
    """The (up to) two settings that most decide the verdict (else HM accuracy): the phase map's axes."""
    ranked = scores.get("verdict") or scores.get("acc_hm") or {}
    return sorted(ranked, key=lambda k: -ranked[k])[:2]


def representation_rows(runs: list[RunSummary]) -> list[dict[str, Any]]:
    """Table III per method: mean alignment, silhouette, separation and HM of the runs that log them."""
    rows = []
    for method in sorted({r.method for r in runs}):
        mine = [r for r in runs if r.method == method and r.repr_alignment is not None]
        if mine:
            rows.append({"method": method, "n_runs": len(mine),
                         **{key.removeprefix("repr_"): _mean([getattr(r, key) for r in mine
                                                              if getattr(r, key) is not None]) for key in REPRESENTATION},
                         "acc_hm": _mean(_hm(mine))})
    return rows


def gate_strategy_rows(runs: list[RunSummary]) -> list[dict[str, Any]]:
    """Table II per method: mean acc/val of the trained models with their gates swapped, per strategy."""
    rows = []
    for method in sorted({r.method for r in runs}):
        mine = [r.acc_gates for r in runs if r.method == method and r.acc_gates]
        if mine:
            rows.append({"method": method, "n_runs": len(mine),
                         **{s: _mean([g[s] for g in mine if s in g]) for s in GATE_SWAPS}})
    return rows


def notes(runs: list[RunSummary], scores: dict[str, Any]) -> list[str]:
    """Why a section of the report is left out or says less, one line each."""
    out = []
    if not scores:
        out.append("What decides the verdict: no run sampled its settings (no mlgate.sampled tag, and no param "
                   "varies across the runs), so there is nothing to rank.")
    elif not scores.get("verdict"):
        out.append("What decides the verdict: every run of the study has the same verdict, so no setting decides it.")
    if not representation_rows(runs):
        out.append("Representation quality (Table III): no run logs repr/alignment, repr/silhouette or repr/separation.")
    if not gate_strategy_rows(runs):
        out.append("Gate strategies (Table II): no run logs acc/gates/<strategy> (runs without learned gates have none).")
    single = sorted(m for m, n in Counter(r.method for r in runs if r.acc_hm is not None).items() if n < 2)
    if single:
        out.append(f"HM intervals: one run only for {', '.join(single)}; an interval needs two runs or more.")
    return out
