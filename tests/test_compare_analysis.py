"""What compare adds beyond counting: intervals, gains against the matched ungated baseline, which
sampled settings decide collapse, Tables II and III; on runs mlgate trained and on foreign ones."""

from __future__ import annotations

import json

import mlflow
import pytest
import yaml

from mlgate.cli import main as mlgate_main
from mlgate.compare import main as compare
from mlgate.compare.stats import gain, importance, mean_interval
from tests.conftest import TINY, deep_update


def test_intervals_and_gains_by_the_bootstrap():
    low, high = mean_interval([60.0, 61.0, 62.0, 63.0, 64.0])
    assert low < 62.0 < high and 60.0 <= low and high <= 64.0
    assert mean_interval([70.0]) is None  # one run: no interval
    assert mean_interval([5.0, 5.0]) == [5.0, 5.0]
    clear = gain([70.0, 71.0, 72.0], [60.0, 61.0, 59.0])
    assert clear["mean"] == pytest.approx(11.0) and clear["distinguishable"] is True and clear["ci"][0] > 0
    overlap = gain([60.0, 62.0, 61.0], [61.0, 60.5, 61.5])
    assert overlap["distinguishable"] is False and overlap["ci"][0] < 0 < overlap["ci"][1]
    assert gain([60.0], [61.0, 62.0]) == {"mean": -1.5, "ci": None, "distinguishable": None}
    assert gain([], [61.0]) is None


def test_importance_finds_the_setting_that_decides():
    params = [{"lr": str(1.0 + i), "optimizer": "sgd" if i % 2 else "adamw", "unused": "x"} for i in range(24)]
    collapsed = [float(float(p["lr"]) < 12) for p in params]  # lr alone decides
    scores = importance(params, collapsed)
    assert set(scores) == {"lr", "optimizer"}  # a setting that never varies is no candidate
    assert sum(scores.values()) == pytest.approx(1.0) and scores["lr"] > 0.8
    assert importance(params, [1.0] * 24) == {}  # one outcome: nothing decides it


@pytest.fixture
def small_study(workdir):
    spec = deep_update(TINY, {"study": {"n_trials": 6, "sampler": {"type": "grid", "seed": 0}},
                              "train": {"steps": 6, "eval_interval": 3}, "search": {}})
    spec["variants"] = {"CoOp": {"method": {"name": "coop", "gate": {"enabled": False}}},
                        "CoOp-gating": {"method": {"name": "coop", "gate": {"enabled": True}}}}
    spec["search"] = {"variant": {"type": "categorical", "choices": ["CoOp", "CoOp-gating"]},
                      "data.seed": {"type": "categorical", "choices": [1, 2, 3]}}
    (workdir / "factors.yaml").write_text(yaml.safe_dump(spec))
    assert mlgate_main(["run", str(workdir / "factors.yaml")]) == 0


def test_a_study_reports_importances_intervals_and_both_tables(small_study, capsys):
    capsys.readouterr()
    assert compare(["--experiment", "factors", "--format", "json", "--no-log"]) == 0
    report = json.loads(capsys.readouterr().out)
    [group] = report["groups"]
    assert group["method"] == "coop" and len(group["acc_hm_ci"]) == 2
    gained = group["gain_vs_baseline"]
    assert gained["baseline"] == "coop" and len(gained["ci"]) == 2
    assert gained["distinguishable"] == (not gained["ci"][0] <= 0 <= gained["ci"][1])
    gated = [r for r in report["runs"] if r["verdict"] in ("collapsed", "adaptive")]
    ungated = [r for r in report["runs"] if r["verdict"] == "static"]
    assert len(gated) == len(ungated) == 3
    assert gained["mean"] == pytest.approx(sum(r["acc_hm"] for r in gated) / 3 - sum(r["acc_hm"] for r in ungated) / 3)
    assert set(report["importance"]) == {"verdict", "acc_hm"}
    assert set(report["importance"]["verdict"]) <= {"variant", "data.seed"}
    assert sum(report["importance"]["verdict"].values()) == pytest.approx(1.0)
    for run in report["runs"]:
        assert run["repr_alignment"] is not None and run["repr_separation"] is not None
        assert set(run["sampled"]) == {"variant", "data.seed"}
        assert (run["acc_gates"] is not None) == (run in gated)
    assert [row["method"] for row in report["representation"]] == ["coop"]
    [strategies] = report["gate_strategies"]
    assert set(strategies) >= {"fixed", "random", "per_layer", "per_token"}
    assert compare(["--experiment", "factors", "--no-log"]) == 0
    table = capsys.readouterr().out
    for heading in ("What decides the verdict", "Representation quality (Table III)", "Table II", "HM 95% CI"):
        assert heading in table
    assert compare(["--experiment", "factors", "--format", "markdown", "--no-log"]) == 0
    assert "## What decides the verdict" in capsys.readouterr().out


def test_the_html_report_shows_them_in_a_browser(small_study, workdir, capsys):
    playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (test extras)")
    import shutil

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no Chromium (Debian's: apt-get install chromium)")
    assert compare(["--experiment", "factors", "--output", str(workdir / "report"), "--no-log"]) == 0
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto((workdir / "report" / "report.html").as_uri())
        headings = page.locator("h2").all_inner_texts()
        for wanted in ("What decides the verdict", "Representation quality (Table III)", "Gate strategies"):
            assert any(h.startswith(wanted) for h in headings), headings
        captions = page.locator("figcaption").all_inner_texts()
        assert any(c.startswith("Phase map") for c in captions) and "HM accuracy with 95% intervals" in captions
        widths = page.locator("img").evaluate_all("images => images.map(i => i.naturalWidth)")
        assert widths and all(w > 100 for w in widths)  # every plot decoded and drawn
        browser.close()


def test_foreign_runs_with_the_base_vocabulary_compare_with_the_sections_explained(workdir, capsys):
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow.set_experiment("foreign")
    for name, drift, hm in (("a", 0.001, 70.0), ("b", 0.3, 71.0)):
        with mlflow.start_run(run_name=name):
            mlflow.log_params({"lr": "0.01"})
            mlflow.log_metrics({"gate/drift": drift, "gate/mean": 0.5, "acc/hm": hm})
    capsys.readouterr()
    assert compare(["--experiment", "foreign", "--format", "json", "--no-log"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["importance"] == {} and report["representation"] == [] and report["gate_strategies"] == []
    assert all(r["repr_alignment"] is None and r["acc_gates"] is None for r in report["runs"])
    assert any("What decides the verdict: no run sampled" in n for n in report["notes"])
    assert any("Table III" in n for n in report["notes"]) and any("Table II" in n for n in report["notes"])
    assert compare(["--experiment", "foreign", "--no-log"]) == 0
    assert "no run logs repr/alignment" in capsys.readouterr().out
