"""``python -m mlgate.compare`` over an experiment of many runs: seconds to build its report.

    python benchmarks/compare_scale.py [--runs 1000] [--steps 100] [--db PATH] [--repeats 3] [--html]

Builds (once; kept at ``--db``, a SQLite MLflow store) two experiments of ``--runs`` runs each, every
run with ``--steps`` steps of ``grad/gap_log10``, ``gate/drift``, ``gate/mean`` and ``loss/total`` and
final accuracies: ``mlgate``, whose runs also carry their verdict's evidence (``verdict/*``, as
mlgate's trainer logs it), and ``foreign``, whose runs do not (another loop's). Then times
``build_report`` plus the JSON rendering of each (``--html``: the HTML page too, which plots the
histories), in this process, ``--repeats`` times alternating, and prints each time and the medians.

The store is built with this checkout's mlgate; the timing needs only ``mlgate.compare`` and so runs
with another revision's too (``PYTHONPATH=<its checkout> python benchmarks/compare_scale.py --db ...``).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

EXPERIMENTS = ("mlgate", "foreign")


def build(uri: str, runs: int, steps: int) -> None:
    """Both experiments of ``runs`` runs of ``steps`` steps, logged with one ``log_batch`` per run."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from mlgate.verdicts import evidence

    client = MlflowClient(uri)
    rng = random.Random(0)
    for name in EXPERIMENTS:
        experiment = client.create_experiment(name)
        for i in range(runs):
            gap = [rng.gauss(1.0 + 2.0 * (i % 3 == 0), 0.5) for _ in range(steps)]
            drift = [min(1.0, s * (0.0005 if i % 2 else 0.01) * rng.uniform(0.5, 1.5)) for s in range(1, steps + 1)]
            mean = [0.5 + d / 2 for d in drift]
            loss = [2.0 * math.exp(-s / steps) for s in range(1, steps + 1)]
            series = {"grad/gap_log10": gap, "gate/drift": drift, "gate/mean": mean, "loss/total": loss}
            metrics = [Metric(k, v, 0, s) for k, values in series.items() for s, v in enumerate(values, start=1)]
            final = {"acc/base": rng.uniform(60, 80), "acc/novel": rng.uniform(50, 70), "params/trainable": 2052.0}
            final["acc/hm"] = 2 * final["acc/base"] * final["acc/novel"] / (final["acc/base"] + final["acc/novel"])
            if name == "mlgate":
                history = {k: list(enumerate(v, start=1)) for k, v in series.items()}
                final.update(evidence(history).as_metrics())
            metrics += [Metric(k, v, 0, steps) for k, v in final.items()]
            run = client.create_run(experiment, run_name=f"{name}-{i:05d}",
                                    tags={"mlgate.method": ("coop", "maple", "bimaple")[i % 3]})
            client.log_batch(run.info.run_id, metrics=metrics, params=[Param("train.steps", str(steps))],
                             tags=[RunTag("mlgate.state", "COMPLETE")])
            client.set_terminated(run.info.run_id)


def time_compare(uri: str, experiment: str, html: bool) -> float:
    from mlflow.tracking import MlflowClient

    from mlgate.compare import build_report
    from mlgate.compare.render import render_html, render_json

    start = time.perf_counter()
    report = build_report(experiment, uri)
    render_json(report)
    if html:
        render_html(report, MlflowClient(uri))
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--db", type=Path, help="the SQLite store (built when missing); default in /tmp")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--html", action="store_true", help="render the HTML report too (it plots the histories)")
    args = p.parse_args()
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    db = args.db or Path(f"/tmp/mlgate-compare-{args.runs}x{args.steps}.db")
    uri = f"sqlite:///{db.resolve()}"
    if not db.exists():
        start = time.perf_counter()
        build(uri, args.runs, args.steps)
        print(f"built {db} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    time_compare(uri, EXPERIMENTS[0], False)  # imports and the store's connection: warm
    times: dict[str, list[float]] = {name: [] for name in EXPERIMENTS}
    for r in range(args.repeats):
        for name in EXPERIMENTS if r % 2 == 0 else EXPERIMENTS[::-1]:
            times[name].append(time_compare(uri, name, args.html))
            print(f"repeat {r}: {name} {times[name][-1]:.2f} s", flush=True)
    for name, values in times.items():
        print(f"{name}: {args.runs} runs of {args.steps} steps in {statistics.median(values):.2f} s "
              f"(range {min(values):.2f}–{max(values):.2f}, {args.repeats} repeats{', with HTML' if args.html else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
