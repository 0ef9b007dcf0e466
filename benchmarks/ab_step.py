"""A/B of one training step: this checkout's mlgate against another git revision's, in one process,
timed in alternating blocks (two processes run back to back on a shared machine differ more than the
change being measured).

    python benchmarks/ab_step.py --base HEAD~1 --method coop [--backbone mlgate-tiny] [--classes 10] \
        [--batch 32] [--steps 300] [--rounds 10] [--device cpu] [--precision bf16] [--compile [MODE]]

The base revision's ``mlgate`` package is exported with ``git archive`` and imported as ``mlgate_base``.
Both sides train the same method (the spec's defaults) on the same random-init backbone and inputs.
Printed: the medians of the timed blocks, their ratio and the median of each round's ratio, and, as
measures that do not depend on the machine's load, the ATen ops each side dispatches per step
(outermost calls only: what Python and autograd ask for) and the ops among all dispatched that
compute (below autograd and autocast, views left out: about one kernel each on a GPU; with
``--precision bf16`` on a CPU, a GPU step's autocast casts are counted too).
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent


def export_base(revision: str, into: Path) -> str:
    """Extract ``revision``'s mlgate package into ``into`` as ``mlgate_base``; returns that name."""
    archive = subprocess.run(["git", "archive", revision, "mlgate"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "mlgate").rename(into / "mlgate_base")
    for path in (into / "mlgate_base").rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\b(from|import) mlgate(?=[.\s])", r"\1 mlgate_base", text))
    return "mlgate_base"


def step_of(package: str, args: argparse.Namespace) -> Callable[[], None]:
    """A closure running one optimization step of ``package``'s method (``args``: method, backbone,
    classes, batch, device, and optionally compile and precision), warmed up (and compiled)."""
    def module(name: str):
        return importlib.import_module(f"{package}.{name}")

    training = module("training.step")
    device = training.resolve_device(args.device)
    cfg = module("methods.describe").method_config(args.method, [])
    train_cfg = module("config.spec").TrainSpec(compile=getattr(args, "compile", False),
                                                precision=getattr(args, "precision", "auto"))
    clip = module("model").load_backbone(args.backbone, None, device)
    torch.manual_seed(0)
    method = module("methods").build_method(cfg, clip, [f"class {i}" for i in range(args.classes)]).to(device)
    optimizer, groups = training.build_optimizer(method, train_cfg), method.param_groups()
    torch.manual_seed(1)
    size = clip.image_norm.size
    images = torch.randn(args.batch, 3, size, size, device=device)
    inputs = images if method.prompts_vision else clip.encode_image(images).float().detach()
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    ids = torch.arange(args.classes, device=device)

    counter = iter(range(1, 10**9))

    def step() -> None:  # steps numbered on, as in training (schedules, ADAPT's pruning steps)
        training.optimization_step(method, optimizer, groups, train_cfg, inputs, labels, ids, next(counter), 10_000)

    for _ in range(5):
        step()
    return step


def ops_per_step(step: Callable[[], None], steps: int = 5) -> tuple[int, int]:
    """Per step: the ATen ops dispatched, counting only calls not made from inside another ATen op
    (what Python and autograd ask for), and the ops that compute, as the kernels see them: below
    autograd and autocast (its casts included), views left out, each about one kernel on a GPU."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    class Computing(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += not func.is_view
            return func(*args, **(kwargs or {}))

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    outermost = [e for e in prof.events() if e.name.startswith("aten::")
                 and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    with Computing() as computing:  # (the CPU runs the backward in this thread, where the mode is on)
        for _ in range(steps):
            step()
    return round(len(outermost) / steps), round(computing.count / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare against (default HEAD)")
    parser.add_argument("--method", default="coop")
    parser.add_argument("--backbone", default="mlgate-tiny")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=10, help="timed blocks per side")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="train.precision (bf16 on a CPU: the autocast path a GPU takes, for its op count)")
    parser.add_argument("--compile", nargs="?", const=True, default=False, choices=[True, "default", "reduce-overhead"],
                        help="train.compile for both sides (ops are then not counted: the compiled step runs kernels)")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        sides = {"base": step_of(export_base(args.base, Path(tmp)), args), "this": step_of("mlgate", args)}
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name in sorted(sides, reverse=bool(r % 2)):  # alternate which side goes first
                sync()
                start = time.perf_counter()
                for _ in range(args.steps):
                    sides[name]()
                sync()
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
        ops = {name: ops_per_step(step) if not args.compile else ("-", "-") for name, step in sides.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:5s} {median[name]:8.3f} ms/step, {ops[name][0]} ATen ops/step, {ops[name][1]} computing "
              f"(median; blocks: {' '.join(f'{x:.2f}' for x in t)})")
    # Each round's two blocks ran back to back: the median of their ratios cancels the machine's drift.
    paired = statistics.median(t / b for t, b in zip(times["this"], times["base"]))
    print(f"{args.method} on {args.backbone}: this / {args.base} = {median['this'] / median['base']:.3f} "
          f"(medians), {paired:.3f} (median of the rounds' ratios)")


if __name__ == "__main__":
    main()
