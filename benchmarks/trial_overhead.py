"""What a sweep pays per trial beyond its steps: a study of N trials against a study of 1, in one process.

    python benchmarks/trial_overhead.py [--study gradient_balancing] [--trials 16] [--steps 2] \
        [--repeats 3] [--threads N] [--set KEY=VALUE ...] [--profile OUT.prof]

Each repeat runs the study twice into a fresh MLflow store (and its Optuna journal), once with 1 trial and
once with N (the order alternates between repeats), each to its end (the study run's summary and
plots included). The marginal cost of a trial is (time of N − time of 1) / (N − 1); at 2 steps a
trial's steps cost little, so that is nearly all the work around them (data, method, MLflow run,
plots, artifacts). Printed: each repeat's times and marginal cost, then their median and range, in
wall time and in CPU time (this process and the metric sender process together), the figure that
other processes on a shared machine disturb least.
``--threads`` sets torch's CPU threads: where other processes keep the cores busy, two threads that
wait on each other at every op make the steps, not the work around them, most of what is measured.
``--profile`` writes a cProfile of one extra N-trial study.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


SENDER_CPU: list[float] = []


def _record_sender_cpu() -> None:
    # The metric sender is a process of its own: its CPU time, read as the study closes it.
    from mlgate.tracking.runs import StudyTracker

    close = StudyTracker.close

    def recording_close(self) -> None:
        if self._sender is not None:
            SENDER_CPU.append(self._sender.cpu_seconds())
        close(self)

    StudyTracker.close = recording_close


def run_once(study: str, trials: int, steps: int, sets: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process and the metric sender) of one whole study of
    ``trials`` trials at ``steps`` steps, in a fresh store."""
    from mlgate.config import load_spec
    from mlgate.sweep import run_study

    spec = load_spec(study, [f"study.n_trials={trials}", f"train.steps={steps}", *sets])
    with tempfile.TemporaryDirectory(prefix="mlgate-overhead-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        start, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):
            run_study(spec, tracking_uri=uri, progress=_quiet(trials))
        return time.perf_counter() - start, time.process_time() - cpu + SENDER_CPU[-1]


def _quiet(n: int):
    # A line-mode Progress that prints nothing (the timed studies' lines would bury the results).
    from mlgate.progress import Progress

    class Quiet(Progress):
        def echo(self, line: str) -> None:
            """Prints nothing."""

    return Quiet(n, live=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default="gradient_balancing")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--set", action="append", default=[], help="spec override, as mlgate run --set")
    p.add_argument("--profile", type=Path, help="write a cProfile of one more N-trial study here")
    args = p.parse_args()
    os.environ.setdefault("MLGATE_CACHE_DIR", tempfile.mkdtemp(prefix="mlgate-cache-"))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    _record_sender_cpu()
    run_once(args.study, 1, args.steps, args.set)  # imports, compiled kernels, on-disk caches: warm
    wall, cpu = [], []
    for r in range(args.repeats):
        order = (1, args.trials) if r % 2 == 0 else (args.trials, 1)
        times = {n: run_once(args.study, n, args.steps, args.set) for n in order}
        (w1, c1), (wn, cn) = times[1], times[args.trials]
        wall.append((wn - w1) / (args.trials - 1))
        cpu.append((cn - c1) / (args.trials - 1))
        print(f"repeat {r}: 1 trial {w1:.2f} s ({c1:.2f} s CPU), {args.trials} trials {wn:.2f} s ({cn:.2f} s CPU); "
              f"marginal {wall[-1]:.3f} s/trial ({cpu[-1]:.3f} s CPU)", flush=True)
    for name, values in (("wall", wall), ("CPU", cpu)):
        print(f"marginal {name} time of a {args.steps}-step trial: median {statistics.median(values):.3f} s "
              f"(range {min(values):.3f}–{max(values):.3f}, {args.repeats} repeats)")
    if args.profile:
        import cProfile

        with cProfile.Profile() as prof:
            run_once(args.study, args.trials, args.steps, args.set)
        prof.dump_stats(args.profile)
        print(f"profile: {args.profile}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
