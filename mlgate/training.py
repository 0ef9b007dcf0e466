"""The training loop: one trial of one method on a frozen CLIP, start to finish.

Knows nothing of Optuna or MLflow: metrics go to a :class:`Sink`, evaluations to an ``on_eval``
callback (which may raise to stop the trial, e.g. ``optuna.TrialPruned``).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlgate import interrupts, plots
from mlgate.clip import PromptedCLIP, load_backbone
from mlgate.describe import inference_gflops
from mlgate.data import FewShotData, Split, cache_root, load_dataset
from mlgate.errors import MlgateError
from mlgate.folders import ImageSet, PendingBatch
from mlgate.diagnostics import Diagnostics, binary_entropy, input_spread
from mlgate.methods import PromptMethod, build_method
from mlgate.methods.base import GATE_SWAPS
from mlgate.spec import PhasesSpec, StudySpec, TemperatureSpec, TrainSpec, schedule_problems
from mlgate.verdicts import MetricHistory, Thresholds

EVAL_METRICS = ("acc/val", "acc/base", "acc/novel", "acc/hm")


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(method: PromptMethod, cfg: TrainSpec) -> torch.optim.Optimizer:
    """SGD or AdamW over the method's groups; the gate group's LR is scaled by ``gate_lr_mult``."""
    groups = []
    for name, params in method.param_groups().items():
        mult = cfg.gate_lr_mult if name == "gate" else 1.0
        groups.append({"params": params, "name": name, "lr_mult": mult, "lr": cfg.optimizer.lr * mult})
    opt = cfg.optimizer
    if opt.name == "adamw":
        make = functools.partial(torch.optim.AdamW, groups, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    else:
        make = functools.partial(torch.optim.SGD, groups, lr=opt.lr, momentum=opt.momentum,
                                 nesterov=opt.nesterov and opt.momentum > 0, weight_decay=opt.weight_decay)
    try:
        # One kernel per step for all parameters (instead of a few per parameter and group), where this
        # torch has it for the device: a prompt learner's step is short enough for that to show.
        return make(fused=True)
    except (TypeError, RuntimeError):  # an older torch, or a device without fused kernels
        return make()


def check_optimizer_covers(method: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fail loudly if a trainable parameter is not held by the optimizer (the reference code's
    orphaned-gate bug: replaced Parameter objects keep receiving gradients but are never stepped)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    orphans = [n for n, p in method.named_parameters() if p.requires_grad and id(p) not in held]
    if orphans:
        raise RuntimeError(f"trainable parameters not held by the optimizer: {', '.join(orphans)}")


def lr_factor(step: int, total: int, cfg: TrainSpec, steps_per_epoch: int = 1) -> float | None:
    """Cosine (or constant) schedule after a constant-LR warmup; None during warmup."""
    warm = cfg.schedule.warmup_steps + round(cfg.schedule.warmup_epochs * steps_per_epoch)
    if step < warm:
        return None
    if cfg.schedule.name == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(cfg: TrainSpec, n_train: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * math.ceil(n_train / cfg.batch_size)))


def cache_dir() -> Path:
    """Where frozen image features are kept between trials and workers ($MLGATE_CACHE_DIR)."""
    return cache_root() / "features"


class FeatureCache:
    """Frozen image features for methods that do not prompt the vision tower, computed once per
    backbone × images (the preprocessed pixels are part of the key) and kept on disk, so every epoch,
    every trial of a study and every worker on the machine reuse them."""

    def __init__(self, clip: PromptedCLIP, device: torch.device, weights: str | None, batch: int = 256) -> None:
        self.clip, self.device, self.batch = clip, device, batch
        self.key = f"{clip.name}|{weights}"

    def path(self, split: Split) -> Path:
        digest = hashlib.sha1(self.key.encode())
        if isinstance(split.images, torch.Tensor):
            digest.update(split.images.detach().cpu().contiguous().numpy().tobytes())
        else:  # files read on demand: their identity and the preprocessing
            digest.update(split.images.fingerprint().encode())
        return cache_dir() / f"{digest.hexdigest()}.pt"

    @torch.no_grad()
    def __call__(self, split: Split) -> Split:
        path = self.path(split)
        if path.is_file():
            features = torch.load(path, map_location=self.device, weights_only=True)
            return Split(features, split.labels.to(self.device))
        chunks = (slice(i, i + self.batch) for i in range(0, len(split), self.batch))
        feats = [self.clip.encode_image(images.to(self.device)).float()  # (files: the next chunk loads meanwhile)
                 for images in read_ahead(split.images, chunks, ahead=self.device.type == "cuda")]
        features = torch.cat(feats) if feats else torch.empty(0, self.clip.model.visual.output_dim, device=self.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(features.cpu(), tmp)
        os.replace(tmp, path)  # atomic: a concurrent worker sees the whole file or none
        return Split(features, split.labels.to(self.device))


@torch.no_grad()
def accuracy(method: PromptMethod, split: Split, classes: list[int], batch: int = 256,
             after_batch: Callable[[], None] | None = None) -> float:
    """Top-1 accuracy (percent) of ``method`` on ``split`` among ``classes``; ``after_batch()`` is
    called after each batch's forward (to read what the forward left, e.g. input-dependent gates)."""
    if len(split) == 0:
        return float("nan")
    device = split.labels.device
    class_ids = torch.tensor(classes, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)  # read once at the end: no sync per batch
    starts = range(0, len(split), batch)
    images = read_ahead(split.images, (slice(i, i + batch) for i in starts), ahead=device.type == "cuda")
    for i, x in zip(starts, images):
        logits = method(x.to(device), class_ids)
        correct += (class_ids[logits.argmax(-1)] == split.labels[i : i + batch]).sum()
        if after_batch is not None:
            after_batch()
    return 100.0 * int(correct) / len(split)


