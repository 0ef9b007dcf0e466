"""`python -m mlgate.compare` on a real MLflow store, filled by hand-written runs and by a short study."""

from __future__ import annotations

import csv
import io
import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mlgate.cli import main as mlgate_main
from mlgate.compare import main as compare

GAP_COLLAPSED = [1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 0.1]  # final value low, second-half median 3.0


def _log(name: str, series: dict[str, list[float]], params: dict | None = None, tags: dict | None = None):
    """A run as an outside training loop would log it: one log_metric per value."""
    with mlflow.start_run(run_name=name, tags=tags or {}):
        if params:
            mlflow.log_params(params)
        for key, values in series.items():
            for step, value in enumerate(values, start=1):
                mlflow.log_metric(key, value, step=step)


@pytest.fixture
def outside_runs(workdir):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("outside")
    _log("collapsed-run", {"grad/gap_log10": GAP_COLLAPSED, "gate/drift": [0.0, 0.001], "gate/batch_std": [0.0],
                           "gate/mean": [0.5, 0.5], "gate/effective_length": [2.0], "acc/hm": [70.0],
                           "params/trainable": [2052.0]}, tags={"mlgate.method": "coop_gated"})
    _log("adaptive-run", {"grad/gap_log10": [1.0, 0.5, 0.4, 0.3], "gate/drift": [0.0, 0.3],
                          "gate/mean": [0.5, 0.8], "acc/hm": [74.0], "params/trainable": [2052.0]},
         tags={"mlgate.method": "coop_gated"})
    # Gates that never left their init while the gap stayed under 2 orders (a gap-only rule said adaptive).
    _log("never-moved-run", {"grad/gap_log10": [1.8] * 4, "gate/drift": [0.0, 0.002, 0.003, 0.004],
                             "gate/mean": [0.5] * 4, "acc/hm": [69.0]}, tags={"mlgate.method": "coop_lr0.002"})
    _log("pruned-run", {"mask/active_tokens": [64, 48, 32, 16], "mask/active_tokens/d0": [8],
                        "mask/active_tokens/d1": [4], "acc/hm": [76.0], "params/trainable": [9000.0]},
         params={"method.t_target": "16"}, tags={"mlgate.method": "adapt"})
    _log("baseline-run", {"acc/hm": [72.0], "acc/base": [80.0], "params/trainable": [2048.0]},
         tags={"mlgate.method": "coop_gated"})
    _log("unrelated-run", {"my_metric": [1.0]})
    return uri


