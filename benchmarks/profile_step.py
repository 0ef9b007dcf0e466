"""Where a training step's time goes on a device: wall time per step against the GPU's busy time,
kernel launches per step, and the top kernels and host ops (torch.profiler), for the mlgate
configuration of ``mlgate bench``.

    python benchmarks/profile_step.py --method coop --backbone ViT-B-16 [--device cuda] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ab_step import step_of  # (this folder is on sys.path when the script runs)

from mlgate.training.step import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="coop")
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                        help="train.compile: on, or a mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--rows", type=int, default=12, help="rows of each table")
    args = parser.parse_args()

    dev = resolve_device(args.device)
    step = step_of("mlgate", args)  # warmed up (and compiled)

    def steps(n: int) -> float:
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return (time.perf_counter() - start) / n

    wall = steps(args.steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        steps(args.steps)
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) / args.steps
    kernels = sum(e.count for e in events if e.self_device_time_total > 0) / args.steps
    print(f"{args.method} on {args.backbone} ({dev}, batch {args.batch}, {args.classes} classes, "
          f"compile={args.compile}): {1e3 * wall:.2f} ms/step wall, {device_us / 1e3:.2f} ms/step device busy, "
          f"{kernels:.0f} device ops/step")
    if dev.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
