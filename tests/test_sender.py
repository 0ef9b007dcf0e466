"""The metric sender process: what it is given lands in MLflow, in order, and what cannot land is
reported to the trial that logged it."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from mlgate.sender import SEND_INTERVAL_S, MetricSender


def test_rows_land_and_failures_reach_their_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sender")).info.run_id
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