def _json(capsys, *args) -> dict:
    assert compare(["--experiment", "outside", "--format", "json", "--no-log", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_verdicts_and_groups_by_value(outside_runs, capsys):
    report = _json(capsys)
    runs = {r["run_name"]: r for r in report["runs"]}
    assert set(runs) == {"collapsed-run", "never-moved-run", "adaptive-run", "pruned-run", "baseline-run"}
    assert {n: r["verdict"] for n, r in runs.items()} == {
        "collapsed-run": "collapsed", "never-moved-run": "collapsed", "adaptive-run": "adaptive",
        "pruned-run": "pruned", "baseline-run": "static"}
    collapsed = runs["collapsed-run"]
    assert collapsed["grad_gap_log10"] == 3.0  # median of the second half of the history, not the last value
    assert collapsed["gate_drift"] == 0.001 and collapsed["gate_batch_std"] == 0.0
    assert collapsed["effective_length"] == 2.0 and collapsed["trainable_params"] == 2052.0
    assert collapsed["method"] == "coop_gated" and collapsed["state"] == "COMPLETE"
    assert runs["pruned-run"]["active_tokens"] == 16 and runs["pruned-run"]["compression"] == 0.75
    keys = {"run_id", "run_name", "study", "trial", "method", "state", "verdict", "grad_gap_log10", "gate_drift",
            "gate_batch_std", "gate_input_std", "effective_length", "active_tokens", "acc_base", "acc_novel", "acc_hm",
            "trainable_params"}
    assert keys <= set(collapsed)
    assert [r["run_name"] for r in report["runs"]][:2] == ["pruned-run", "adaptive-run"]  # ranked by acc_hm

    groups = {g["method"]: g for g in report["groups"]}
    coop = groups["coop_gated"]
    assert coop["n_runs"] == 3
    assert coop["verdicts"] == {"collapsed": 1, "adaptive": 1, "static": 1}
    assert coop["collapse_rate"] == 0.5
    assert coop["acc_hm_mean"] == pytest.approx(72.0) and coop["acc_hm_best"] == 74.0
    adapt = groups["adapt"]
    assert adapt["acc_vs_t_target"] == [[16.0, 76.0]]
    assert adapt["depth_heterogeneity"] == pytest.approx(1 / 3)  # lengths 8 and 4: std 2 / mean 6

    headline = {(h["kind"], h["method"]): h for h in report["headline"]}
    gating = headline[("gating", "coop_gated")]
    assert gating["adapted"] == 0.5 and gating["n_adapted"] == 1
    assert gating["gain_vs_baseline"] == pytest.approx(72.0 - 72.0)
    assert headline[("pruning", "adapt")]["compression"] == 0.75


def test_the_headline_reads_gains_and_verdicts_against_the_studys_baselines(workdir, capsys):
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow.set_experiment("outside")
    study = {"mlgate.method": "coop", "mlgate.study": "s"}
    _log("t0", {"gate/drift": [0.0, 0.001], "gate/mean": [0.5, 0.5], "acc/hm": [61.0]},
         tags={**study, "mlgate.trial": "0", "mlgate.baseline": "reference"})
    _log("t1", {"acc/hm": [60.0]}, tags={**study, "mlgate.trial": "1", "mlgate.baseline": "no_gates"})
    for i, hm in enumerate([70.0, 74.0, 66.0], start=2):
        moved = [0.5, 0.8] if i < 4 else [0.5, 0.5]
        _log(f"t{i}", {"gate/drift": [0.0, abs(moved[1] - 0.5)], "gate/mean": moved, "acc/hm": [hm]},
             tags={**study, "mlgate.trial": str(i)})
    _log("elsewhere", {"acc/hm": [90.0]}, tags={"mlgate.method": "coop"})  # static, but not a baseline
    [gating] = _json(capsys)["headline"]
    assert (gating["n_runs"], gating["n_adapted"]) == (3, 2)  # the baselines are reference points, not runs
    assert gating["gain_vs_baseline"] == pytest.approx(70.0 - 60.0)  # against the ungated baseline
    assert gating["baselines"] == {"reference": {"verdict": "collapsed", "acc_hm": 61.0},
                                   "no_gates": {"verdict": "static", "acc_hm": 60.0}}
    assert compare(["--experiment", "outside", "--no-log", "--format", "markdown"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| gating"))
    assert "| 2/3, 67% |" in row and "reference collapsed (HM 61); no_gates static (HM 60)" in row


def test_thresholds_filters_and_ranking(outside_runs, capsys):
    runs = {r["run_name"]: r for r in _json(capsys, "--gap", "4")["runs"]}
    assert runs["collapsed-run"]["verdict"] == "collapsed"  # it ended near its init: no gap needed
    runs = {r["run_name"]: r for r in _json(capsys, "--drift", "0.0005")["runs"]}
    assert runs["collapsed-run"]["verdict"] == "collapsed"  # still, and starved (gap 3)
    assert runs["never-moved-run"]["verdict"] == "adaptive"  # moved 0.004 > 0.0005, and the gap is low
    runs = {r["run_name"]: r for r in _json(capsys, "--drift", "0.0005", "--gap", "4")["runs"]}
    assert runs["collapsed-run"]["verdict"] == "adaptive"
    runs = {r["run_name"]: r for r in _json(capsys, "--drift", "0.0005", "--stillness", "0.0001")["runs"]}
    assert runs["collapsed-run"]["verdict"] == "adaptive"  # its drift changed 0.001 from the middle
    runs = {r["run_name"]: r for r in _json(capsys, "--drift", "0.5")["runs"]}
    assert runs["adaptive-run"]["verdict"] == "collapsed"  # ended within 0.5 of its init
    assert [r["run_name"] for r in _json(capsys, "--rank-by", "trainable_params")["runs"]][0] == "pruned-run"
    assert _json(capsys, "--state", "COMPLETE")["runs"]
    assert compare(["--experiment", "outside", "--state", "PRUNED", "--no-log"]) == 2


def test_every_format(outside_runs, capsys, workdir):
    out = workdir / "report"
    assert compare(["--experiment", "outside", "--output", str(out), "--no-log"]) == 0
    table = capsys.readouterr().out
    assert "collapsed-run" in table and "Gating vs pruning" in table and "collapsed" in table
    rows = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert {r["run_name"]: r["verdict"] for r in rows}["pruned-run"] == "pruned"
    assert rows[0]["acc_hm"] == "76.0"
    markdown = (out / "report.md").read_text()
    assert "| collapsed-run | coop_gated | COMPLETE | collapsed | 3 |" in markdown
    report = json.loads((out / "report.json").read_text())
    assert report["experiment"] == "outside"
    experiment_id = MlflowClient(outside_runs).get_experiment_by_name("outside").experiment_id
    assert report["ui"] == f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning"
    page = (out / "report.html").read_text()
    assert page.count("<img") >= 4  # gap curves, gate trajectories, active tokens, acc vs T_target, acc vs params
    assert "collapsed-run" in page and "src='http" not in page and "<script" not in page  # self-contained
    assert "?workflowType=machine_learning'>MLflow UI, training view</a>" in page
    for fmt in ("markdown", "csv", "json", "html"):
        assert compare(["--experiment", "outside", "--format", fmt, "--no-log"]) == 0
        assert capsys.readouterr().out.strip() == (out / {"markdown": "report.md", "csv": "runs.csv",
                                                          "json": "report.json", "html": "report.html"}[fmt]
                                                   ).read_text().strip()


def test_report_is_logged_to_one_report_run(outside_runs, capsys):
    client = MlflowClient(outside_runs)
    exp = client.get_experiment_by_name("outside")
    assert compare(["--experiment", "outside"]) == 0
    assert compare(["--experiment", "outside"]) == 0
    capsys.readouterr()
    [report] = client.search_runs([exp.experiment_id], "tags.`mlgate.role` = 'report'")
    assert {a.path for a in client.list_artifacts(report.info.run_id, "compare")} == {
        "compare/report.md", "compare/runs.csv", "compare/report.json", "compare/report.html"}
    assert len(_json(capsys)["runs"]) == 5  # the report run is not a run to compare


def test_clear_errors(workdir, capsys):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    assert compare(["--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "no experiment named 'nope'" in capsys.readouterr().err
    mlflow.set_experiment("empty")
    assert compare(["--experiment", "empty", "--tracking-uri", uri]) == 2
    assert "has no runs" in capsys.readouterr().err
    _log("x", {"other": [1.0]})
    assert compare(["--experiment", "empty", "--tracking-uri", uri]) == 2
    assert "vocabulary" in capsys.readouterr().err


def test_compare_on_a_short_study(workdir, write_spec, capsys, monkeypatch):
    from mlgate.verdicts import Evidence

    path = write_spec(study={"n_trials": 3}, method={"gate": {"enabled": True}})
    assert mlgate_main(["run", str(path)]) == 0
    capsys.readouterr()
    assert compare(["--experiment", "tiny", "--format", "json", "--no-log"]) == 0
    report = json.loads(capsys.readouterr().out)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert len(report["runs"]) == 3
    for run in report["runs"]:
        data = client.get_run(run["run_id"]).data
        tags = data.tags
        assert run["verdict"] == tags["mlgate.verdict"]  # compare agrees with the trainer
        assert data.metrics["verdict/has_gates"] == 1.0 and "verdict/gap_median" in data.metrics
        assert run["study"] == "tiny" and run["trial"] == int(tags["mlgate.trial"]) and run["method"] == "coop"
        assert run["acc_hm"] is not None and run["trainable_params"] == 516
    [group] = report["groups"]
    assert group["n_runs"] == 3 and sum(group["verdicts"].values()) == 3
    # The trainer's verdict/* metrics give what the histories give.
    monkeypatch.setattr(Evidence, "from_metrics", classmethod(lambda cls, metrics: None))
    assert compare(["--experiment", "tiny", "--format", "json", "--no-log"]) == 0
    assert json.loads(capsys.readouterr().out) == report


def test_compare_over_http_with_a_postgresql_backed_server(mlflow_server, capsys):
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("remote")
    _log("collapsed-run", {"grad/gap_log10": GAP_COLLAPSED, "gate/drift": [0.001], "gate/mean": [0.5]})
    _log("adaptive-run", {"grad/gap_log10": [0.5], "gate/drift": [0.3], "gate/mean": [0.7]})
    capsys.readouterr()  # MLflow prints run links when logging to a server
    assert compare(["--experiment", "remote", "--tracking-uri", mlflow_server, "--format", "json"]) == 0
    runs = {r["run_name"]: r["verdict"] for r in json.loads(capsys.readouterr().out)["runs"]}
    assert runs == {"collapsed-run": "collapsed", "adaptive-run": "adaptive"}
    client = MlflowClient(mlflow_server)
    [report] = client.search_runs([client.get_experiment_by_name("remote").experiment_id],
                                  "tags.`mlgate.role` = 'report'")
    assert "compare/report.html" in {a.path for a in client.list_artifacts(report.info.run_id, "compare")}


def _synthetic_runs(client, experiment: str, n: int, summaries: bool, steps: int = 10) -> None:
    """``n`` runs as mlgate's trainer logs them (``summaries``: with their verdict's evidence) or as
    another loop would (without), one log_batch each."""
    import random

    from mlflow.entities import Metric, Param

    from mlgate.verdicts import evidence

    rng = random.Random(n)
    experiment_id = client.create_experiment(experiment)
    for i in range(n):
        series = {"grad/gap_log10": [rng.gauss(1.5 + i % 3, 0.5) for _ in range(steps)],
                  "gate/drift": [s * rng.choice((0.0005, 0.02)) for s in range(1, steps + 1)],
                  "gate/mean": [0.5 + rng.gauss(0, 0.01) for _ in range(steps)]}
        if i % 4 == 0:  # a pruning run
            series = {"mask/active_tokens": [64 - 48 * min(1, s / (steps - 2)) for s in range(1, steps + 1)]}
        final = {"acc/hm": rng.uniform(50, 80), "params/trainable": 2052.0}
        if summaries:
            final.update(evidence({k: list(enumerate(v, start=1)) for k, v in series.items()}).as_metrics())
        metrics = [Metric(k, v, 0, s) for k, vs in series.items() for s, v in enumerate(vs, start=1)]
        run = client.create_run(experiment_id, run_name=f"{experiment}-{i}", tags={"mlgate.method": f"m{i % 3}"})
        client.log_batch(run.info.run_id, metrics=metrics + [Metric(k, v, 0, steps) for k, v in final.items()],
                         params=[Param("method.t_target", "16")] if i % 4 == 0 else [])


def test_compare_reads_hundreds_of_runs_in_a_bounded_number_of_store_calls(workdir, monkeypatch):
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from mlgate.compare import build_report
    from mlgate.compare.render import render_html, render_json
    from mlgate.verdicts import Evidence

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    sizes = {"few": 24, "many": 150}  # (the HTML looks for the mask files of at most 6 pruning runs)
    for name, n in sizes.items():
        _synthetic_runs(client, f"{name}-mlgate", n, summaries=True)
        _synthetic_runs(client, f"{name}-foreign", n, summaries=False)

    calls: dict[str, int] = {}
    for name in ("search_runs", "get_metric_history", "get_metric_history_bulk", "get_metric_history_bulk_interval",
                 "get_run"):
        def counted(*args, _name=name, _original=getattr(SqlAlchemyStore, name), **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(SqlAlchemyStore, name, counted)
    statements = []
    count = lambda *args: statements.append(1)  # noqa: E731 - every SQL statement sent to the database
    event.listen(Engine, "before_cursor_execute", count)
    try:
        def read(experiment: str, html: bool = False) -> tuple[int, dict, str]:
            calls.clear(), statements.clear()
            report = build_report(experiment, uri)
            page = render_html(report, MlflowClient(uri)) if html else ""
            return len(statements), dict(calls), render_json(report) + page

        for kind in ("mlgate", "foreign"):
            few, many = read(f"few-{kind}"), read(f"many-{kind}")
            assert few[0] == many[0], kind  # as many statements for 150 runs as for 24
            assert many[1].get("get_metric_history", 0) == 0 and many[1]["search_runs"] == 1
        assert read("many-mlgate")[1].keys() == {"search_runs"}  # their evidence comes with the search
        html_few, html_many = read("few-mlgate", html=True), read("many-mlgate", html=True)
        assert html_few[0] == html_many[0]  # the HTML's curves: histories in bulk too
    finally:
        event.remove(Engine, "before_cursor_execute", count)

    # Judged from their verdict/* metrics, mlgate's runs come out as judged from their histories.
    with_summaries = read("many-mlgate", html=True)[2]
    monkeypatch.setattr(Evidence, "from_metrics", classmethod(lambda cls, metrics: None))
    assert read("many-mlgate", html=True)[2] == with_summaries
    assert len(json.loads(with_summaries.split("<!doctype")[0])["runs"]) == sizes["many"]
