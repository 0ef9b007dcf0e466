"""``mlgate`` command line (contract §1). ``python -m mlgate`` is the same program.

Bad input exits 2 with one readable paragraph on stderr; a study that cannot finish exits 1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Callable, Sequence

from mlgate.errors import MlgateError, StudyFailed


def _trials(text: str) -> int | None:
    # MLproject passes -P trials="" when the user gives none: keep the spec's count then.
    if text.strip() == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--trials takes a whole number >= 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--trials takes a whole number >= 1, not {value}")
    return value


def _overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.set or [])
    if getattr(args, "overrides", None):
        sets += shlex.split(args.overrides)
    if getattr(args, "trials", None) is not None:
        sets.append(f"study.n_trials={args.trials}")
    return sets


def cmd_run(args: argparse.Namespace) -> int:
    from mlgate.spec import load_spec
    from mlgate.study import run_study

    spec = load_spec(args.study, _overrides(args))
    if args.workers != 1:
        raise MlgateError("--workers: this build runs one worker per command; start the same command in "
                          "several terminals on a shared --storage to run workers in parallel.")
    summary = run_study(spec, tracking_uri=args.tracking_uri, storage=args.storage,
                        echo=lambda line: print(line, file=sys.stderr, flush=True))
    best = summary.get("best")
    counts = ", ".join(f"{v} {k.lower()}" for k, v in summary["counts"].items())
    print(f"study {spec.name}: done ({counts})" + (
        f"; best trial {best['trial']} {spec.study.objective}={best['value']:.4g}" if best else ""))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from mlgate.spec import load_spec

    failed = 0
    for study in args.study:
        try:
            spec = load_spec(study, list(args.set or []))
        except MlgateError as exc:
            print(str(exc), file=sys.stderr)
            failed += 1
            continue
        print(f"{study}: valid ({spec.study.n_trials} trials of {spec.method.name}, "
              f"{len(spec.search)} searched settings)")
    return 2 if failed else 0


def cmd_list(args: argparse.Namespace) -> int:
    import yaml

    from mlgate.spec import list_studies

    for path in list_studies():
        name = path.stem
        try:
            data = yaml.safe_load(path.read_text()) or {}
            text = " ".join(str(data.get("description", "")).split())
        except yaml.YAMLError:
            text = "(invalid YAML: run `mlgate validate`)"
        print(f"{name:<24} {text}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from mlgate.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from mlgate.describe import describe

    info = describe(args.method, args.backbone, list(args.set or []), args.classes)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['method']} on {info['backbone']} ({info['classes']} classes)")
    print(f"  trainable parameters: {info['trainable_params']:,}")
    for group, count in info["params_by_group"].items():
        print(f"    {group:<10} {count:>12,}")
    print(f"  inference GFLOPs per image: {info['gflops_per_image']:.4g}"
          f" (+ {info['gflops_once']:.4g} once for the class prompts)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlgate", description=__doc__.splitlines()[0])
    from mlgate import __version__

    parser.add_argument("--version", action="version", version=f"mlgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run or resume a study")
    run.add_argument("study", help="study name from studies/ (without .yaml) or a YAML path")
    run.add_argument("--trials", type=_trials, help="total finished trials (sets study.n_trials)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec setting (repeatable)")
    run.add_argument("--overrides", help=argparse.SUPPRESS)  # MLproject: "KEY=VALUE KEY=VALUE"
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    run.add_argument("--storage", help="Optuna storage URL (default: a journal file beside the MLflow db)")
    run.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check spec files without running anything")
    val.add_argument("study", nargs="+")
    val.add_argument("--set", action="append", metavar="KEY=VALUE")
    val.set_defaults(func=cmd_validate)

    desc = sub.add_parser("describe", help="trainable parameters and inference GFLOPs of a method")
    desc.add_argument("method")
    desc.add_argument("--backbone", default="mlgate-tiny", help="open_clip model name (random init)")
    desc.add_argument("--set", action="append", metavar="method.KEY=VALUE")
    desc.add_argument("--classes", type=int, default=10, help="number of classes scored (default 10)")
    desc.add_argument("--json", action="store_true", help="one JSON object on stdout")
    desc.set_defaults(func=cmd_describe)

    sub.add_parser("list", help="the studies in studies/").set_defaults(func=cmd_list)
    sub.add_parser("schema", help="JSON Schema of a study spec").set_defaults(func=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlgate`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MlgateError as exc:
        print(f"mlgate: {exc}", file=sys.stderr)
        return exc.exit_code
    except StudyFailed as exc:
        print(f"mlgate: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mlgate: interrupted; the running trial was closed. Run the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
