"""Trials whose worker died: each running trial stamps a heartbeat, and any worker fails (and
requeues) a trial whose heartbeat is too old."""

from __future__ import annotations

import threading
import time
from typing import Callable

import optuna
from optuna.trial import TrialState

from mlgate.tracking.runs import BASELINE, StudyTracker

HEARTBEAT_ATTR = "mlgate.heartbeat"


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
            keep = {k: v for k, v in t.user_attrs.items() if k == BASELINE}  # a baseline stays one
            study.enqueue_trial(t.params, user_attrs={**keep, "mlgate.retries": retries + 1,
                                                      "mlgate.retry_of": t.number})
        echo(f"trial {t.number}: FAIL  {reason}" + ("; retrying" if retries < max_retries else ""))
