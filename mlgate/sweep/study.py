"""The study driver: an Optuna study whose trials train prompt learners and land in MLflow.

``run_study`` creates the study or resumes it (same name, same storage) and runs trials until the
spec's count of finished trials (COMPLETE + PRUNED) is reached; failed trials do not count.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mlgate.errors import MlgateError, StudyFailed
from mlgate.progress import Progress, ProgressSink
from mlgate.config.spec import StudySpec
from mlgate.sweep.heartbeats import Heartbeat, fail_stale_trials
from mlgate.sweep.search import make_pruner, make_sampler, suggest
from mlgate.sweep.storage import make_storage
from mlgate.sweep.summary import SURPLUS_ATTR, save_plots, summarize
from mlgate.tracking.runs import BASELINE, StudyTracker, redact, resolve_tracking_uri
from mlgate.training import EVAL_METRICS, preflight, train
from mlgate.verdicts import COLLAPSED, Thresholds

STUDY_RUN_ATTR = "mlgate.study_run_id"
POLL_SECONDS = 1.0
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class SurplusTrial(Exception):
    """A trial started by one worker while others already hold every remaining slot: ended at once
    (FAIL, no MLflow run), so that the count of finished trials stays exact."""


class Objective:
    """One Optuna trial = one MLflow child run = one call of the training loop."""

    def __init__(self, spec: StudySpec, tracker: StudyTracker, study: optuna.Study, progress: Progress) -> None:
        self.spec, self.tracker, self.study, self.progress = spec, tracker, study, progress
        self.echo = progress.echo
        self.thresholds = Thresholds(**spec.logging.verdict.model_dump())
        self.last_number: int | None = None

    def _check_slot(self, trial: optuna.Trial) -> None:
        # Every remaining slot goes to the lowest-numbered running trials: a tie-break all workers agree on.
        trials = self.study.get_trials(deepcopy=False)
        slots = self.spec.study.n_trials - sum(t.state in FINISHED for t in trials)
        running = sorted(t.number for t in trials if t.state == TrialState.RUNNING)
        if trial.number not in running[: max(slots, 0)]:
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise SurplusTrial(f"trial {trial.number}: the study's {self.spec.study.n_trials} slots are taken")
        # Two workers that opened the study at the same moment may both have queued a baseline: one runs.
        baseline = trial.user_attrs.get(BASELINE)
        if baseline is not None and any(t.number < trial.number and t.user_attrs.get(BASELINE) == baseline
                                        and t.state != TrialState.FAIL for t in trials):
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise SurplusTrial(f"trial {trial.number}: baseline {baseline} runs as an earlier trial")

    def __call__(self, trial: optuna.Trial) -> float:
        self.last_number = trial.number
        self._check_slot(trial)
        sampled = suggest(trial, self.spec)  # a baseline's trial was queued with its values fixed
        baseline = trial.user_attrs.get(BASELINE)
        trial_spec = self.spec.with_values({**sampled, "baseline": baseline} if baseline else sampled)
        run = self.tracker.start_trial(trial.number, trial_spec.method.name, trial_spec.flat_params(), sampled,
                                       baseline, trial_spec.data)
        trial.set_user_attr("mlflow_run_id", run.run_id)
        objective = self.spec.study.objective
        collapse = self.spec.study.collapse_pruning

        def verdict() -> str:
            return run.history.verdict(self.thresholds, self.spec.t_target)

        def report(step: int, metrics: dict[str, float]) -> None:
            trial.report(metrics[objective], step)
            if baseline:  # a reference point runs to its end
                return
            if trial.should_prune():
                raise optuna.TrialPruned(f"{objective}={metrics[objective]:.4g} at step {step}")
            # Early warning (the paper's template): gates already collapsed → stop spending on them.
            if collapse.enabled and step >= collapse.warmup_steps and verdict() == COLLAPSED:
                run.set_tag("mlgate.pruned_by", "collapse")
                raise optuna.TrialPruned(f"gates collapsed by step {step}")

        label = f"trial {trial.number}" + (f" (baseline {baseline})" if baseline else "")
        self.progress.trial(trial.number, trial_spec.train.steps)
        sink = ProgressSink(run, self.progress, trial.number, objective, verdict)
        try:
            with Heartbeat(self.study, trial, self.spec.study.heartbeat_interval), \
                    system_metrics(run.run_id, self.tracker.tracking_uri, self.spec.logging.system_metrics_interval):
                outcome = train(trial_spec, sink=sink, on_eval=report)
        except optuna.TrialPruned:
            run.end("PRUNED", verdict())
            trial.set_user_attr("verdict", verdict())
            self.echo(f"{label}: PRUNED  ({verdict()})")
            raise
        except BaseException as exc:  # noqa: BLE001 - the run must be closed whatever happened
            run.end("FAIL", verdict(), error=exc)
            self.echo(f"{label}: FAIL  {type(exc).__name__}: {exc}")
            raise
        run.end("COMPLETE", outcome.verdict)
        trial.set_user_attr("verdict", outcome.verdict)
        value = outcome.objective(objective)
        self.echo(f"{label}: COMPLETE  {objective}={value:.4g}  verdict={outcome.verdict}")
        return value


@contextlib.contextmanager
def system_metrics(run_id: str, tracking_uri: str, interval: float | None):
    """MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) on a trial run."""
    if interval is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1,
                                   tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def open_study(spec: StudySpec, tracking_uri: str | None, storage: str | None) -> tuple[optuna.Study, StudyTracker]:
    """Create or load the Optuna study and open (or reopen) its MLflow study run."""
    if spec.study.objective not in EVAL_METRICS:
        raise MlgateError(f"study.objective: {spec.study.objective!r} is not reported at evaluation; "
                          f"valid: {', '.join(EVAL_METRICS)}.")
    tracking_uri = resolve_tracking_uri(tracking_uri)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # mlgate reports each trial itself
    study = optuna.create_study(
        study_name=spec.name, storage=make_storage(storage, tracking_uri), sampler=make_sampler(spec),
        pruner=make_pruner(spec), direction=spec.study.direction, load_if_exists=True,
    )
    enqueue_baselines(study, spec)
    tracker = StudyTracker(tracking_uri, spec.experiment_name, spec.name)
    run_id = tracker.open_study_run(study.user_attrs.get(STUDY_RUN_ATTR), spec.to_yaml(), spec.flat_params())
    if study.user_attrs.get(STUDY_RUN_ATTR) != run_id:
        study.set_user_attr(STUDY_RUN_ATTR, run_id)
    return study, tracker


def enqueue_baselines(study: optuna.Study, spec: StudySpec) -> None:
    """Queue each of the spec's baselines once, ahead of the searched trials; a resumed study, or another
    worker, finds them queued (or run) already."""
    queued = {t.user_attrs.get(BASELINE) for t in study.get_trials(deepcopy=False)}
    for name in spec.baselines:
        if name not in queued:
            study.enqueue_trial(spec.baseline_values(name), user_attrs={BASELINE: name})


def run_trials(study: optuna.Study, tracker: StudyTracker, spec: StudySpec, progress: Progress) -> None:
    """Run trials until the study has ``n_trials`` finished ones, sharing the work with any other
    worker on the same storage. Raises :class:`StudyFailed` after too many failures in a row."""
    objective = Objective(spec, tracker, study, progress)
    echo = progress.echo
    target, failures = spec.study.n_trials, 0
    while True:
        fail_stale_trials(study, tracker, spec.study.heartbeat_grace, spec.study.max_retries, echo)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        progress.set_finished(finished)
        if finished >= target:
            return
        if failures >= spec.study.max_consecutive_failures:
            raise StudyFailed(
                f"study {spec.name}: {failures} trials failed in a row (study.max_consecutive_failures); "
                "stopping instead of burning the budget. Each failed run has its error as error.txt."
            )
        if finished + running >= target:  # the last slots are being worked on; a failure frees one
            time.sleep(POLL_SECONDS)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna warns per caught failure; the run has the error
            study.optimize(objective, n_trials=1, catch=(Exception,))
        mine = study.trials[objective.last_number]
        if mine.user_attrs.get(SURPLUS_ATTR):
            continue
        failures = failures + 1 if mine.state == TrialState.FAIL else 0


def close_study(study: optuna.Study, tracker: StudyTracker, spec: StudySpec, status: str) -> dict[str, Any]:
    """Log the summary, the plots and the status on the study run."""
    summary = {**summarize(study, spec), "experiment_id": tracker.experiment_id}
    with tempfile.TemporaryDirectory(prefix="mlgate-") as tmp:
        save_plots(study, Path(tmp))
        tracker.close_study_run(summary, Path(tmp), status)
    return summary


def run_study(spec: StudySpec, tracking_uri: str | None = None, storage: str | None = None,
              progress: Progress | None = None, close: bool = True) -> dict[str, Any]:
    """Create or resume the study and run it to ``spec.study.n_trials`` finished trials.

    Several processes may run this on the same storage at once: they share the work and the count
    stays exact. ``close=False`` (a worker started by ``--workers``) leaves the study run to the parent.
    Returns the study summary (also logged to the study run).
    """
    progress = progress or Progress(spec.study.n_trials, live=False)
    if close:  # (a worker of --workers: its parent has already checked the spec)
        preflight(spec)
    study, tracker = open_study(spec, tracking_uri, storage)
    progress.echo(f"study {spec.name}: {count_finished(study)}/{spec.study.n_trials} trials finished; experiment "
                  f"{spec.experiment_name!r} at {redact(tracker.tracking_uri)}")
    status = "FINISHED"
    try:
        run_trials(study, tracker, spec, progress)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.close()
        progress.set_finished(count_finished(study))
        progress.close()
        if close:
            summary = close_study(study, tracker, spec, status)
    return summary if close else summarize(study, spec)
