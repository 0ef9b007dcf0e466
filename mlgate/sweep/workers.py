"""``mlgate run --workers N``: N worker processes on this machine sharing one study.

The parent opens the study and its MLflow run once (so that the databases are created by one process,
not raced by N), starts N workers (``mlgate run ... --worker i``, one GPU each when there are GPUs),
waits for them, and writes the study summary. Workers on other machines join with the same command
on a shared ``--storage`` and ``--tracking-uri``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import Any, Callable

from mlgate.errors import StudyFailed
from mlgate.config.spec import StudySpec
from mlgate.sweep.study import close_study, open_study
from mlgate.training import preflight


def default_workers() -> int:
    """One worker per visible GPU, or 1 without GPUs."""
    import torch

    return max(1, torch.cuda.device_count())


def _worker_command(spec_source: str, args: argparse.Namespace, tracking_uri: str, storage: str | None,
                    index: int) -> list[str]:
    cmd = [sys.executable, "-m", "mlgate", "run", spec_source, "--tracking-uri", tracking_uri,
           "--workers", "1", "--worker", str(index)]
    if storage:
        cmd += ["--storage", storage]
    for text in args.set or []:
        cmd += ["--set", text]
    if args.overrides:
        cmd += ["--overrides", args.overrides]
    if args.trials is not None:
        cmd += ["--trials", str(args.trials)]
    return cmd


def run_workers(spec: StudySpec, args: argparse.Namespace, n: int, echo: Callable[[str], None]) -> dict[str, Any]:
    """Run ``n`` worker processes on the study and return its summary once they are done."""
    import torch

    preflight(spec)
    study, tracker = open_study(spec, args.tracking_uri, args.storage)
    gpus = torch.cuda.device_count()
    echo(f"study {spec.name}: {n} workers" + (f" on {gpus} GPUs" if gpus else ""))
    procs = []
    for i in range(n):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        procs.append(subprocess.Popen(_worker_command(args.study, args, tracker.tracking_uri, args.storage, i + 1),
                                      env=env))
    status = "FINISHED"
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        status = "KILLED"
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        raise
    finally:
        if status == "FINISHED" and any(codes):
            status = "FAILED"
        summary = close_study(study, tracker, spec, status)
    if status == "FAILED":
        raise StudyFailed(f"study {spec.name}: worker exit codes {codes}; see their messages above.")
    return summary
