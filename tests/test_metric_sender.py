"""The metric sender process: what it is given lands in MLflow, in order, and what cannot land is
reported to the trial that logged it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from mlgate.tracking.sender import SEND_INTERVAL_S, MetricSender


@pytest.fixture
def store(tmp_path):
    """(URI, client, run id) of a run in a fresh SQLite MLflow store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_run(client.create_experiment("sender")).info.run_id


@pytest.fixture
def mlgate_signals():
    """mlgate's SIGINT/SIGTERM handlers for the test (as `mlgate` installs them), restored after."""
    import signal

    from mlgate import interrupts

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    interrupts.install()
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)
    sys.unraisablehook = hook


def test_rows_land_and_failures_reach_their_run(store):
    uri, client, run_id = store
    sender = MetricSender(uri)
    try:
        idle_cpu = sender.cpu_seconds()
        for start in range(0, 300, 100):  # several queued batches, sent while the caller goes on
            sender.log(run_id, [("loss/total", float(i), 0, i) for i in range(start, start + 100)])
        sender.flush(run_id)
        assert sender.cpu_seconds() > idle_cpu  # the sending is the sender's work, and is measured
        history = client.get_metric_history(run_id, "loss/total")
        assert [m.step for m in history] == list(range(300)) and history[-1].value == 299.0
        sender.log("no-such-run", [("loss/total", 1.0, 0, 1)])
        with pytest.raises(RuntimeError, match="no-such-run"):
            sender.flush("no-such-run")
        sender.log(run_id, [("loss/total", 7.0, 0, 300)])  # the failure of one run leaves the others alone
        sender.flush(run_id)
        assert len(client.get_metric_history(run_id, "loss/total")) == 301
        sender.log(run_id, [("live", 1.0, 0, 0)])  # no flush: it still goes out within the send interval
        deadline = time.monotonic() + SEND_INTERVAL_S + 10
        while not client.get_metric_history(run_id, "live") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [m.value for m in client.get_metric_history(run_id, "live")] == [1.0]
    finally:
        sender.close()
    assert not sender._process.is_alive()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_leaves_the_sender_running(store, signum):
    # A terminal's Ctrl-C, and the SIGTERM of `timeout`, Slurm or a container stop, reach every
    # process of the group: the trainer closes its runs, and the sender must still be there to take
    # their last rows.
    uri, client, run_id = store
    sender = MetricSender(uri)
    try:
        sender.log(run_id, [("loss/total", 1.0, 0, 1)])
        sender.flush(run_id)  # the process is up and serving
        os.kill(sender._process.pid, signum)
        time.sleep(0.5)
        sender.log(run_id, [("loss/total", 2.0, 0, 2)])
        sender.flush(run_id)
        assert [m.value for m in client.get_metric_history(run_id, "loss/total")] == [1.0, 2.0]
    finally:
        sender.close()


def test_a_killed_owners_sender_sends_what_it_was_given_and_ends(store):
    # The sender ignores the signals a trainer gets; a trainer killed outright (SIGKILL, the OOM
    # killer) must not leave it behind for good, nor lose the rows it had already queued.
    import psutil

    uri, client, run_id = store
    script = f"""
import os, signal, time
from mlgate.tracking.sender import MetricSender
sender = MetricSender({uri!r})
sender.log({run_id!r}, [("loss/total", float(i), 0, i) for i in range(5)])
print(sender._process.pid, flush=True)
time.sleep(0.5)  # the queue's feeder thread writes the rows out
os.kill(os.getpid(), signal.SIGKILL)
"""
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    sender = psutil.Process(int(owner.stdout.readline()))
    assert owner.wait(timeout=120) == -signal.SIGKILL
    sender.wait(timeout=30)  # raises psutil.TimeoutExpired if it lingers
    owner.stdout.close()
    assert [m.step for m in client.get_metric_history(run_id, "loss/total")] == list(range(5))


def test_an_interrupt_dropped_inside_a_finalizer_is_raised_at_the_next_check(mlgate_signals):
    # A signal whose handler runs while the main thread is in a __del__ or weakref callback (garbage
    # collection: seen in SQLAlchemy's, under a full test run) raises there, and Python prints and
    # drops the KeyboardInterrupt; the trial then trained on through SIGTERM. check(), between
    # training steps, raises it again, once.
    from mlgate import interrupts

    class SignalledWhileCollected:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)

    SignalledWhileCollected()  # collected at once: the interrupt lands in __del__, and is dropped
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()
    interrupts.check()  # raised once


def test_an_interrupt_waits_for_the_end_of_a_deferred_section(mlgate_signals):
    # SIGTERM (or Ctrl-C) inside a queue operation would leave the queue unusable for the flush that
    # closes the interrupted trial; it is raised when the section ends instead.
    import os
    import signal

    from mlgate import interrupts

    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler has run by now
            finished.append("section")
    assert finished == ["section"]
    with pytest.raises(KeyboardInterrupt):  # outside a section: at once
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        finished.append("after")
    assert finished == ["section"]


def test_an_interrupt_while_a_finished_trial_closes_still_closes_its_run(store, monkeypatch, mlgate_signals):
    # SIGTERM landing in the last flush of a trial that had finished: the run must not stay RUNNING.
    import os
    import signal

    from mlgate.tracking.runs import STATE, TrialRun

    uri, client, run_id = store
    sender = MetricSender(uri)
    real_flush, calls = sender.flush, []

    def flush_with_a_signal(run):  # the signal arrives while the first flush waits for the sender
        calls.append(run)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        real_flush(run)

    monkeypatch.setattr(sender, "flush", flush_with_a_signal)
    try:
        run = TrialRun(client, run_id, sender)
        run.log_metrics([(1, {"loss/total": 1.0})])
        with pytest.raises(KeyboardInterrupt):
            run.end("COMPLETE", "static")
        closed = client.get_run(run_id)
        assert closed.info.status == "KILLED" and closed.data.tags[STATE] == "FAIL"
        assert "KeyboardInterrupt" in closed.data.tags["mlgate.error"]
        assert [m.value for m in client.get_metric_history(run_id, "loss/total")] == [1.0]
    finally:
        sender.close()