def validation_gate_values(method: PromptMethod, data: FewShotData, splits: dict[str, Split]) -> torch.Tensor:
    """σ(g) of input-dependent gates for every validation input, (N, G), with the weights as they are."""
    values: list[torch.Tensor] = []
    was_training = method.training
    method.eval()
    accuracy(method, splits["val"], data.base, after_batch=lambda: values.append(method.gate_states().detach()))
    method.train(was_training)
    return torch.cat(values)


def evaluate(method: PromptMethod, data: FewShotData, splits: dict[str, Split]) -> dict[str, float]:
    """acc/val, acc/base, acc/novel and their harmonic mean acc/hm (percent); for input-dependent
    gates also gate/input_std, their spread across the validation inputs (from the same forwards)."""
    was_training = method.training
    method.eval()
    gate_values: list[torch.Tensor] = []
    collect = (lambda: gate_values.append(method.gate_states().detach())) if method.gates_depend_on_input else None
    out = {
        "acc/val": accuracy(method, splits["val"], data.base, after_batch=collect),
        "acc/base": accuracy(method, splits["test_base"], data.base),
    }
    if len(gate_values) and sum(len(v) for v in gate_values) > 1:
        out["gate/input_std"] = float(input_spread(torch.cat(gate_values)))
    if data.novel:
        out["acc/novel"] = accuracy(method, splits["test_novel"], data.novel)
        b, n = out["acc/base"], out["acc/novel"]
        out["acc/hm"] = 0.0 if b + n == 0 else 2 * b * n / (b + n)
    else:
        out["acc/hm"] = out["acc/base"]
    method.train(was_training)
    return out


def gate_swap_accuracies(method: PromptMethod, data: FewShotData, val: Split, seed: int) -> dict[str, float]:
    """acc/val of the trained ``method`` with its learned gates swapped for each of :data:`GATE_SWAPS`
    (``acc/gates/<strategy>``); empty when it has no learned gates."""
    if not method.swappable_gates():
        return {}
    was_training = method.training
    method.eval()
    out = {}
    for strategy in GATE_SWAPS:
        with method.swapped_gates(strategy, seed):
            out[f"acc/gates/{strategy}"] = accuracy(method, val, data.base)
    method.train(was_training)
    return out


def temperature_at(step: int, total: int, cfg: TemperatureSpec) -> float:
    """Gate temperature at ``step`` of ``total``, from ``cfg.start`` to ``cfg.end``."""
    progress = min(1.0, step / max(1, total - 1))
    if cfg.schedule == "exponential":
        return cfg.start * (cfg.end / cfg.start) ** progress
    if cfg.schedule == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return cfg.start + (cfg.end - cfg.start) * progress


def frozen_groups(step: int, phases: PhasesSpec, groups: list[str]) -> set[str]:
    """Groups not updated at ``step`` (0-based): gates during warmup, all but gates while gate-only."""
    if step < phases.warmup:
        return {"gate"}
    if step < phases.warmup + phases.gate_only:
        return {g for g in groups if g != "gate"}
    return set()


