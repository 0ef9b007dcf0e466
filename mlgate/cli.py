"""The ``mlgate`` command line. ``python -m mlgate`` is the same program.

Bad input exits 2 with one readable paragraph on stderr; a study that cannot finish exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import TYPE_CHECKING, Callable, Sequence

from mlgate import pipes
from mlgate.errors import MlgateError, StudyFailed

if TYPE_CHECKING:  # torch-heavy modules load lazily, so `mlgate --help` stays fast
    from mlgate.data.images import ImageNorm
    from mlgate.data import FewShotData


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number >= 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number >= 1, not {value}")
    return value


def _trials(text: str) -> int | None:
    # MLproject passes -P trials="" when the user gives none: keep the spec's count then.
    return None if text.strip() == "" else _positive(text)


def _overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.set or [])
    if getattr(args, "overrides", None):
        sets += shlex.split(args.overrides)
    if getattr(args, "trials", None) is not None:
        sets.append(f"study.n_trials={args.trials}")
    return sets


def _echo(prefix: str = "") -> Callable[[str], None]:
    return lambda line: pipes.write(prefix + line + "\n", sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from mlgate.progress import Progress
    from mlgate.config import load_spec
    from mlgate.sweep import run_study
    from mlgate.sweep.workers import default_workers, run_workers

    spec = load_spec(args.study, _overrides(args))
    workers = default_workers() if args.workers is None else args.workers
    if workers < 1:
        raise MlgateError(f"--workers: takes a whole number >= 1, not {workers}.")
    if workers > 1:
        summary = run_workers(spec, args, workers, _echo())
    else:
        # Workers of --workers write lines (several live bars on one terminal would garble it).
        progress = Progress(spec.study.n_trials, prefix=f"[worker {args.worker}] " if args.worker else "",
                            live=False if args.worker else None)
        summary = run_study(spec, tracking_uri=args.tracking_uri, storage=args.storage, progress=progress,
                            close=not args.worker)
        if args.worker:
            return 0
    from mlgate.tracking.runs import redact, resolve_tracking_uri, ui_base, ui_link

    best = summary.get("best")
    counts = ", ".join(f"{v} {k.lower()}" for k, v in summary["counts"].items())
    print(f"study {spec.name}: done ({counts})" + (
        f"; best trial {best['trial']} {spec.study.objective}={best['value']:.4g}" if best else ""))
    uri = resolve_tracking_uri(args.tracking_uri)
    print(f"MLflow UI, training view: {ui_link(summary['experiment_id'], base=ui_base(uri))}")
    if not uri.startswith(("http://", "https://")):
        print(f"  (serve it first: mlflow ui --backend-store-uri {redact(uri)})")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from mlgate.config import load_spec

    failed = 0
    for study in args.study:
        try:
            spec = load_spec(study, list(args.set or []))
        except MlgateError as exc:
            print(str(exc), file=sys.stderr)
            failed += 1
            continue
        what = f"variants {', '.join(spec.variants)}" if spec.variants else spec.method.name
        print(f"{study}: valid ({spec.study.n_trials} trials of {what}, {len(spec.search)} searched settings)")
    return 2 if failed else 0


def cmd_list(args: argparse.Namespace) -> int:
    import yaml

    from mlgate.config import list_studies, study_name

    for path in list_studies():
        name = study_name(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
            text = " ".join(str(data.get("description", "")).split())
        except yaml.YAMLError:
            text = "(invalid YAML: run `mlgate validate`)"
        print(f"{name:<30} {text}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from mlgate.config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from mlgate.methods.describe import describe

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


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    # The dataset options `eval` and `data summary` share (the data section of a spec).
    parser.add_argument("--data", default="shapes", help="dataset name")
    parser.add_argument("--root", help="folder holding the dataset's own folder")
    parser.add_argument("--source", choices=["coop", "torchvision"], default="coop",
                        help="layout under --root: CoOp's (split_zhou JSON) or torchvision's")
    parser.add_argument("--download", action="store_true", help="with --source torchvision: download into --root")
    parser.add_argument("--shots", type=_positive, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")


def _load_data(args: argparse.Namespace, norm: ImageNorm) -> FewShotData:
    from mlgate.data import load_dataset

    if args.download and args.source != "torchvision":
        raise MlgateError("--download needs --source torchvision (the CoOp layout is prepared by hand).")
    return load_dataset(args.data, args.shots, args.seed, norm, root=args.root, source=args.source,
                        download=args.download)


def cmd_eval(args: argparse.Namespace) -> int:
    from mlgate.model import load_backbone
    from mlgate.training.step import resolve_device
    from mlgate.model.zeroshot import evaluate_zero_shot

    clip = load_backbone(args.backbone, args.pretrained, resolve_device("auto"))
    data = _load_data(args, clip.image_norm)
    result = evaluate_zero_shot(clip, data, data.template)
    if args.json:
        print(json.dumps({"backbone": args.backbone, "data": args.data, **result}))
    else:
        novel = "—" if result["acc_novel"] is None else f"{result['acc_novel']:.2f}"
        print(f"zero-shot {args.backbone} on {args.data}: base {result['acc_base']:.2f}%  novel {novel}%  "
              f"HM {result['acc_hm']:.2f}%")
    return 0


def cmd_data_summary(args: argparse.Namespace) -> int:
    from mlgate.data.images import ImageNorm

    data = _load_data(args, ImageNorm(32, (0.5,) * 3, (0.5,) * 3))
    summary = data.summary()
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{summary['dataset']}: {summary['n_classes']} classes, {args.shots} shots, seed {args.seed}")
    print(f"  base ({len(summary['base_classes'])}): {', '.join(summary['base_classes'])}")
    print(f"  novel ({len(summary['novel_classes'])}): {', '.join(summary['novel_classes'])}")
    print("  images: " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mlgate.bench import CONFIGS, bench

    if min(args.classes, args.batch, args.steps, args.rounds, args.name_words,
           1 if args.diagnostics_every is None else args.diagnostics_every) < 1:
        raise MlgateError("--classes, --batch, --steps, --rounds, --name-words and --diagnostics-every take "
                          "whole numbers >= 1.")
    configs = tuple(c.strip() for c in args.configs.split(",")) if args.configs else CONFIGS
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise MlgateError(f"--configs: unknown {', '.join(unknown)}; valid: {', '.join(CONFIGS)}.")
    result = bench(args.method, args.backbone, args.classes, args.batch, args.steps, args.warmup,
                   list(args.set or []), args.device, rounds=args.rounds, configs=configs, name_words=args.name_words,
                   compile=args.compile, diagnostics_every=args.diagnostics_every)
    if args.json:
        print(json.dumps(result))
        return 0
    mode = result["compile"]
    settings = "" if not mode else ", mlgate compiled" + (f" ({mode})" if isinstance(mode, str) else "")
    settings += f", diagnostics every {result['diagnostics_every']} steps"
    print(f"{result['method']} on {result['backbone']} ({result['device']}, {result['classes']} classes, "
          f"batch {result['batch']}, median of {result['rounds']} passes of {result['steps']} steps{settings})")
    print(f"  {'configuration':<20} {'steps/s':>10} {'images/s':>10} {'GPU peak MB':>12} {'host step MB':>13}")
    memory = result["peak_memory_mb"]
    for name in configs:
        print(f"  {name:<20} {result['steps_per_s'][name]:>10.2f} {result['images_per_s'][name]:>10.1f} "
              f"{memory['gpu'][name]:>12.0f} {memory['host_step'][name]:>13.0f}")
    r = {k: v for k, v in result["ratios"].items() if v is not None}
    parts = [f"speed-up vs reference {r['speedup_vs_reference']:.1f}x" if "speedup_vs_reference" in r else "",
             f"diagnostics overhead {100 * r['diagnostics_overhead']:+.1f}%" if "diagnostics_overhead" in r else "",
             f"logging overhead {100 * r['logging_overhead']:+.1f}%" if "logging_overhead" in r else "",
             f"metric sender CPU {100 * r['logging_cpu']:.0f}% of a step" if "logging_cpu" in r else "",
             f"host peak {memory['host']:.0f} MB"]
    print("  " + "; ".join(p for p in parts if p))
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
    run.add_argument("--workers", type=int, help="worker processes on this machine (default: one per visible "
                     "GPU, or 1); other machines join with the same command on a shared --storage")
    run.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # set by --workers for its children
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check spec files without running anything")
    val.add_argument("study", nargs="+")
    val.add_argument("--set", action="append", metavar="KEY=VALUE")
    val.set_defaults(func=cmd_validate)

    desc = sub.add_parser("describe", help="trainable parameters and inference GFLOPs of a method")
    desc.add_argument("method")
    desc.add_argument("--backbone", default="mlgate-tiny", help="open_clip model name (random init)")
    desc.add_argument("--set", action="append", metavar="method.KEY=VALUE")
    desc.add_argument("--classes", type=_positive, default=10, help="number of classes scored (default 10)")
    desc.add_argument("--json", action="store_true", help="one JSON object on stdout")
    desc.set_defaults(func=cmd_describe)

    ev = sub.add_parser("eval", help="zero-shot accuracy of a backbone on a dataset (base, novel, HM)")
    ev.add_argument("--backbone", default="mlgate-tiny", help="open_clip model name")
    ev.add_argument("--pretrained", default="mlgate", help="pretrained tag or checkpoint path ('mlgate' for the "
                    "embedded weights)")
    _data_arguments(ev)
    ev.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    summ = data_sub.add_parser("summary", help="what the few-shot protocol will use")
    _data_arguments(summ)
    summ.set_defaults(func=cmd_data_summary)

    b = sub.add_parser("bench", help="training-step speed in four configurations, measured in one run")
    b.add_argument("--method", default="coop")
    b.add_argument("--backbone", default="mlgate-tiny", help="open_clip model name (random init)")
    b.add_argument("--classes", type=int, default=10)
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration (host memory is sampled over them)")
    b.add_argument("--rounds", type=int, default=3, help="round-robin timed passes per configuration "
                   "(steps/s from the median pass, ratios from the median of each round's pair)")
    b.add_argument("--set", action="append", metavar="method.KEY=VALUE")
    b.add_argument("--device", default="auto")
    b.add_argument("--configs", help="comma-separated subset of the configurations (default: all four)")
    b.add_argument("--name-words", type=int, default=1, help="words per class name (prompt length; ImageNet: ~6)")
    b.add_argument("--compile", nargs="?", const=True, default=False, choices=[True, "default", "reduce-overhead"],
                   metavar="MODE", help="the mlgate configurations with train.compile on (compiled during the "
                   "warm-up); MODE: default (the default) or reduce-overhead (CUDA graphs)")
    b.add_argument("--diagnostics-every", type=int, metavar="N",
                   help="diagnostics (and their metrics) every N steps (default: logging.diagnostics_every's)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    sub.add_parser("list", help="the studies in studies/").set_defaults(func=cmd_list)
    sub.add_parser("schema", help="JSON Schema of a study spec").set_defaults(func=cmd_schema)
    return parser


@pipes.quiet_when_reader_leaves
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlgate`` console script."""
    from mlgate import interrupts

    # SIGTERM ends a run like Ctrl-C does: the running trial is closed (KILLED) and the study resumable.
    interrupts.install()
    os.environ["MLGATE_CONTEXT"] = "1"  # runs created from here on carry mlgate's context tags
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
