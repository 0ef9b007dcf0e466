"""Evaluation on the few-shot splits: accuracy (acc/val, acc/base, acc/novel, acc/hm), the representation
quality of the gating paper's Table III (repr/*) from the same forwards, the input dependence of gates,
their sensitivity to noise, and the trained model under swapped gates (Table II)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from mlgate.data import FewShotData, Split
from mlgate.diagnostics import input_spread
from mlgate.methods import PromptMethod
from mlgate.methods.base import cosine
from mlgate.methods.gates import GATE_SWAPS
from mlgate.training.batches import read_ahead

EVAL_METRICS = ("acc/val", "acc/base", "acc/novel", "acc/hm")
SILHOUETTE_SAMPLE = 2000  # silhouette is quadratic in the points: a fixed sample of the test images beyond this


@dataclass
class Representation:
    """Sums over test images and class pairs for the repr/* metrics, gathered on the device."""

    alignment: list[torch.Tensor] = field(default_factory=list)  # per batch: Σ cos(image, own class's text)
    separation: list[torch.Tensor] = field(default_factory=list)  # per batch or split: (Σ cos over class pairs, pairs)
    images: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)

    def add(self, image: torch.Tensor, text: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor,
            first: bool) -> None:
        """One batch: image features (B, E), text features (C, E) or (B, C, E), each image's position
        among the classes (B,) and its global label (B,)."""
        rows = torch.arange(len(targets), device=targets.device)
        own = text[targets] if text.dim() == 2 else text[rows, targets]
        self.alignment.append((image * own).sum())
        if text.dim() == 3 or first:  # static text: its class pairs once per split
            pairs = text.unsqueeze(0) if text.dim() == 2 else text
            n = pairs.shape[1]
            gram = pairs @ pairs.transpose(1, 2)
            self.separation.append(torch.stack([(gram.sum() - gram.diagonal(dim1=1, dim2=2).sum()) / 2,
                                                torch.tensor(len(pairs) * n * (n - 1) / 2, device=gram.device)]))
        self.images.append(image.float())
        self.labels.append(labels)

    def metrics(self) -> dict[str, float]:
        from sklearn.metrics import silhouette_score

        images = torch.cat(self.images).cpu().numpy()
        labels = torch.cat(self.labels).cpu().numpy()
        separation = torch.stack(self.separation).sum(0).tolist()
        out = {"repr/alignment": float(torch.stack(self.alignment).sum()) / len(images)}
        if separation[1]:
            out["repr/separation"] = 1.0 - separation[0] / separation[1]
        if 1 < len(np.unique(labels)) < len(labels):
            sample = min(len(labels), SILHOUETTE_SAMPLE)
            out["repr/silhouette"] = float(silhouette_score(images, labels, metric="cosine", sample_size=sample,
                                                            random_state=0))
        return out


@torch.no_grad()
def accuracy(method: PromptMethod, split: Split, classes: list[int], batch: int = 256,
             after_batch: Callable[[], None] | None = None, representation: Representation | None = None) -> float:
    """Top-1 accuracy (percent) of ``method`` on ``split`` among ``classes``; ``after_batch()`` is
    called after each batch's forward (to read what the forward left, e.g. input-dependent gates), and
    ``representation`` gathers the batches' features."""
    if len(split) == 0:
        return float("nan")
    device = split.labels.device
    class_ids = torch.tensor(classes, device=device)
    position = torch.full((int(class_ids.max()) + 1,), -1, dtype=torch.long, device=device)
    position[class_ids] = torch.arange(len(classes), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)  # read once at the end: no sync per batch
    starts = range(0, len(split), batch)
    images = read_ahead(split.images, (slice(i, i + batch) for i in starts), ahead=device.type == "cuda")
    for i, x in zip(starts, images):
        image, text = method.features(x.to(device), class_ids)
        labels = split.labels[i : i + batch]
        correct += (class_ids[cosine(image, text).argmax(-1)] == labels).sum()
        if representation is not None:
            representation.add(image, text, position[labels], labels, first=i == 0)
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


def evaluate(method: PromptMethod, data: FewShotData, splits: dict[str, Split], seed: int = 0) -> dict[str, float]:
    """acc/val, acc/base, acc/novel and their harmonic mean acc/hm (percent); repr/alignment,
    repr/silhouette and repr/separation of the test images' features (docs/metrics.md), from the same
    forwards; for input-dependent gates gate/input_std, their spread across the validation inputs; for
    learned gates gate/noise_sensitivity, what acc/val loses when noise (seeded by ``seed``) is added
    to the gate logits."""
    was_training = method.training
    method.eval()
    gate_values: list[torch.Tensor] = []
    collect = (lambda: gate_values.append(method.gate_states().detach())) if method.gates_depend_on_input else None
    representation = Representation()
    out = {
        "acc/val": accuracy(method, splits["val"], data.base, after_batch=collect),
        "acc/base": accuracy(method, splits["test_base"], data.base, representation=representation),
    }
    if len(gate_values) and sum(len(v) for v in gate_values) > 1:
        out["gate/input_std"] = float(input_spread(torch.cat(gate_values)))
    if data.novel:
        out["acc/novel"] = accuracy(method, splits["test_novel"], data.novel, representation=representation)
        b, n = out["acc/base"], out["acc/novel"]
        out["acc/hm"] = 0.0 if b + n == 0 else 2 * b * n / (b + n)
    else:
        out["acc/hm"] = out["acc/base"]
    if representation.images:
        out.update(representation.metrics())
    if method.swappable_gates():
        with method.swapped_gates("noise", seed):
            out["gate/noise_sensitivity"] = out["acc/val"] - accuracy(method, splits["val"], data.base)
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