def use_bf16(cfg: TrainSpec, device: torch.device) -> bool:
    """bf16 autocast: on CUDA unless the spec says fp32 (CPU runs fp32 unless it says bf16)."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def batch_indices(generator: torch.Generator, pool: int, batch: int, steps: int, device: torch.device,
                  block: int = 64) -> Iterator[torch.Tensor]:
    """Each step's batch: the first ``batch`` of a fresh random permutation of ``pool`` indices (one
    ``randperm`` per step, from ``generator``), on ``device``. Drawn on the host ``block`` steps at a
    time and sent in one copy that does not wait for the device: a blocking copy at every step would
    sync the host with the GPU at every step, so the host could never queue a step ahead."""
    for start in range(0, steps, block):
        drawn = torch.stack([torch.randperm(pool, generator=generator)[:batch]
                             for _ in range(min(block, steps - start))])
        if device.type == "cuda":
            drawn = drawn.pin_memory()
        yield from drawn.to(device, non_blocking=True)


def read_ahead(images: torch.Tensor | ImageSet, keys: Iterable[Any], ahead: bool) -> Iterator[torch.Tensor]:
    """``images[key]`` for each key. For image files with ``ahead``, the next key's files load (in
    background threads) before this batch is handed over, so they decode while the caller uses it."""
    if not (ahead and isinstance(images, ImageSet)):
        yield from (images[key] for key in keys)
        return
    pending: PendingBatch | None = None
    for key in itertools.chain(keys, [None]):
        following = None if key is None else images.fetch(key)
        if pending is not None:
            yield pending.result()
        pending = following


def step_batches(split: Split, indices: Iterator[torch.Tensor], device: torch.device,
                 ahead: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's (images, labels) from ``split`` at ``indices`` (from :func:`batch_indices`, on the
    host for a split of image files, on ``device`` otherwise). Image files load in parallel threads,
    and, ``ahead`` (by default for a GPU), one step ahead: the next batch's files decode while this
    one trains. (On the CPU the cores that would decode are the ones training: loading beside a step
    slowed it by as much as it saved.)"""
    for_images, for_labels = itertools.tee(indices)
    batches = read_ahead(split.images, for_images, device.type == "cuda" if ahead is None else ahead)
    for images, idx in zip(batches, for_labels):
        yield images, split.labels[idx.to(split.labels.device, non_blocking=True)]


def classification_loss(method: PromptMethod, inputs: torch.Tensor, class_ids: torch.Tensor,
                        targets: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Cross-entropy of ``method``'s logits over ``class_ids``: the forward part of a step (what
    ``train.compile`` compiles)."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = method(inputs, class_ids)
    return F.cross_entropy(logits.float(), targets)


def compile_mode(cfg: TrainSpec) -> str | None:
    """torch.compile's mode for ``train.compile`` (None: eager)."""
    return None if cfg.compile is False else "default" if cfg.compile is True else cfg.compile


@functools.cache
def compiled_loss(mode: str = "default") -> Callable[..., torch.Tensor]:
    """:func:`classification_loss` under ``torch.compile`` in ``mode``, created once per process and
    mode. Shapes are static (a trial's batch and class set do not change); each trial starts with
    ``torch.compiler.reset()`` so its graphs do not count against the recompile limit of the trials
    before it."""
    return torch.compile(classification_loss, dynamic=False, mode=mode)


def optimization_step(method: PromptMethod, optimizer: torch.optim.Optimizer, groups: dict[str, list[nn.Parameter]],
                      cfg: TrainSpec, inputs: torch.Tensor, targets: torch.Tensor, class_ids: torch.Tensor,
                      step: int, steps: int, diagnostics: Diagnostics | None = None) -> None:
    """One optimizer step with every training option of ``cfg`` but the LR schedule: temperature,
    entropy regularizer, gradient equilibrium, phases, clipping, and the method's hooks. With
    ``diagnostics`` the step's metrics are recorded (on the device; nothing is synced to the host)."""
    tricks = cfg.gates
    gates = groups.get("gate", [])
    method.gate_temperature = temperature_at(step - 1, steps, tricks.temperature)
    # Gradient equilibrium acts in the gates' backward, on every loss term alike (the diagnostics'
    # per-term gate gradients included).
    method.gate_equilibrium = (tricks.equilibrium.eps, tricks.equilibrium.cap) if tricks.equilibrium.enabled else None
    mode = compile_mode(cfg)
    if mode == "reduce-overhead":
        # A new step: the CUDA graphs may reuse the memory of the last step's outputs (all consumed).
        torch.compiler.cudagraph_mark_step_begin()
    # The first step runs eagerly: it keeps the frozen towers' matrices in autocast's dtype, which the
    # compiled steps then read as static inputs instead of casting them in their graphs (clip.kept).
    loss_fn = classification_loss if mode is None or step == 1 else compiled_loss(mode)
    loss_cls = loss_fn(method, inputs, class_ids, targets, use_bf16(cfg, inputs.device))
    regularizers = method.regularizers()
    if gates and tricks.entropy_weight > 0:
        # Rewards entropy, keeping gates away from saturation (0 or 1), where their gradient vanishes.
        values = method.gate_values()
        values = values.mean(0) if values.dim() > 1 else values
        regularizers["entropy"] = -tricks.entropy_weight * binary_entropy(values).sum()
    # Without regularizers the loss is the classification loss itself: no zero tensor and no add (two
    # eager ops per step, outside the compiled step and its CUDA graphs).
    loss_reg = functools.reduce(torch.add, regularizers.values()) if regularizers else None
    loss = loss_cls if loss_reg is None else loss_cls + loss_reg
    reg_grads = diagnostics.term_gate_grads(regularizers) if diagnostics is not None and regularizers else None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.on_backward(step)
    if diagnostics is not None:
        reg = torch.zeros_like(loss_cls) if loss_reg is None else loss_reg
        diagnostics.record(step, {"loss/total": loss, "loss/cls": loss_cls, "loss/reg": reg}, reg_grads)
    for name in frozen_groups(step - 1, cfg.phases, list(groups)):
        for p in groups[name]:
            p.grad = None  # optimizers skip parameters without a gradient
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in groups.values() for p in g], cfg.grad_clip)
    optimizer.step()
    method.on_step(step, steps)


