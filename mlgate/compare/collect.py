"""Read an experiment's runs through the MLflow API into per-run summaries and their verdicts.

Works on any run that logs mlgate's metric vocabulary (docs/metrics.md), whether mlgate trained it or not.
A run that carries its verdict's evidence (``verdict/*``, logged by mlgate's trainer and ``mlgate.monitor``
at its end) is judged from the latest values ``search_runs`` returns; the others from their metric
histories, read in bulk (``histories.py``).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mlgate.compare.histories import History, read_histories
from mlgate.errors import MlgateError
from mlgate.verdicts import EVIDENCE_KEYS, Evidence, Thresholds, evidence, judge

VOCABULARY_PREFIXES = ("loss/", "grad/", "gate/", "mask/", "acc/", "params/trainable")
HISTORY_KEYS = EVIDENCE_KEYS  # what the verdict reads, and the report plots
_STATE_OF_STATUS = {"FINISHED": "COMPLETE", "KILLED": "PRUNED", "FAILED": "FAIL"}
_T_TARGET_PARAMS = ("method.t_target", "t_target", "T_target")


@dataclass
class RunSummary:
    """One run as the compare report sees it; the fields up to ``trainable_params`` are the JSON run object's."""

    run_id: str
    run_name: str
    study: str | None
    trial: int | None
    method: str
    state: str
    verdict: str
    grad_gap_log10: float | None
    gate_drift: float | None
    gate_batch_std: float | None
    gate_input_std: float | None
    effective_length: float | None
    active_tokens: float | None
    acc_base: float | None
    acc_novel: float | None
    acc_hm: float | None
    trainable_params: float | None
    repr_alignment: float | None = None
    repr_silhouette: float | None = None
    repr_separation: float | None = None
    acc_gates: dict[str, float] | None = None  # Table II: acc/val with the gates swapped, by strategy
    noise_sensitivity: float | None = None
    sampled: dict[str, str] = field(default_factory=dict)  # the sampled settings, as logged
    t_target: float | None = None
    compression: float | None = None
    depth_lengths: list[float] = field(default_factory=list)
    baseline: str | None = None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict, repr=False)  # those read so far
    history_keys: list[str] = field(default_factory=list, repr=False)  # the keys of HISTORY_KEYS it logged
    params: dict[str, str] = field(default_factory=dict, repr=False)

    def as_json(self) -> dict[str, Any]:
        """The run object of ``--format json`` (the documented keys, then extras)."""
        data = asdict(self)
        data.pop("history")
        data.pop("history_keys")
        data.pop("params")
        return data


def speaks_vocabulary(run: Run) -> bool:
    return any(key.startswith(VOCABULARY_PREFIXES) for key in run.data.metrics)


