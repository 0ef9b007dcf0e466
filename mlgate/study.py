"""The study driver: an Optuna study whose trials train prompt learners and land in MLflow.

``run_study`` creates the study or resumes it (same name, same storage) and runs trials until the
spec's count of finished trials (COMPLETE + PRUNED) is reached; failed trials do not count.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from mlgate.errors import MlgateError, StudyFailed
from mlgate.progress import Progress, ProgressSink
from mlgate.spec import CategoricalDistribution, FloatDistribution, StudySpec
from mlgate.tracking import StudyTracker, redact, resolve_tracking_uri
from mlgate.training import EVAL_METRICS, preflight, train
from mlgate.verdicts import COLLAPSED, Thresholds

STUDY_RUN_ATTR = "mlgate.study_run_id"
HEARTBEAT_ATTR = "mlgate.heartbeat"
SURPLUS_ATTR = "mlgate.surplus"
POLL_SECONDS = 1.0
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def default_storage_path(tracking_uri: str) -> Path:
    """The journal file beside a SQLite MLflow db (``mlflow.db`` → ``mlflow.optuna.journal``), else in cwd."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return db.with_name(db.stem + ".optuna.journal")
    return Path.cwd() / "mlgate.optuna.journal"


def make_storage(url: str | None, tracking_uri: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: RDB URLs (sqlite://, postgresql://, mysql://) as they are,
    ``journal:PATH`` or a ``*.journal`` path as a journal file (the default, safe for several processes)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if url is None or url.startswith("journal:") or url.endswith(".journal"):
        path = default_storage_path(tracking_uri) if url is None else Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise MlgateError(
            f"--storage {redact(url)!r}: not an Optuna storage URL. Use sqlite:///path.db, "
            "postgresql://user@host/db, mysql://..., or journal:/path/to/file.journal."
        )
    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as exc:  # noqa: BLE001 - workers starting together race to create the tables
            error = exc
            time.sleep(0.5 * (attempt + 1))
    raise MlgateError(f"--storage {redact(url)!r}: cannot open the Optuna storage ({redact(str(error))}).") from None


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    s = spec.study.sampler
    if s.type == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=s.multivariate)
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.type == "qmc":
        return optuna.samplers.QMCSampler(seed=s.seed)
    if s.type == "grid":
        return optuna.samplers.GridSampler(spec.grid(), seed=s.seed)
    return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=s.n_startup_trials)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p = spec.study.pruner
    if p.type == "none":
        return optuna.pruners.NopPruner()
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps,
                                           interval_steps=p.interval_steps)
    if p.type == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                               n_warmup_steps=p.n_warmup_steps, interval_steps=p.interval_steps)
    if p.type == "threshold":
        return optuna.pruners.ThresholdPruner(lower=p.lower, upper=p.upper, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=spec.train.steps or "auto",
                                          reduction_factor=p.reduction_factor)


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


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class SurplusTrial(Exception):
    """A trial started by one worker while others already hold every remaining slot: ended at once
    (FAIL, no MLflow run), so that the count of finished trials stays exact."""


class Heartbeat:
    """Stamps ``mlgate.heartbeat`` on a running trial every ``interval`` seconds from a thread, so any
    worker, on any storage (journal files included), can tell a trial whose worker died."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval: float) -> None:
        self.storage, self.trial_id, self.interval = study._storage, trial._trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.set_trial_user_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            except Exception:  # noqa: BLE001 - the trial may have been finished meanwhile
                return

    def __enter__(self) -> Heartbeat:
        self.storage.set_trial_user_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


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

    def __call__(self, trial: optuna.Trial) -> float:
        self.last_number = trial.number
        self._check_slot(trial)
        sampled = suggest(trial, self.spec)
        trial_spec = self.spec.with_values(sampled)
        run = self.tracker.start_trial(trial.number, trial_spec.method.name, trial_spec.flat_params(), sampled)
        trial.set_user_attr("mlflow_run_id", run.run_id)
        objective = self.spec.study.objective
        collapse = self.spec.study.collapse_pruning

        def verdict() -> str:
            return run.history.verdict(self.thresholds, self.spec.t_target)

        def report(step: int, metrics: dict[str, float]) -> None:
            trial.report(metrics[objective], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{objective}={metrics[objective]:.4g} at step {step}")
            # Early warning (the paper's template): gates already collapsed → stop spending on them.
            if collapse.enabled and step >= collapse.warmup_steps and verdict() == COLLAPSED:
                run.set_tag("mlgate.pruned_by", "collapse")
                raise optuna.TrialPruned(f"gates collapsed by step {step}")

        self.progress.trial(trial.number, trial_spec.train.steps)
        sink = ProgressSink(run, self.progress, trial.number, objective, verdict)
        try:
            with Heartbeat(self.study, trial, self.spec.study.heartbeat_interval), \
                    system_metrics(run.run_id, self.tracker.tracking_uri, self.spec.logging.system_metrics_interval):
                outcome = train(trial_spec, sink=sink, on_eval=report)
        except optuna.TrialPruned:
            run.end("PRUNED", verdict())
            trial.set_user_attr("verdict", verdict())
            self.echo(f"trial {trial.number}: PRUNED  ({verdict()})")
            raise
        except BaseException as exc:  # noqa: BLE001 - the run must be closed whatever happened
            run.end("FAIL", verdict(), error=exc)
            self.echo(f"trial {trial.number}: FAIL  {type(exc).__name__}: {exc}")
            raise
        run.end("COMPLETE", outcome.verdict)
        trial.set_user_attr("verdict", outcome.verdict)
        value = outcome.objective(objective)
        self.echo(f"trial {trial.number}: COMPLETE  {objective}={value:.4g}  verdict={outcome.verdict}")
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


def fail_stale_trials(study: optuna.Study, tracker: StudyTracker, grace: float, max_retries: int,
                      echo: Callable[[str], None]) -> None:
    """Fail RUNNING trials whose heartbeat is older than ``grace`` seconds (their worker died): close
    their MLflow run as FAILED with the reason, and queue their parameters again for a retry."""
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.user_attrs.get(HEARTBEAT_ATTR)
        started = t.datetime_start.timestamp() if t.datetime_start else now
        if now - (beat if beat is not None else started) <= grace:
            continue
        if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
            continue  # another worker got there first
        reason = f"worker died: no heartbeat for {now - (beat or started):.0f}s (grace {grace:g}s)"
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id:
            tracker.fail_run(run_id, reason)
        retries = t.user_attrs.get("mlgate.retries", 0)
        if retries < max_retries:
            study.enqueue_trial(t.params, user_attrs={"mlgate.retries": retries + 1, "mlgate.retry_of": t.number})
        echo(f"trial {t.number}: FAIL  {reason}" + ("; retrying" if retries < max_retries else ""))


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
    tracker = StudyTracker(tracking_uri, spec.experiment_name, spec.name)
    run_id = tracker.open_study_run(study.user_attrs.get(STUDY_RUN_ATTR), spec.to_yaml(), spec.flat_params())
    if study.user_attrs.get(STUDY_RUN_ATTR) != run_id:
        study.set_user_attr(STUDY_RUN_ATTR, run_id)
    return study, tracker


def work(study: optuna.Study, tracker: StudyTracker, spec: StudySpec, progress: Progress) -> None:
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
    summary = summarize(study, spec)
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
        work(study, tracker, spec, progress)
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


def summarize(study: optuna.Study, spec: StudySpec) -> dict[str, Any]:
    """Best trial, counts by state and verdict, parameter importances."""
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
