"""One optimizer step with every training option of a spec, and the schedules it follows.

Steps are counted from 1 (the first optimizer step is step 1), as the metrics are logged.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlgate.config.spec import PhasesSpec, TemperatureSpec, TrainSpec
from mlgate.diagnostics import Diagnostics, binary_entropy
from mlgate.errors import MlgateError
from mlgate.methods import PromptMethod


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), else the named device; one that is not there is bad input."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MlgateError(f"device {name!r}: not a device name; use auto, cpu, mps, cuda or cuda:N.") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise MlgateError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices; "
                          "use auto or cpu.")
    return device


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
    """The LR multiplier of ``step`` of ``total``: a cosine (or constant) schedule after the warmup
    steps, which run at the constant ``warmup_lr`` (None)."""
    warm = cfg.schedule.warmup_steps + round(cfg.schedule.warmup_epochs * steps_per_epoch)
    if step <= warm:
        return None
    if cfg.schedule.name == "constant":
        return 1.0
    progress = (step - 1 - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(cfg: TrainSpec, n_train: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * math.ceil(n_train / cfg.batch_size)))


def temperature_at(step: int, total: int, cfg: TemperatureSpec) -> float:
    """Gate temperature at ``step`` of ``total``: ``cfg.start`` at the first step, ``cfg.end`` at the last."""
    progress = min(1.0, (step - 1) / max(1, total - 1))
    if cfg.schedule == "exponential":
        return cfg.start * (cfg.end / cfg.start) ** progress
    if cfg.schedule == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return cfg.start + (cfg.end - cfg.start) * progress


def frozen_groups(step: int, phases: PhasesSpec, groups: list[str]) -> set[str]:
    """Groups not updated at ``step``: the gates during the warmup steps, all but the gates during the
    gate-only steps that follow."""
    if step <= phases.warmup:
        return {"gate"}
    if step <= phases.warmup + phases.gate_only:
        return {g for g in groups if g != "gate"}
    return set()


def use_bf16(cfg: TrainSpec, device: torch.device) -> bool:
    """bf16 autocast: on CUDA unless the spec says fp32 (CPU runs fp32 unless it says bf16)."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


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
    method.gate_temperature = temperature_at(step, steps, tricks.temperature)
    # Gradient equilibrium acts in the gates' backward, on every loss term alike (the diagnostics'
    # per-term gate gradients included).
    method.gate_equilibrium = (tricks.equilibrium.eps, tricks.equilibrium.cap) if tricks.equilibrium.enabled else None
    mode = compile_mode(cfg)
    if mode == "reduce-overhead":
        # A new step: the CUDA graphs may reuse the memory of the last step's outputs (all consumed).
        torch.compiler.cudagraph_mark_step_begin()
    # The first step runs eagerly: it keeps the frozen towers' matrices in autocast's dtype, which the
    # compiled steps then read as static inputs instead of casting them in their graphs.
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
    for name in frozen_groups(step, cfg.phases, list(groups)):
        for p in groups[name]:
            p.grad = None  # optimizers skip parameters without a gradient
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in groups.values() for p in g], cfg.grad_clip)
    optimizer.step()
    method.on_step(step, steps)
