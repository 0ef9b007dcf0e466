"""``python -m mlgate.compare --experiment NAME``: collapse versus pruning across an experiment's runs.

Reads every run through the MLflow API (any tracking URI), judges each by mlgate's verdict rule
(docs/verdicts.md) from its logged evidence or its metric histories, groups them by method, and
renders a terminal table, markdown, CSV, JSON or a self-contained HTML report; the report is also
logged as artifacts of a ``mlgate.role=report`` run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from mlflow.tracking import MlflowClient

from mlgate import pipes
from mlgate.compare.collect import RunSummary, collect_runs
from mlgate.compare.render import render_csv, render_html, render_json, render_markdown, render_table
from mlgate.compare.report import Report
from mlgate.errors import MlgateError
from mlgate.tracking.runs import resolve_tracking_uri, tracking_client, ui_base, ui_link
from mlgate.verdicts import Thresholds

FORMATS = ("table", "markdown", "csv", "json", "html")
FILES = {"markdown": "report.md", "csv": "runs.csv", "json": "report.json", "html": "report.html"}
RANKABLE = ("acc_hm", "acc_base", "acc_novel", "grad_gap_log10", "gate_drift", "effective_length",
            "active_tokens", "trainable_params")

__all__ = ["Report", "RunSummary", "build_report", "main"]


def build_report(experiment: str, tracking_uri: str | None = None, thresholds: Thresholds = Thresholds(),
                 study: str | None = None, states: set[str] | None = None, rank_by: str = "acc_hm") -> Report:
    """The comparison report of one experiment (what ``main`` renders), with its link into the MLflow UI."""
    client = tracking_client(tracking_uri)
    runs = collect_runs(client, experiment, thresholds, study, states)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    ui = ui_link(experiment_id, base=ui_base(resolve_tracking_uri(tracking_uri)))
    return Report(experiment, runs, rank_by, ui)


def _log_report(client: MlflowClient, experiment: str, folder: Path) -> str:
    # One report run per experiment, refreshed by each compare (artifacts overwrite in place).
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], "tags.`mlgate.role` = 'report'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(exp.experiment_id, run_name=f"{experiment}-compare",
                                   tags={"mlgate.role": "report"}).info.run_id
    client.log_artifacts(run_id, str(folder), "compare")
    client.set_terminated(run_id)
    return run_id


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlgate.compare", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--format", choices=FORMATS, default="table", help="what to print (default: table)")
    p.add_argument("--output", type=Path, help="write report.md, runs.csv, report.json and report.html here")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    p.add_argument("--study", help="only runs of this study (tag mlgate.study)")
    p.add_argument("--state", action="append", choices=("COMPLETE", "PRUNED", "FAIL", "RUNNING"),
                   help="only runs in this state (repeatable)")
    p.add_argument("--rank-by", choices=RANKABLE, default="acc_hm", help="order of the runs table")
    defaults = Thresholds()
    p.add_argument("--gap", type=float, default=defaults.gap_log10,
                   help="collapse: the median gradient gap (log10) of the second half at least this")
    p.add_argument("--drift", type=float, default=defaults.drift, help="collapse: final gate drift below this")
    p.add_argument("--input-std", "--batch-std", dest="input_std", type=float, default=defaults.input_std,
                   help="collapse: final gate input std (else batch std) below this")
    p.add_argument("--stillness", type=float, default=defaults.stillness,
                   help="collapse: gate drift and mean changed less than this from the middle to the end")
    return p


@pipes.quiet_when_reader_leaves
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _compare(args)
    except MlgateError as exc:
        print(f"mlgate.compare: {exc}", file=sys.stderr)
        return exc.exit_code


def _compare(args: argparse.Namespace) -> int:
    thresholds = Thresholds(gap_log10=args.gap, drift=args.drift, input_std=args.input_std, stillness=args.stillness)
    report = build_report(args.experiment, args.tracking_uri, thresholds, args.study,
                          set(args.state) if args.state else None, args.rank_by)
    client = tracking_client(args.tracking_uri)
    renderers = {"markdown": render_markdown, "csv": render_csv, "json": render_json,
                 "html": lambda r: render_html(r, client, thresholds.gap_log10)}
    # The files and the report run are written even when the reader has left early (`| head -1`).
    read = pipes.write(render_table(report) if args.format == "table" else renderers[args.format](report))
    code = 0 if read else pipes.READER_LEFT
    if args.output is None and args.no_log:
        return code
    with tempfile.TemporaryDirectory(prefix="mlgate-compare-") as tmp:
        folder = args.output or Path(tmp)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for fmt_name, filename in FILES.items():
                (folder / filename).write_text(renderers[fmt_name](report))
        except OSError as exc:
            raise MlgateError(f"--output {folder}: {exc.strerror or exc}.") from None
        if not args.no_log:
            with contextlib.redirect_stdout(sys.stderr):  # MLflow prints run links; stdout is the report
                run_id = _log_report(client, args.experiment, folder)
            pipes.write(f"report logged to run {run_id} (artifacts compare/)\n", sys.stderr)
    return code
