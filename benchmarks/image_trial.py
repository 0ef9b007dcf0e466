"""A whole trial on image files, timed: what a real dataset's trial costs beyond the bench's step
(reading and decoding the files, evaluation), for the methods that prompt the vision tower.

    python benchmarks/image_trial.py --method maple [--backbone ViT-B-16] [--steps 100] [--compile reduce-overhead]

Writes a CoOp-layout EuroSAT folder of 500x375 JPEGs (10 classes, 16 training images each, 4 for
validation and 4 for test; smooth random colour fields) under --root once, then runs one warm-up
trial of 2 steps (imports, caches, compiling) and the timed trial: batch 32, 16 shots, evaluation
at the end only. Prints the trial's seconds and steps per second, evaluation included.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

CLASSES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
           "PermanentCrop", "Residential", "River", "SeaLake"]


def write_folder(root: Path) -> None:
    """The CoOp layout of EuroSAT (``root/eurosat/2750/<class>/*.jpg`` and its split file), once."""
    from PIL import Image

    split_file = root / "eurosat" / "split_zhou_EuroSAT.json"
    if split_file.exists():
        return
    rng = np.random.default_rng(0)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES):
        for i in range(24):
            rel = f"{name}/{name}_{i}.jpg"
            path = root / "eurosat" / "2750" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            field = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
            Image.fromarray(field).resize((500, 375), Image.BICUBIC).save(path, quality=90)
            split["train" if i < 16 else "val" if i < 20 else "test"].append([rel, label, name])
    split_file.write_text(json.dumps(split))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="maple")
    parser.add_argument("--backbone", default="mlgate-tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", nargs="?", const=True, default=False, choices=[True, "default", "reduce-overhead"])
    parser.add_argument("--root", default="image-trial-data", help="where the JPEG folder is written")
    args = parser.parse_args()

    from mlgate.config.spec import StudySpec
    from mlgate.training import train

    root = Path(args.root).resolve()
    write_folder(root)

    def spec(steps: int) -> StudySpec:
        return StudySpec.model_validate({
            "backbone": {"name": args.backbone,  # (random-init weights but the embedded ones: the same cost)
                         "pretrained": "mlgate" if args.backbone == "mlgate-tiny" else None},
            "method": {"name": args.method}, "data": {"name": "eurosat", "root": str(root), "shots": 16},
            "train": {"steps": steps, "batch_size": 32, "eval_interval": steps, "device": args.device,
                      "compile": args.compile}, "search": {}})

    train(spec(2))
    start = time.perf_counter()
    train(spec(args.steps))
    seconds = time.perf_counter() - start
    print(f"{args.method} on {args.backbone}, {args.steps} steps on image files (compile={args.compile}): "
          f"{seconds:.2f} s a trial, {args.steps / seconds:.1f} steps/s, evaluation included")


if __name__ == "__main__":
    main()
