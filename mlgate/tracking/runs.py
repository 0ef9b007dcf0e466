"""mlgate's MLflow layout: one study run per study, one child run per Optuna trial.

Built on ``MlflowClient`` with explicit run ids (not the thread-local fluent stack), so it works the
same in any thread or process. Per-step metrics are sent in batches with ``log_batch``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlgate import __version__
from mlgate.config.datasets import DATASETS
from mlgate.config.spec import DataSpec
from mlgate.errors import MlgateError
from mlgate.tracking.run_context import context_tags
from mlgate.tracking.sender import MetricSender, is_connection_error
from mlgate.verdicts import MetricHistory

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ROLE, STUDY, TRIAL, METHOD, STATE, VERDICT, BASELINE = (
    "mlgate.role", "mlgate.study", "mlgate.trial", "mlgate.method", "mlgate.state", "mlgate.verdict",
    "mlgate.baseline",
)
_RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
# The MLflow UI opens an experiment in the view it remembers (GenAI's traces by default); this URL
# parameter opens the training view instead: the runs table, trials nested under their study run.
TRAINING_VIEW = "workflowType=machine_learning"
EXPERIMENT_KIND = "mlflow.experimentKind"  # what other UI versions read to pick the view
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# A trial's dot in the runs table and its line in charts, by verdict (the UI reads mlflow.runColor).
VERDICT_COLORS = {"collapsed": "#d62728", "adaptive": "#2ca02c", "pruned": "#1f77b4", "static": "#7f7f7f"}


def ui_link(experiment_id: str, run_id: str | None = None, base: str = "") -> str:
    """A link to an experiment (or one of its runs) in the MLflow UI's training view; relative to the UI
    without ``base`` (for notes read inside it)."""
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + f"?{TRAINING_VIEW}"
    return f"{base.rstrip('/')}/{path}" if base else path


def ui_base(tracking_uri: str) -> str:
    """The UI that shows a tracking store: a tracking server's own, else where `mlflow ui` serves by default."""
    return redact(tracking_uri).rstrip("/") if tracking_uri.startswith(("http://", "https://")) else MLFLOW_UI


def dataset_input(data: DataSpec) -> DatasetInput:
    """A trial's few-shot draw as the run's input (the runs table's Dataset column): the dataset's name,
    a digest of what decides the draw, and where the images lie; no data itself."""
    draw = {k: getattr(data, k) for k in ("name", "root", "source", "shots", "seed", "subsample")}
    digest = hashlib.sha256(json.dumps(draw, sort_keys=True).encode()).hexdigest()[:8]
    if DATASETS[data.name].reader == "bundled":
        source_type, source = "code", {"tags": {"mlgate.dataset": f"{data.name}, bundled with mlgate"}}
    else:
        source_type, source = "local", {"uri": str(Path(data.root or ".").expanduser() / data.name)}
    profile = {"shots": data.shots, "seed": data.seed, "subsample": data.subsample}
    dataset = Dataset(name=data.name, digest=digest, source_type=source_type, source=json.dumps(source),
                      profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])


def resolve_tracking_uri(uri: str | None) -> str:
    """The flag, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def tracking_client(uri: str | None) -> MlflowClient:
    """A client of the tracking URI (resolved as :func:`resolve_tracking_uri`); one MLflow cannot use is bad input."""
    uri = resolve_tracking_uri(uri)
    try:
        return MlflowClient(uri)
    except MlflowException as exc:
        raise MlgateError(f"--tracking-uri {redact(uri)}: {exc.message.strip()}") from None


def redact(url: str) -> str:
    """``scheme://user:secret@host`` → ``scheme://user:***@host`` (credentials never land in MLflow)."""
    return re.sub(r"(://[^:/@]+):[^@/]+@", r"\1:***@", url)