def preflight(spec: StudySpec) -> None:
    """Build the backbone, the data and the method once on the CPU, so a spec that cannot train (missing
    weights, a wrong dataset layout, a depth beyond the backbone's layers, a ctx_init of the wrong
    length, an ADAPT schedule that cannot prune to its target) fails before any trial starts."""
    clip = load_backbone(spec.backbone.name, spec.backbone.pretrained, "cpu")
    data = load_data(spec, clip)
    try:
        build_method(spec.method, clip, ["a", "b"])
    except ValueError as exc:
        raise MlgateError(f"method: {exc}.") from None
    # ADAPT's pruning, with this backbone's layers and this data's training images: exact.
    problems = schedule_problems(spec, clip.num_layers, len(data.train))
    if problems:
        raise MlgateError(f"{spec.name}: the pruning schedule does not reach method.t_target.", problems)


def load_data(spec: StudySpec, clip: PromptedCLIP) -> FewShotData:
    """``spec.data`` prepared for ``clip``'s preprocessing."""
    d = spec.data
    return load_dataset(d.name, d.shots, d.seed, clip.image_norm, d.subsample, d.root, d.source, d.download)


def frozen_features(clip: PromptedCLIP, data: FewShotData, spec: StudySpec, device: torch.device) -> dict[str, Split]:
    """The splits as cached frozen image features. With augmentation on image files, training gets
    ``data.augment_views`` views of every image (each cached on its own), laid out view after view:
    a batch drawn from them picks an (image, view) pair, as an augmenting data loader would."""
    cache = FeatureCache(clip, device, spec.backbone.pretrained)
    splits = {"val": cache(data.val), "test_base": cache(data.test_base), "test_novel": cache(data.test_novel)}
    if _augments(spec, data.train):
        views = [cache(Split(data.train.images.augmented(seed=v), data.train.labels))
                 for v in range(spec.data.augment_views)]
        splits["train"] = Split(torch.cat([v.images for v in views]), torch.cat([v.labels for v in views]))
    else:
        splits["train"] = cache(data.train)
    return splits


def _spread(images: torch.Tensor | ImageSet, n: int) -> torch.Tensor:
    # Up to n images evenly spread over a split (which lists its classes one after another).
    return images[torch.linspace(0, len(images) - 1, min(n, len(images))).long()]


def _augments(spec: StudySpec, split: Split) -> bool:
    return spec.data.augment and isinstance(split.images, ImageSet)


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
        if _augments(spec, data.train):  # a fresh crop and flip every time an image is drawn
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
        sink.log_metrics(rows)
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
            factor = lr_factor(step - 1, steps, cfg, steps_per_epoch)
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
                metrics = evaluate(method, data, splits)
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
        # Whatever stopped the loop (the end, pruning, an error), what was measured is kept.
        flush()
        _log_artifacts(sink, method, gate_steps, gate_values, history, spec.logging.verdict.gap_log10)
    return TrialOutcome(final=history.final, history=history.series,
                        verdict=history.verdict(Thresholds(**spec.logging.verdict.model_dump()), spec.t_target))


def _log_artifacts(sink: Sink, method: PromptMethod, gate_steps: list[int], gate_values: list[torch.Tensor],
                   history: MetricHistory, gap_threshold: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if gate_values:
            plots.gate_trajectory(Path(tmp) / "gates", gate_steps, list(torch.stack(gate_values).cpu().numpy()))
        plots.trial_plots(Path(tmp) / "plots", history.series, history.steps, gap_threshold)
        method.save_artifacts(Path(tmp))
        if any(Path(tmp).iterdir()):
            sink.log_artifacts(Path(tmp))
    for key, images in method.images().items():  # step-aware: the UI's image slider walks through them
        for step, image in images:
            sink.log_image(key, image, step)
