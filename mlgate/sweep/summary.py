"""What a study leaves on its MLflow study run: the summary (best trial, counts by state and verdict,
parameter importances) and Optuna's plots."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mlgate.config.spec import StudySpec
from mlgate.tracking.runs import BASELINE

SURPLUS_ATTR = "mlgate.surplus"


def summarize(study: optuna.Study, spec: StudySpec) -> dict[str, Any]:
    """Best trial, counts by state and verdict, the baselines' outcomes, parameter importances."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR)]
    counts = Counter(t.state.name for t in trials)
    verdicts = Counter(t.user_attrs.get("verdict") for t in trials if t.user_attrs.get("verdict"))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        b = study.best_trial
        best = {"trial": b.number, "value": b.value, "params": b.params, "run_id": b.user_attrs.get("mlflow_run_id")}
    return {
        "study": spec.name,
        "objective": spec.study.objective,
        "direction": spec.study.direction,
        "n_trials_target": spec.study.n_trials,
        "counts": dict(sorted(counts.items())),
        "verdicts": dict(sorted(verdicts.items())),
        "best": best,
        "baselines": {t.user_attrs[BASELINE]: {"trial": t.number, "state": t.state.name, "value": t.value,
                                               "verdict": t.user_attrs.get("verdict"),
                                               "run_id": t.user_attrs.get("mlflow_run_id")}
                      for t in trials if t.user_attrs.get(BASELINE) and t.state in (TrialState.COMPLETE,
                                                                                    TrialState.PRUNED)},
        "importances": importances(study),
    }


def importances(study: optuna.Study) -> dict[str, float] | None:
    """Optuna's parameter importances, or None while there are too few completed trials to tell."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2 or not any(t.params for t in complete):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "importances will be equal" with very few trials
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError, ZeroDivisionError):
        return None


def save_plots(study: optuna.Study, out: Path) -> None:
    """Optuna's plots as PNGs (they open in the MLflow UI without a network)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {"optimization_history": ovm.plot_optimization_history}
    if any(t.params for t in complete):
        plots.update(parallel_coordinate=ovm.plot_parallel_coordinate, slice=ovm.plot_slice)
        if importances(study):
            plots["param_importances"] = ovm.plot_param_importances
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = plot(study)
            except (ValueError, RuntimeError):
                continue  # e.g. a plot that needs two distinct values of a param
        axes = result.ravel()[0] if hasattr(result, "ravel") else result
        axes.figure.savefig(out / f"{name}.png", dpi=90, bbox_inches="tight")
        plt.close(axes.figure)
