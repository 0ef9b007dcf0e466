"""Accuracy on the few-shot splits (acc/val, acc/base, acc/novel, acc/hm), the input dependence of
gates, and the trained model under swapped gates."""

from __future__ import annotations

from typing import Callable

import torch

from mlgate.data import FewShotData, Split
from mlgate.diagnostics import input_spread
from mlgate.methods import PromptMethod
from mlgate.methods.gates import GATE_SWAPS
from mlgate.training.batches import read_ahead

EVAL_METRICS = ("acc/val", "acc/base", "acc/novel", "acc/hm")


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
