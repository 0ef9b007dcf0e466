"""The training loop: one trial of one method on a frozen CLIP, start to finish, read top to bottom.

Knows nothing of Optuna or MLflow: metrics go to a :class:`Sink`, evaluations to an ``on_eval``
callback (which may raise to stop the trial, e.g. ``optuna.TrialPruned``).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from mlgate import interrupts
from mlgate.config.loading import schedule_problems
from mlgate.config.spec import StudySpec
from mlgate.data import FewShotData, Split, load_dataset
from mlgate.data.images import ImageSet
from mlgate.diagnostics import Diagnostics, at_interval, input_spread
from mlgate.errors import MlgateError
from mlgate.methods import PromptMethod, build_method
from mlgate.methods.describe import inference_gflops
from mlgate.model import PromptedCLIP, load_backbone
from mlgate.training import plots
from mlgate.training.batches import batch_indices, step_batches
from mlgate.training.evaluation import evaluate, gate_swap_accuracies, validation_gate_values
from mlgate.training.features import augments, frozen_features
from mlgate.training.step import (build_optimizer, check_optimizer_covers, lr_factor, optimization_step,
                                  resolve_device, seed_everything, total_steps)
from mlgate.verdicts import MetricHistory, Thresholds


class Sink(Protocol):
    """Where a trial's metrics and artifacts go (an MLflow trial run, or nothing)."""

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None: ...

    def log_artifacts(self, local_dir: Path) -> None: ...

    def log_image(self, key: str, image: np.ndarray, step: int) -> None: ...


class NullSink:
    """Keeps nothing: for training outside a study (the returned outcome still has every metric)."""

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Dropped."""

    def log_artifacts(self, local_dir: Path) -> None:
        """Dropped."""

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """Dropped."""


@dataclass
class TrialOutcome:
    """What a finished (or stopped) trial produced."""

    final: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    verdict: str = "static"

    def objective(self, metric: str) -> float:
        return self.final[metric]


def preflight(spec: StudySpec) -> None:
    """Build the backbone, the data and the method once on the CPU, so a spec that cannot train (a device
    this machine lacks, missing weights, a wrong dataset layout, a depth beyond the backbone's layers, a
    ctx_init of the wrong length, an ADAPT schedule that cannot prune to its target) fails before any
    trial starts."""
    resolve_device(spec.train.device)
    clip = load_backbone(spec.backbone.name, spec.backbone.pretrained, "cpu")
    data = load_data(spec, clip)
    build_method(spec.method, clip, ["a", "b"])
    # ADAPT's pruning, with this backbone's layers and this data's training images: exact.
    problems = schedule_problems(spec, clip.num_layers, len(data.train))
    if problems:
        raise MlgateError(f"{spec.name}: the pruning schedule does not reach method.t_target.", problems)


def load_data(spec: StudySpec, clip: PromptedCLIP) -> FewShotData:
    """``spec.data`` prepared for ``clip``'s preprocessing."""
    d = spec.data
    return load_dataset(d.name, d.shots, d.seed, clip.image_norm, d.subsample, d.root, d.source, d.download)


def _spread(images: torch.Tensor | ImageSet, n: int) -> torch.Tensor:
    # Up to n images evenly spread over a split (which lists its classes one after another).
    return images[torch.linspace(0, len(images) - 1, min(n, len(images))).long()]