def _float(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def summarize_run(run: Run, thresholds: Thresholds, history: History | None = None) -> RunSummary:
    """Verdict and summary values of one run: from its ``verdict/*`` metrics, else from ``history``
    (its metric histories of :data:`HISTORY_KEYS`)."""
    tags, params, latest = run.data.tags, run.data.params, run.data.metrics
    history = history or {}
    seen = Evidence.from_metrics(latest) or evidence(history)
    t_target = next((_float(params[k]) for k in _T_TARGET_PARAMS if k in params), None)
    depth_keys = sorted((k for k in latest if k.startswith("mask/active_tokens/d")),
                        key=lambda k: int(k.rsplit("/d", 1)[1]))
    trial = tags.get("mlgate.trial")
    first, final = seen.active_first, seen.active_final
    return RunSummary(
        run_id=run.info.run_id,
        run_name=run.info.run_name or run.info.run_id[:8],
        study=tags.get("mlgate.study"),
        trial=int(trial) if trial is not None and trial.isdigit() else None,
        method=tags.get("mlgate.method") or params.get("method.name") or "unknown",
        state=_state(run),
        verdict=judge(seen, thresholds, t_target),
        grad_gap_log10=seen.gap_median,
        gate_drift=latest.get("gate/drift"),
        gate_batch_std=latest.get("gate/batch_std"),
        gate_input_std=latest.get("gate/input_std"),
        effective_length=latest.get("gate/effective_length"),
        active_tokens=latest.get("mask/active_tokens"),
        acc_base=latest.get("acc/base"),
        acc_novel=latest.get("acc/novel"),
        acc_hm=latest.get("acc/hm"),
        trainable_params=latest.get("params/trainable"),
        repr_alignment=latest.get("repr/alignment"),
        repr_silhouette=latest.get("repr/silhouette"),
        repr_separation=latest.get("repr/separation"),
        acc_gates={k.removeprefix("acc/gates/"): v for k, v in latest.items() if k.startswith("acc/gates/")} or None,
        noise_sensitivity=latest.get("gate/noise_sensitivity"),
        sampled=_sampled(tags, params),
        t_target=t_target,
        compression=(1.0 - final / first) if seen.active_previous is not None and first else None,
        depth_lengths=[latest[k] for k in depth_keys],
        baseline=tags.get("mlgate.baseline"),
        history=history,
        history_keys=[key for key in HISTORY_KEYS if key in latest],
        params=dict(params),
    )


def _sampled(tags: dict[str, str], params: dict[str, str]) -> dict[str, str]:
    # The settings Optuna sampled for an mlgate trial (its mlgate.sampled tag), with their logged values.
    names = tags.get("mlgate.sampled")
    if names is None or names == "(none)":
        return {}
    return {name: params[name] for name in names.split(", ") if name in params}


def _varying_params_as_sampled(summaries: list[RunSummary], tags: list[dict[str, str]]) -> None:
    # Runs another loop logged carry no mlgate.sampled tag: their settings that vary across the
    # experiment's runs stand for what was searched.
    foreign = [s for s, t in zip(summaries, tags) if "mlgate.sampled" not in t]
    keys = {k for s in foreign for k in s.params}
    varying = sorted(k for k in keys if len({s.params.get(k) for s in foreign}) > 1)
    for summary in foreign:
        summary.sampled = {k: summary.params[k] for k in varying if k in summary.params}


def _state(run: Run) -> str:
    return run.data.tags.get("mlgate.state") or _STATE_OF_STATUS.get(run.info.status, run.info.status)


def needs_history(run: Run) -> list[str]:
    """The keys of :data:`HISTORY_KEYS` whose histories ``run``'s verdict is read from (none when it
    carries its ``verdict/*`` evidence)."""
    if Evidence.from_metrics(run.data.metrics) is not None:
        return []
    return [key for key in HISTORY_KEYS if key in run.data.metrics]


def collect_runs(client: MlflowClient, experiment: str, thresholds: Thresholds = Thresholds(),
                 study: str | None = None, states: set[str] | None = None) -> list[RunSummary]:
    """Summaries of every run of ``experiment`` that logs the vocabulary (study and report runs aside).

    Raises :class:`MlgateError` when the experiment does not exist or has no such runs.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise MlgateError(f"--experiment: no experiment named {experiment!r} at this tracking URI. "
                          f"Experiments there: {', '.join(names) or '(none)'}.")
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    if not runs:
        raise MlgateError(f"experiment {experiment!r} has no runs yet: run a study into it first "
                          f"(`mlgate run STUDY`), or log runs with mlgate's metric names (docs/metrics.md).")
    candidates = [r for r in runs if r.data.tags.get("mlgate.role") not in ("study", "report")]
    speaking = [r for r in candidates if speaks_vocabulary(r)]
    if not speaking:
        raise MlgateError(f"experiment {experiment!r}: none of its {len(candidates)} runs logs mlgate's metric "
                          "vocabulary (loss/*, grad/*, gate/*, mask/*, acc/*); nothing to compare.")
    if study is not None:
        speaking = [r for r in speaking if r.data.tags.get("mlgate.study") == study]
    if states:
        speaking = [r for r in speaking if _state(r) in states]
    histories = read_histories(client, {r.info.run_id: keys for r in speaking if (keys := needs_history(r))})
    summaries = [summarize_run(r, thresholds, histories.get(r.info.run_id)) for r in speaking]
    _varying_params_as_sampled(summaries, [r.data.tags for r in speaking])
    if not summaries:
        raise MlgateError(f"experiment {experiment!r}: no runs match the --study/--state filters.")
    return summaries


def heterogeneity(lengths: list[float]) -> float | None:
    """Coefficient of variation of per-depth lengths (0 = every depth kept the same length)."""
    if len(lengths) < 2 or statistics.fmean(lengths) == 0:
        return None
    return statistics.pstdev(lengths) / statistics.fmean(lengths)
