"""Where a training step's time goes on a device: wall time per step against the GPU's busy time,
kernel launches per step, and the top kernels and host ops (torch.profiler), for the mlgate
configuration of ``mlgate bench``.

    python scripts/profile_step.py --method coop --backbone ViT-B-16 [--device cuda] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mlgate.clip import load_backbone
from mlgate.describe import method_config
from mlgate.methods import build_method
from mlgate.spec import TrainSpec
from mlgate.training import build_optimizer, optimization_step, resolve_device


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
    cfg, train_cfg = method_config(args.method, []), TrainSpec(compile=args.compile)
    clip = load_backbone(args.backbone, None, dev)
    torch.manual_seed(0)
    method = build_method(cfg, clip, [f"class {i}" for i in range(args.classes)]).to(dev)
    optimizer, groups = build_optimizer(method, train_cfg), method.param_groups()
    size = clip.image_norm.size
    images = torch.randn(args.batch, 3, size, size, device=dev)
    inputs = images if method.prompts_vision else clip.encode_image(images).float().detach()
    labels = torch.randint(0, args.classes, (args.batch,), device=dev)
    ids = torch.arange(args.classes, device=dev)
    total = 2 * args.steps + 5

    def steps(first: int, n: int) -> float:
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for i in range(first, first + n):
            optimization_step(method, optimizer, groups, train_cfg, inputs, labels, ids, i, total)
        sync()
        return (time.perf_counter() - start) / n

    steps(1, 5)  # warm-up (and compilation)
    wall = steps(6, args.steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        steps(6 + args.steps, args.steps)
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