def train(spec: StudySpec, sink: Sink | None = None,
          on_eval: Callable[[int, dict[str, float]], None] | None = None) -> TrialOutcome:
    """Train ``spec.method`` for ``spec.train`` and return the final metrics and verdict.

    ``on_eval(step, metrics)`` is called after every evaluation; it may raise to stop the trial,
    after which the metrics so far have already been sent to ``sink``.
    """
    sink = sink or NullSink()
    cfg = spec.train
    device = resolve_device(cfg.device)
    seed = spec.train_seed
    seed_everything(seed)

    clip = load_backbone(spec.backbone.name, spec.backbone.pretrained, device)
    data = load_data(spec, clip)
    method = build_method(spec.method, clip, data.classnames).to(device)
    if method.prompts_vision:
        raw = {"train": data.train, "val": data.val, "test_base": data.test_base, "test_novel": data.test_novel}
        if augments(spec, data.train):  # a fresh crop and flip every time an image is drawn
            raw["train"] = Split(data.train.images.augmented(seed), data.train.labels)
        splits = {k: Split(s.images.to(device), s.labels.to(device)) for k, s in raw.items()}
        method.init_from_data(_spread(data.train.images, 64))  # (centre crops: no augmentation draw)
    else:
        splits = frozen_features(clip, data, spec, device)

    optimizer = build_optimizer(method, cfg)
    check_optimizer_covers(method, optimizer)
    groups = method.param_groups()
    gates = groups.get("gate", [])
    gate_init = None
    if gates and method.gates_depend_on_input:  # drift is measured from their mean over the inputs at init
        gate_init = validation_gate_values(method, data, splits).mean(0)
    diagnostics = Diagnostics(groups.get("prompt", []), gates, method.gate_states, method.metrics, gate_init)

    steps = total_steps(cfg, len(data.train))  # epochs count images, not cached views
    steps_per_epoch = max(1, math.ceil(len(data.train) / cfg.batch_size))
    eval_interval = cfg.eval_steps(steps_per_epoch)
    base_ids = torch.tensor(data.base, device=device)
    # Global label → position among the base classes (the logits' columns).
    target_of = torch.full((len(data.classnames),), -1, dtype=torch.long, device=device)
    target_of[base_ids] = torch.arange(len(data.base), device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    history = MetricHistory()
    gate_steps: list[int] = []
    gate_values: list[torch.Tensor] = []  # kept on the device: a copy to the host each epoch would sync

    def record_gates(step: int) -> None:
        if gates:  # (input-dependent gates: their batch mean, at init their mean over the inputs)
            values = diagnostics.gate_init if step == 0 else diagnostics.gate_values()
            gate_steps.append(step)
            gate_values.append(values.detach().float().clone())

    def flush() -> None:
        rows = diagnostics.drain()
        if not rows:
            return
        history.add(rows)
        sink.log_metrics(at_interval(rows, spec.logging.diagnostics_every * spec.logging.detail_every, steps))
        bad = next((s for s, m in rows if not math.isfinite(m["loss/total"])), None)
        if bad is not None:
            raise FloatingPointError(f"the loss became non-finite at step {bad}")

    at_init = {"params/trainable": float(sum(p.numel() for p in method.parameters() if p.requires_grad))}
    if gate_init is not None:
        at_init["gate/input_std"] = float(input_spread(validation_gate_values(method, data, splits)))
    history.add([(0, at_init)])
    sink.log_metrics([(0, at_init)])
    record_gates(0)
    method.on_train_start(steps, steps_per_epoch)
    method.train()
    if cfg.compile:
        torch.compiler.reset()  # earlier trials' graphs go (their kernels stay in the on-disk cache)
    train_split = splits["train"]
    files = isinstance(train_split.images, ImageSet)  # (their batches are drawn on the host, to read them)
    batches = step_batches(train_split, batch_indices(generator, len(train_split), cfg.batch_size, steps,
                                                      torch.device("cpu") if files else device), device)
    try:
        for step in range(1, steps + 1):
            interrupts.check()  # a signal that landed in a finalizer (GC) and was dropped by Python
            factor = lr_factor(step, steps, cfg, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = (cfg.schedule.warmup_lr if factor is None
                               else cfg.optimizer.lr * group["lr_mult"] * factor)
            images, labels = next(batches)
            diagnose = step % spec.logging.diagnostics_every == 0 or step == steps
            optimization_step(method, optimizer, groups, cfg, images, target_of[labels], base_ids, step, steps,
                              diagnostics if diagnose else None)

            if step % steps_per_epoch == 0 or step == steps:
                record_gates(step)
                method.on_epoch_end(step)
            if step % spec.logging.flush_every == 0:
                flush()
            if step % eval_interval == 0 or step == steps:
                flush()
                metrics = evaluate(method, data, splits, seed)
                history.add([(step, metrics)])
                sink.log_metrics([(step, metrics)])
                if on_eval is not None:
                    on_eval(step, metrics)
        # The final model: compacted where the method prunes, and what one image costs at inference.
        finished = method.finalize()
        method.eval()
        finished["flops/gflops_per_image"] = inference_gflops(method, clip, len(data.classnames))[0]
        if spec.logging.gate_swap:
            finished.update(gate_swap_accuracies(method, data, splits["val"], seed))
        history.add([(steps, finished)])
        sink.log_metrics([(steps, finished)])
    finally:
        # Whatever stopped the loop (the end, pruning, an error), what was measured is kept, with the
        # verdict's evidence from it (docs/metrics.md: verdict/*) at the last step logged.
        flush()
        last = max((s[-1] for s in history.steps.values()), default=0)
        summary = [(last, history.evidence().as_metrics())]
        history.add(summary)
        sink.log_metrics(summary)
        _log_artifacts(sink, method, gate_steps, gate_values, history, spec.logging.verdict.gap_log10)
    return TrialOutcome(final=history.final, history=history.series,
                        verdict=history.verdict(Thresholds(**spec.logging.verdict.model_dump()), spec.t_target))


def _write_history(out: Path, history: MetricHistory) -> None:
    # Every value the trial measured, step by step (MLflow gets some diagnostics at a coarser interval).
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(((step, key, value) for key in history.series
                   for step, value in zip(history.steps[key], history.series[key])), key=lambda row: row[:2])
    lines = ["step,key,value"] + [f"{step},{key},{value!r}" for step, key, value in rows]
    (out / "history.csv").write_text("\n".join(lines) + "\n")


def _log_artifacts(sink: Sink, method: PromptMethod, gate_steps: list[int], gate_values: list[torch.Tensor],
                   history: MetricHistory, gap_threshold: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if gate_values:
            plots.gate_trajectory(Path(tmp) / "gates", gate_steps, list(torch.stack(gate_values).cpu().numpy()))
        plots.trial_plots(Path(tmp) / "plots", history.series, history.steps, gap_threshold)
        _write_history(Path(tmp) / "metrics", history)
        method.save_artifacts(Path(tmp))
        if any(Path(tmp).iterdir()):
            sink.log_artifacts(Path(tmp))
    for key, images in method.images().items():  # step-aware: the UI's image slider walks through them
        for step, image in images:
            sink.log_image(key, image, step)
