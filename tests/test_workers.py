"""Scale-out and faults with real processes and real databases: exact counts, dead workers, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.test_studies_in_mlflow import runs_of

FAST = {"train": {"steps": 6, "eval_interval": 3}}
SLOW = {"steps": 4000, "eval_interval": 4000}
BEATS = {"heartbeat_interval": 0.5, "heartbeat_grace": 3.0}


def _mlgate(workdir, *args, wait=True):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlgate", "run", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def _journal(workdir):
    return optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workdir / "mlflow.optuna.journal")))


def _wait_for_running_trial(storage, name="tiny", timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            trials = optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.RUNNING,))
            if trials and "mlflow_run_id" in trials[0].user_attrs:
                return trials[0]
        except KeyError:
            pass  # the study does not exist yet
        time.sleep(0.3)
    raise AssertionError("no trial started")


def test_two_workers_on_the_default_storage_share_an_exact_count(workdir, write_spec):
    write_spec(study={"n_trials": 5}, **FAST)
    result = _mlgate(workdir, "tiny", "--workers", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    _, [study], trials = runs_of("tiny")
    assert len(trials) == 5 and study.info.status == "FINISHED"
    assert len({t.data.tags["mlgate.worker"] for t in trials}) == 2
    finished = optuna.load_study(study_name="tiny", storage=_journal(workdir)).get_trials(
        states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 5


def test_two_machines_on_postgresql(workdir, write_spec, postgres_url):
    write_spec(study={"n_trials": 4}, **FAST)
    MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").search_experiments()  # create the MLflow db once
    procs = [_mlgate(workdir, "tiny", "--storage", postgres_url, wait=False) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="tiny", storage=postgres_url)
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 4
    _, [_], trials = runs_of("tiny")
    assert len(trials) == 4 and len({t.data.tags["mlgate.worker"] for t in trials}) == 2


def test_a_killed_workers_trial_is_failed_and_retried(workdir, write_spec):
    write_spec(study={"n_trials": 2, **BEATS}, train=SLOW)
    victim = _mlgate(workdir, "tiny", wait=False)
    stale = _wait_for_running_trial(_journal(workdir))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    result = _mlgate(workdir, "tiny", "--set", "train.steps=6", "--set", "train.eval_interval=3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker died" in result.stderr
    study = optuna.load_study(study_name="tiny", storage=_journal(workdir))
    assert study.trials[stale.number].state == TrialState.FAIL
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 2
    retried = [t for t in study.trials if t.user_attrs.get("mlgate.retry_of") == stale.number]
    assert retried and retried[0].params == stale.params and retried[0].state == TrialState.COMPLETE
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    dead = client.get_run(stale.user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED" and "worker died" in dead.data.tags["mlgate.error"]


def test_sigterm_closes_the_running_trial_and_the_same_command_resumes(workdir, write_spec):
    write_spec(study={"n_trials": 1, **BEATS}, train={"steps": 10**6, "eval_interval": 10**6})  # still running
    proc = _mlgate(workdir, "tiny", wait=False)
    running = _wait_for_running_trial(_journal(workdir))
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run_id = running.user_attrs["mlflow_run_id"]
    deadline = time.time() + 120
    while not client.get_metric_history(run_id, "loss/total") and time.time() < deadline:
        time.sleep(0.2)  # until training is under way (a slow machine may take seconds to start it)
    seen = max(m.step for m in client.get_metric_history(run_id, "loss/total"))
    time.sleep(0.5)  # more steps, queued for the sender, which sends every 2 s
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "resume" in output
    study = optuna.load_study(study_name="tiny", storage=_journal(workdir))
    assert study.trials[running.number].state == TrialState.FAIL  # not left RUNNING
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED"
    assert max(m.step for m in client.get_metric_history(run_id, "loss/total")) > seen  # the queued rows: flushed
    result = _mlgate(workdir, "tiny", "--set", "train.steps=6", "--set", "train.eval_interval=3")
    assert result.returncode == 0, result.stderr
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 1


def test_credentials_never_land_in_mlflow(workdir, write_spec, postgres_url):
    secret_url = postgres_url.replace("postgres@", "postgres:s3cr3t@")  # trust auth ignores the password
    write_spec(study={"n_trials": 1}, **FAST)
    result = _mlgate(workdir, "tiny", "--storage", secret_url)
    assert result.returncode == 0, result.stderr
    assert "s3cr3t" not in result.stdout + result.stderr
    client, [study], [trial] = runs_of("tiny")
    for run in (study, trial):
        everything = str(run.data.params) + str(run.data.tags)
        assert "s3cr3t" not in everything


def test_metrics_survive_a_tracking_server_outage(workdir, write_spec):
    from tests.conftest import start_mlflow_server, stop

    backend = f"sqlite:///{workdir / 'server.db'}"
    server, url = start_mlflow_server(workdir, backend)
    port = int(url.rsplit(":", 1)[1])
    write_spec(study={"n_trials": 1, **BEATS}, train={"steps": 3000, "eval_interval": 3000},
               logging={"diagnostics_every": 10, "flush_every": 100})
    env_fast_fail = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}
    os.environ.update(env_fast_fail)
    try:
        proc = _mlgate(workdir, "tiny", "--tracking-uri", url, wait=False)
        _wait_for_running_trial(_journal_for(workdir, "mlgate.optuna.journal"))
        stop(server)  # the server goes away mid-trial...
        time.sleep(4)
        server, _ = start_mlflow_server(workdir, backend, port)  # ...and comes back
        output = proc.communicate(timeout=600)[0]
    finally:
        for key in env_fast_fail:
            os.environ.pop(key)
    try:
        assert proc.returncode == 0, output
        assert "unreachable; buffering" in output and "reachable again" in output
        client = MlflowClient(url)
        [trial] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                     "tags.`mlgate.role` = 'trial'")
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "loss/total")]
        assert steps == list(range(10, 3001, 10))  # nothing dropped during the outage
        assert trial.info.status == "FINISHED"
    finally:
        stop(server)


def _journal_for(workdir, name):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(workdir / name)))
