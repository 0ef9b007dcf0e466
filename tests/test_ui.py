"""What users see: the MLflow UI over a short study's store, in headless Chromium (Debian's package,
driven by Playwright). Screenshots land in the test's folder (or $MLGATE_SCREENSHOTS)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mlgate.cli import main
from tests.conftest import start_mlflow_server, stop
from tests.test_study import runs_of

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


def test_study_and_trial_runs_render_in_the_mlflow_ui(workdir, write_spec, browser):
    write_spec(study={"n_trials": 2}, train={"steps": 30, "eval_interval": 10})
    assert main(["run", "tiny"]) == 0
    client, [study], trials = runs_of("tiny")
    experiment = study.info.experiment_id
    shots = Path(os.environ.get("MLGATE_SCREENSHOTS") or workdir / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    server, url = start_mlflow_server(workdir, f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        # The study run: its note and its child runs.
        page.goto(f"{url}/#/experiments/{experiment}/runs/{study.info.run_id}")
        page.get_by_text("Child runs", exact=True).wait_for(timeout=60_000)
        for trial in trials:
            page.get_by_text(trial.info.run_name).first.wait_for(timeout=30_000)
        assert "mlgate study" in page.inner_text("body")
        page.screenshot(path=str(shots / "study_run.png"))
        # A trial run: metric charts of the vocabulary, drawn.
        trial = trials[0]
        page.goto(f"{url}/#/experiments/{experiment}/runs/{trial.info.run_id}/model-metrics")
        page.get_by_text(f"{trial.info.run_name} (acc/hm)").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        body = page.inner_text("body")
        for section in ("gate", "grad", "loss", "acc"):
            assert section in body
        assert page.locator("svg.main-svg").count() >= 2
        page.screenshot(path=str(shots / "trial_metrics.png"))
        # Its image artifacts, displayed.
        for artifact in ("plots/gradient_gap.png", "gates/trajectory.png"):
            page.goto(f"{url}/#/experiments/{experiment}/runs/{trial.info.run_id}/artifacts/{artifact}")
            image = page.locator("img[src^='blob:']").first
            image.wait_for(timeout=60_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=image.element_handle())
        page.screenshot(path=str(shots / "trial_artifact.png"))
    finally:
        stop(server)
    assert all((shots / name).stat().st_size > 10_000 for name in ("study_run.png", "trial_metrics.png",
                                                                    "trial_artifact.png"))