class TrialRun:
    """An MLflow child run for one trial; also the trainer's metric sink.

    Metrics go to a :class:`~mlgate.tracking.sender.MetricSender` process, which sends them with ``log_batch``
    while training goes on and keeps them through a tracking-server outage; the run is closed only
    once everything has landed. Artifacts and tags are sent from here, retried through an outage of
    up to ``outage_s``.
    """

    def __init__(self, client: MlflowClient, run_id: str, sender: MetricSender, outage_s: float = 600.0,
                 name: str | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.name = name
        self.history = MetricHistory()
        self.outage_s = outage_s
        self._sender = sender
        self._down_since: float | None = None

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Queue the rows; the sender process delivers them."""
        now = int(time.time() * 1000)
        self._sender.log(self.run_id, [(k, float(v), now, step) for step, values in rows for k, v in values.items()])
        self.history.add(rows)

    def flush(self) -> None:
        """Wait until every queued metric has landed (through an outage of up to the sender's limit)."""
        self._sender.flush(self.run_id)

    def _retry(self, call, block: bool = True):
        """Run an MLflow call; on connection trouble retry with backoff. Raises once the tracking
        server has been unreachable for longer than ``outage_s``."""
        delay = 0.5
        while True:
            try:
                result = call()
                self._down_since = None
                return result
            except (MlflowException, OSError) as exc:
                if not is_connection_error(exc):
                    raise
                self._down_since = self._down_since or time.time()
                if time.time() - self._down_since > self.outage_s:
                    raise RuntimeError(f"MLflow tracking unreachable for over {self.outage_s:.0f}s: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def log_artifacts(self, local_dir: Path) -> None:
        self._retry(lambda: self.client.log_artifacts(self.run_id, str(local_dir)))

    def set_tag(self, key: str, value: str) -> None:
        self._retry(lambda: self.client.set_tag(self.run_id, key, value))

    def log_image(self, key: str, image, step: int) -> None:
        """A step-aware image (the MLflow UI's image grid has a slider over the steps)."""
        self._retry(lambda: self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True))

    def end(self, state: str, verdict: str, error: BaseException | None = None) -> None:
        """Send what is pending, tag the outcome and close the run: FINISHED, KILLED (pruned or
        interrupted) or FAILED."""
        try:
            self.flush()
        except KeyboardInterrupt as exc:
            if isinstance(error, KeyboardInterrupt):
                raise  # a second interrupt while closing an interrupted trial: give up its last rows
            # Interrupted while its last rows were sent (the trial had ended): the run still closes,
            # as its Optuna trial does, failed by the interrupt.
            self.end("FAIL", verdict, error=exc)
            raise
        tags = [RunTag(STATE, state), RunTag(VERDICT, verdict)]
        if self.name is not None:
            # The verdict leads the name: the runs table's narrow name column still shows it.
            tags.append(RunTag("mlflow.runName", f"{'failed' if state == 'FAIL' else verdict} · {self.name}"))
        if state != "FAIL" and verdict in VERDICT_COLORS:
            tags.append(RunTag("mlflow.runColor", VERDICT_COLORS[verdict]))
        if error is not None:
            tags.append(RunTag("mlgate.error", f"{type(error).__name__}: {error}"[:500]))
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            self._retry(lambda: self.client.log_text(self.run_id, text, "error.txt"))
        self._retry(lambda: self.client.log_batch(self.run_id, tags=tags))
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else _RUN_STATUS[state]
        self._retry(lambda: self.client.set_terminated(self.run_id, status=status))


class StudyTracker:
    """Owns the experiment and the study run of one study."""

    def __init__(self, tracking_uri: str, experiment: str, study_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.client = tracking_client(tracking_uri)
        self.study_name = study_name
        self.experiment_id = self._experiment(experiment)
        self.study_run_id: str | None = None
        self._sender: MetricSender | None = None

    @property
    def sender(self) -> MetricSender:
        """The metric sender process of this study's trials (started with the first trial)."""
        if self._sender is None:
            self._sender = MetricSender(self.tracking_uri)
        return self._sender

    def close(self) -> None:
        """Stop the metric sender (every trial run has already flushed its metrics)."""
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def _experiment(self, name: str) -> str:
        # Declared a training experiment (custom model development), so the UI opens on its runs.
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            if EXPERIMENT_KIND not in found.tags:
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, "custom_model_development")
            return found.experiment_id
        try:
            return self.client.create_experiment(name, tags={EXPERIMENT_KIND: "custom_model_development"})
        except MlflowException:  # another worker created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def open_study_run(self, known_run_id: str | None, spec_yaml: str, params: dict[str, str]) -> str:
        """Reuse the study's run (from an earlier session, or the one ``mlflow run`` opened in this
        experiment) or create it; mark it RUNNING. Returns its id."""
        project_run_id = os.environ.get("MLFLOW_RUN_ID")
        run_id = known_run_id
        if run_id is None and project_run_id:
            project = self.client.get_run(project_run_id)
            if project.info.experiment_id == self.experiment_id:
                run_id = project_run_id
        if run_id is None:
            run_id = self._existing_study_run() or self._create_study_run(params)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.client.log_batch(run_id, tags=[
            RunTag(ROLE, "study"), RunTag(STUDY, self.study_name), RunTag("mlflow.runName", self.study_name),
            RunTag("mlgate.version", __version__),
        ])
        self.client.log_text(run_id, spec_yaml, "spec.yaml")
        if project_run_id and project_run_id != run_id:
            # `mlflow run` put its run in another experiment (runs cannot move): link the two.
            self.client.set_tag(project_run_id, "mlgate.study_run_id", run_id)
            self.client.set_tag(project_run_id, "mlflow.note.content",
                                f"mlgate study `{self.study_name}` logs to experiment id {self.experiment_id}, "
                                f"study run `{run_id}`.")
            self.client.set_tag(run_id, "mlgate.project_run_id", project_run_id)
        self.study_run_id = run_id
        return run_id

    def _existing_study_run(self) -> str | None:
        # The oldest study run of this study: workers that start together all settle on the same one.
        found = self.client.search_runs(
            [self.experiment_id], f"tags.`{ROLE}` = 'study' and tags.`{STUDY}` = '{self.study_name}'",
            order_by=["attributes.start_time ASC"])
        return min(found, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if found else None

    def _create_study_run(self, params: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=self.study_name,
                                     tags={**context_tags(), ROLE: "study", STUDY: self.study_name})
        oldest = self._existing_study_run()
        if oldest != run.info.run_id:  # another worker created one at the same moment: use the oldest
            self.client.delete_run(run.info.run_id)
            return oldest
        self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        return run.info.run_id

    def start_trial(self, number: int, method: str, params: dict[str, str], sampled: dict[str, Any],
                    baseline: str | None = None, data: DataSpec | None = None) -> TrialRun:
        """A child run of the study run, named ``<study>-t0007`` (``baseline NAME · <study>-t0000`` for a
        baseline), with the resolved config as params and ``data`` as its input; its verdict leads the
        name once it ends (``collapsed · <study>-t0007``)."""
        assert self.study_run_id is not None, "open_study_run first"
        name = (f"baseline {baseline} · " if baseline else "") + f"{self.study_name}-t{number:04d}"
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={**context_tags(),
                "mlflow.parentRunId": self.study_run_id, ROLE: "trial", STUDY: self.study_name,
                TRIAL: str(number), METHOD: method, STATE: "RUNNING",
                "mlgate.worker": f"{socket.gethostname()}:{os.getpid()}",
                "mlgate.sampled": ", ".join(sorted(sampled)) or "(none)",
                **({BASELINE: baseline} if baseline else {}),
            },
        )
        self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        if data is not None:
            self.client.log_inputs(run.info.run_id, datasets=[dataset_input(data)])
        return TrialRun(self.client, run.info.run_id, self.sender, name=name)

    def fail_run(self, run_id: str, reason: str) -> None:
        """Close a trial run whose worker died: FAILED, with the reason as tag and ``error.txt``."""
        name = self.client.get_run(run_id).info.run_name
        self.client.log_batch(run_id, tags=[RunTag(STATE, "FAIL"), RunTag("mlgate.error", reason),
                                            RunTag("mlflow.runName", f"failed · {name}")])
        self.client.log_text(run_id, reason + "\n", "error.txt")
        self.client.set_terminated(run_id, status="FAILED")

    def close_study_run(self, summary: dict[str, Any], artifacts_dir: Path | None, status: str = "FINISHED") -> None:
        """Log the study summary and end the study run."""
        run_id = self.study_run_id
        assert run_id is not None
        self.client.log_dict(run_id, summary, "summary.json")
        counts = summary.get("counts", {})
        metrics = [Metric(f"study/n_{k.lower()}", float(v), int(time.time() * 1000), 0) for k, v in counts.items()]
        if summary.get("best") is not None:
            metrics.append(Metric("study/best_value", float(summary["best"]["value"]), int(time.time() * 1000), 0))
        tags = [RunTag("mlflow.note.content", summary_note(summary, self.experiment_id))]
        if summary.get("best") is not None:
            tags.append(RunTag("mlgate.best_trial", str(summary["best"]["trial"])))
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        if artifacts_dir is not None and any(artifacts_dir.iterdir()):
            self.client.log_artifacts(run_id, str(artifacts_dir), "optuna")
        self.client.set_terminated(run_id, status=status)


def summary_note(summary: dict[str, Any], experiment_id: str | None = None) -> str:
    """Markdown description for the study run (MLflow shows it as the run's note)."""

    def link(text: str, run_id: str | None) -> str:
        # The note is read inside the MLflow UI: a link relative to it.
        return f"[{text}]({ui_link(experiment_id, run_id)})" if experiment_id is not None and run_id else text

    lines = [f"## mlgate study `{summary['study']}`", ""]
    counts = ", ".join(f"{v} {k.lower()}" for k, v in summary.get("counts", {}).items())
    lines.append(f"Trials: {counts or 'none'}.")
    verdicts = summary.get("verdicts")
    if verdicts:
        lines.append("Verdicts: " + ", ".join(f"{v} {k}" for k, v in verdicts.items()) + ".")
    baselines = summary.get("baselines")
    if baselines:
        lines.append("Baselines: " + "; ".join(
            f"{link(name, b.get('run_id'))} (trial {b['trial']}) {b.get('verdict') or b['state'].lower()}"
            + (f", {summary['objective']} = {b['value']:.4g}" if b.get("value") is not None else "")
            for name, b in baselines.items()) + ".")
    best = summary.get("best")
    if best:
        name = f"{summary['study']}-t{best['trial']:04d}"
        lines.append(f"Best: trial {best['trial']} ({summary['objective']} = {best['value']:.4g}), run "
                     f"{link(name, best.get('run_id'))}, params `{best['params']}`.")
    importances = summary.get("importances")
    if importances:
        lines.append("Parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()) + ".")
    return "\n".join(lines)
