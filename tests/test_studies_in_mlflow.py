"""Studies end to end on a real SQLite MLflow store and a real Optuna storage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from mlgate.cli import main
from tests.conftest import REPO


def runs_of(experiment: str, uri: str | None = None):
    # Absolute URIs only: MLflow caches stores by URI, and a relative one would outlive the test's cwd.
    client = MlflowClient(uri or f"sqlite:///{os.getcwd()}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id])
    study = [r for r in runs if r.data.tags.get("mlgate.role") == "study"]
    trials = sorted((r for r in runs if r.data.tags.get("mlgate.role") == "trial"),
                    key=lambda r: int(r.data.tags["mlgate.trial"]))
    return client, study, trials


def test_two_trial_study_lands_in_mlflow(workdir, write_spec, capsys):
    path = write_spec()
    assert main(["run", str(path)]) == 0
    client, [study], trials = runs_of("tiny")
    # A training experiment, opened by the printed link in the UI's training view.
    experiment = client.get_experiment(study.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    out = capsys.readouterr().out
    assert (f"MLflow UI, training view: http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}"
            "?workflowType=machine_learning\n") in out
    assert f"mlflow ui --backend-store-uri sqlite:///{workdir}/mlflow.db" in out

    assert study.info.run_name == "tiny" and study.info.status == "FINISHED"
    assert study.data.tags["mlgate.study"] == "tiny"
    study_artifacts = {a.path for a in client.list_artifacts(study.info.run_id)}
    assert {"spec.yaml", "summary.json", "optuna"} <= study_artifacts
    plots = {a.path for a in client.list_artifacts(study.info.run_id, "optuna")}
    assert "optuna/optimization_history.png" in plots

    # The runs table answers "did it adapt?": each trial's verdict leads its name and colours it when it ends.
    assert [t.info.run_name for t in trials] == [f"{t.data.tags['mlgate.verdict']} · tiny-t000{i}"
                                                 for i, t in enumerate(trials)]
    assert {t.data.tags["mlflow.runColor"] for t in trials} <= {"#d62728", "#2ca02c"}
    sampled = set()
    for trial in trials:
        tags, params = trial.data.tags, trial.data.params
        assert tags["mlflow.parentRunId"] == study.info.run_id
        assert tags["mlgate.method"] == "coop" and tags["mlgate.state"] == "COMPLETE"
        assert tags["mlgate.verdict"] in ("collapsed", "adaptive")
        assert trial.info.status == "FINISHED"
        assert params["train.steps"] == "6" and params["method.name"] == "coop"
        sampled.add(params["train.gate_lr_mult"])
        history = client.get_metric_history(trial.info.run_id, "grad/gap_log10")
        assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
        for key in ("loss/total", "loss/cls", "loss/reg", "grad/prompt_norm", "grad/gate_norm", "gate/mean",
                    "gate/min", "gate/max", "gate/drift", "gate/effective_length", "acc/base", "acc/novel",
                    "acc/hm", "acc/val", "params/trainable"):
            assert key in trial.data.metrics, key
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "acc/val")] == [3, 6]
        # The diagnostics outside the headline ones every logging.detail_every-th step (5) and at the last;
        # every value of every step in metrics/history.csv.
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "gate/entropy")] == [5, 6]
        table = Path(client.download_artifacts(trial.info.run_id, "metrics/history.csv")).read_text().splitlines()
        assert table[0] == "step,key,value"
        assert [int(line.split(",")[0]) for line in table if ",gate/entropy," in line] == [1, 2, 3, 4, 5, 6]
        assert {line.split(",")[1] for line in table[1:]} >= set(trial.data.metrics)
        for strategy in ("fixed", "random", "per_layer", "per_token"):  # Table II, gates swapped at the end
            assert [m.step for m in client.get_metric_history(trial.info.run_id, f"acc/gates/{strategy}")] == [6]
        [data] = trial.inputs.dataset_inputs  # the runs table's Dataset column
        assert (data.dataset.name, data.dataset.source_type) == ("shapes", "code")
        assert data.tags[0].key == "mlflow.data.context" and data.tags[0].value == "train"
        gates = {a.path for a in client.list_artifacts(trial.info.run_id, "gates")}
        assert {"gates/trajectory.npy", "gates/trajectory.png"} <= gates
    assert len(sampled) == 2

    summary = client.download_artifacts(study.info.run_id, "summary.json")
    import json

    summary = json.load(open(summary))
    assert summary["counts"] == {"COMPLETE": 2}
    assert summary["best"]["run_id"] in {t.info.run_id for t in trials}

    # The Optuna study sits in a journal file beside the MLflow db, linked both ways.
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workdir / "mlflow.optuna.journal")))
    ostudy = optuna.load_study(study_name="tiny", storage=storage)
    assert ostudy.user_attrs["mlgate.study_run_id"] == study.info.run_id
    assert [t.user_attrs["mlflow_run_id"] for t in ostudy.trials] == [t.info.run_id for t in trials]


def test_resume_continues_to_the_full_count(workdir, write_spec):
    path = write_spec()
    assert main(["run", str(path), "--trials", "1"]) == 0
    _, [first], trials = runs_of("tiny")
    assert len(trials) == 1
    assert main(["run", str(path)]) == 0  # the spec says 2
    _, [again], trials = runs_of("tiny")
    assert again.info.run_id == first.info.run_id
    assert [t.data.tags["mlgate.trial"] for t in trials] == ["0", "1"]
    assert main(["run", str(path)]) == 0  # already complete: nothing more
    assert len(runs_of("tiny")[2]) == 2


def test_baselines_run_first_once_each_and_are_named(workdir, write_spec):
    path = write_spec(study={"n_trials": 3}, baselines={
        "reference": {"train": {"optimizer": {"lr": 0.002}}},
        "no_gates": {"method": {"gate": {"enabled": False}}, "train": {"optimizer": {"lr": 0.002}}}})
    assert main(["run", str(path), "--trials", "1"]) == 0
    assert main(["run", str(path)]) == 0  # resumed: the second baseline, then a searched trial
    _, [study], trials = runs_of("tiny")
    first, second, searched = trials
    names = sorted(t.data.tags.get("mlgate.baseline") for t in (first, second))
    assert names == ["no_gates", "reference"] and "mlgate.baseline" not in searched.data.tags
    no_gates = next(t for t in trials if t.data.tags.get("mlgate.baseline") == "no_gates")
    assert no_gates.info.run_name == f"static · baseline no_gates · tiny-t000{no_gates.data.tags['mlgate.trial']}"
    assert no_gates.data.params["method.gate.enabled"] == "False" and no_gates.data.params["baseline"] == "no_gates"
    assert no_gates.data.params["train.optimizer.lr"] == "0.002" and no_gates.data.params["train.gate_lr_mult"] == "1.0"
    assert searched.data.params["train.optimizer.lr"] == "0.01" and searched.data.params["baseline"] == "null"
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workdir / "mlflow.optuna.journal")))
    ostudy = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.user_attrs.get("mlgate.baseline") for t in ostudy.trials][2:] == [None]  # queued once, not again
    import json

    summary = json.load(open(MlflowClient(f"sqlite:///{workdir}/mlflow.db").download_artifacts(
        study.info.run_id, "summary.json")))
    assert summary["baselines"]["no_gates"]["verdict"] == "static"
    assert "Baselines: [no_gates](#/experiments/" in study.data.tags["mlflow.note.content"]


def test_a_baseline_runs_to_its_end_whatever_the_pruner(workdir, write_spec):
    path = write_spec(study={"pruner": {"type": "threshold", "lower": 101.0}},  # no accuracy passes
                      baselines={"slow": {"train": {"optimizer": {"lr": 0.002}}}})
    assert main(["run", str(path)]) == 0
    _, _, (baseline, searched) = runs_of("tiny")
    assert baseline.data.tags["mlgate.baseline"] == "slow" and baseline.data.tags["mlgate.state"] == "COMPLETE"
    assert searched.data.tags["mlgate.state"] == "PRUNED"


def test_the_pruner_compares_a_trial_with_the_searched_trials_only():
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from mlgate.sweep.search import WithoutBaselines

    def study_with(pruner):
        study = optuna.create_study(direction="maximize", pruner=pruner)
        x = {"x": FloatDistribution(0, 1)}
        study.add_trial(create_trial(params={"x": 0.1}, distributions=x, value=0.1, intermediate_values={1: 0.1},
                                     user_attrs={"mlgate.baseline": "reference"}))
        study.add_trial(create_trial(params={"x": 0.9}, distributions=x, value=0.9, intermediate_values={1: 0.9}))
        trial = study.ask()
        trial.report(0.5, 1)
        return trial.should_prune()

    median = dict(n_startup_trials=1, n_warmup_steps=0)
    assert not study_with(optuna.pruners.MedianPruner(**median))  # the baseline drags the median to 0.5
    assert study_with(WithoutBaselines(optuna.pruners.MedianPruner(**median)))  # the searched trials' is 0.9


def test_pruned_trials_are_killed_runs_and_count(workdir, write_spec):
    path = write_spec(study={"pruner": {"type": "threshold", "lower": 101.0}})  # no accuracy passes
    assert main(["run", str(path)]) == 0
    _, _, trials = runs_of("tiny")
    assert len(trials) == 2
    for trial in trials:
        assert trial.info.status == "KILLED"
        assert trial.data.tags["mlgate.state"] == "PRUNED"
        assert "mlgate.verdict" in trial.data.tags
        assert trial.data.metrics["acc/val"] >= 0  # metrics up to the pruning point are kept


def test_failing_trials_stop_the_study_with_exit_1(workdir, write_spec, capsys):
    path = write_spec(train={"optimizer": {"lr": 1e30}}, study={"max_consecutive_failures": 2})
    assert main(["run", str(path)]) == 1
    assert "failed in a row" in capsys.readouterr().err
    client, [study], trials = runs_of("tiny")
    assert study.info.status == "FAILED"
    assert len(trials) == 2
    for trial in trials:
        assert trial.info.status == "FAILED" and trial.data.tags["mlgate.state"] == "FAIL"
        assert "non-finite" in trial.data.tags["mlgate.error"]
        assert "error.txt" in {a.path for a in client.list_artifacts(trial.info.run_id)}
        assert "loss/total" in trial.data.metrics  # what was logged before the failure is kept


def test_rdb_storage_url_and_tracking_uri_flags(workdir, write_spec):
    path = write_spec()
    uri = f"sqlite:///{workdir / 'elsewhere.db'}"
    assert main(["run", str(path), "--trials", "1", "--storage", f"sqlite:///{workdir / 'optuna.db'}",
                 "--tracking-uri", uri, "--set", "experiment=custom"]) == 0
    assert len(runs_of("custom", uri)[2]) == 1
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{workdir / 'optuna.db'}").trials) == 1


def _mlflow_run(workdir, env_extra, *params):
    # The MLproject's `python` must be this environment's, as it is for a user with the env activated.
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", **env_extra}
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local"]
    for p in params:
        cmd += ["-P", p]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir, timeout=600)


@pytest.mark.parametrize("same_experiment", [False, True], ids=["default-experiment", "study-experiment"])
def test_mlflow_run_through_the_mlproject(workdir, write_spec, same_experiment):
    path = write_spec()
    env = {"MLFLOW_EXPERIMENT_NAME": "tiny"} if same_experiment else {}
    result = _mlflow_run(workdir, env, f"study={path}", "trials=1", "overrides=train.steps=3 train.eval_interval=3")
    assert result.returncode == 0, result.stderr[-3000:]
    client, [study], [trial] = runs_of("tiny")
    assert trial.data.params["train.steps"] == "3"
    assert trial.data.tags["mlflow.parentRunId"] == study.info.run_id
    project = client.search_runs([client.get_experiment_by_name("tiny" if same_experiment else "Default")
                                  .experiment_id], "tags.`mlflow.source.type` = 'PROJECT'")
    assert len(project) == 1
    if same_experiment:
        assert project[0].info.run_id == study.info.run_id  # the project run is the study run
    else:
        assert project[0].data.tags["mlgate.study_run_id"] == study.info.run_id
        assert study.data.tags["mlgate.project_run_id"] == project[0].info.run_id


@pytest.mark.parametrize("override, expected", [
    ("backbone.name=ViT-Q-99", "unknown open_clip model"),
    ("data.name=eurosat", "data.root"),
    ("method.ctx_init=a photo", "has 2 tokens but n_ctx is 4"),
    ("study.objective=acc/foo", "not reported at evaluation"),
])
def test_a_spec_that_cannot_train_fails_before_any_trial(workdir, write_spec, capsys, override, expected):
    path = write_spec()
    assert main(["run", str(path), "--set", override]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert client.get_experiment_by_name("tiny") is None  # nothing was started, nothing half-logged
