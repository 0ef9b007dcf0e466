"""What users see: the MLflow UI over a short study's store, in headless Chromium (Debian's package,
driven by Playwright). Screenshots land in the test's folder (or $MLGATE_SCREENSHOTS)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from mlgate.cli import main
from mlgate.tracking.runs import MLFLOW_UI, ui_link
from tests.conftest import start_mlflow_server, stop
from tests.test_studies_in_mlflow import runs_of

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (test extras)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield b
        finally:
            b.close()


def _close_assistant(page) -> None:
    # The UI's assistant panel opens on a first visit and covers the table's right half.
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def test_the_printed_link_opens_the_training_view_with_trials_nested_under_the_study(workdir, browser, capsys):
    # The default study, shortened: its two baselines and two searched trials.
    assert main(["run", "gradient_balancing", "--trials", "4", "--set", "train.steps=30",
                 "--set", "train.eval_interval=10"]) == 0
    link = re.search(r"MLflow UI, training view: (\S+)", capsys.readouterr().out).group(1)
    client, [study], trials = runs_of("gradient_balancing")
    shots = Path(os.environ.get("MLGATE_SCREENSHOTS") or workdir / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    server, url = start_mlflow_server(workdir, f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 760})
        page.goto(link.replace(MLFLOW_UI, url))
        # The training view: the runs table with the study run, not the GenAI traces view.
        study_row = page.locator(".ag-row").filter(has=page.get_by_role("link", name="gradient_balancing", exact=True))
        study_row.wait_for(timeout=60_000)
        assert page.get_by_text("Detect issues in your traces").count() == 0
        # Its trials are nested under it (shown once it is expanded), each name led by its verdict.
        names = [trial.info.run_name for trial in trials]
        assert all(name.startswith(f"{t.data.tags['mlgate.verdict']} · ") for name, t in zip(names, trials))
        assert any(name.startswith("collapsed · baseline reference · ") for name in names)
        assert page.get_by_role("link", name=names[0], exact=True).count() == 0
        study_row.locator("button[data-component-id*='runnamecellrenderer']").click()
        for name in names:
            page.get_by_role("link", name=name, exact=True).wait_for(timeout=30_000)
        assert page.get_by_text("shapes (").count() == len(trials)  # the Dataset column: each trial's draw
        _close_assistant(page)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "runs_table.png"))
        # The study run (by a link in the training view, as its note's links are): the note names the
        # baselines and their verdicts, the trials are its child runs.
        page.goto(ui_link(study.info.experiment_id, study.info.run_id, url))
        page.get_by_text("Baselines:").first.wait_for(timeout=60_000)
        page.get_by_text("Child runs", exact=True).wait_for(timeout=30_000)
        assert "mlgate study" in page.inner_text("body")
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "study_run.png"))
        # A trial's metric charts of the vocabulary, drawn.
        trial = trials[-1]
        page.goto(ui_link(study.info.experiment_id, f"{trial.info.run_id}/model-metrics", url))
        page.get_by_text(f"{trial.info.run_name} (acc/hm)").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        body = page.inner_text("body")
        for section in ("gate", "grad", "loss", "acc"):
            assert section in body
        assert page.locator("svg.main-svg").count() >= 2
        page.screenshot(path=str(shots / "trial_metrics.png"))
        # Its image artifacts, displayed.
        for artifact in ("plots/gradient_gap.png", "gates/trajectory.png"):
            page.goto(ui_link(study.info.experiment_id, f"{trial.info.run_id}/artifacts/{artifact}", url))
            image = page.locator("img[src^='blob:']").first
            image.wait_for(timeout=60_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=image.element_handle())
    finally:
        stop(server)
    assert all((shots / name).stat().st_size > 10_000 for name in ("runs_table.png", "study_run.png",
                                                                    "trial_metrics.png"))


def test_runs_carry_the_run_context_provider_tags(workdir, write_spec, monkeypatch):
    from mlflow.tracking.context.registry import resolve_tags

    monkeypatch.setenv("MLGATE_CONTEXT", "1")
    tags = resolve_tags()  # through the `mlflow.run_context_provider` entry point
    assert tags["mlgate.version"] and tags["mlgate.device"] and tags["mlgate.torch"] and "mlgate.cuda" in tags
    monkeypatch.delenv("MLGATE_CONTEXT")
    assert "mlgate.version" not in resolve_tags()  # outside mlgate, other runs are left alone
    write_spec(study={"n_trials": 1}, train={"steps": 300, "eval_interval": 150},
               logging={"system_metrics_interval": 0.5})
    assert main(["run", "tiny"]) == 0
    _, [study], [trial] = runs_of("tiny")
    for run in (study, trial):
        assert run.data.tags["mlgate.version"] and run.data.tags["mlgate.torch"]
    assert any(k.startswith("system/") for k in trial.data.metrics)  # MLflow system metrics


def test_line_progress_when_not_a_terminal(workdir, write_spec, capsys):
    write_spec(study={"n_trials": 1}, train={"steps": 6, "eval_interval": 3})
    assert main(["run", "tiny"]) == 0
    err = capsys.readouterr().err
    assert "trial 0: step 3  acc/val=" in err and "verdict=" in err and "trial 0: COMPLETE" in err
    assert "\x1b[" not in err  # no terminal control codes in logs
