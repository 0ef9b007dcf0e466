"""The interface every prompt-learning method implements.

A method is a small ``nn.Module`` on top of one frozen :class:`~mlgate.model.PromptedCLIP`. It owns the
trainable prompt/gate parameters, scores images against a subset of classes, and names its parameter
groups so the optimizer, the diagnostics and ``mlgate describe`` all see the same split. Its settings
are a config class of :mod:`mlgate.config.methods`.
"""

from __future__ import annotations

import contextlib
from abc import ABCMeta, abstractmethod
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
import torch
from torch import nn

from mlgate.config.methods import MethodConfig
from mlgate.methods.gates import _EqualizedSigmoid, swapped_logits


class PromptMethod(nn.Module, metaclass=ABCMeta):
    """Interface of a prompt-learning method.

    ``features(images_or_features, class_ids)`` returns the normalized image features (B, E) and
    text features of ``class_ids`` (a LongTensor of indices into the method's full class list), (C, E),
    or (B, C, E) where each image has its own prompts; ``forward`` scores them (logits over ``class_ids``). ``prompts_vision`` says whether the vision tower is
    prompted; when it is not, the trainer feeds cached frozen image features instead of images.
    """

    Config: ClassVar[type[MethodConfig]]
    prompts_vision: ClassVar[bool] = False
    #: (eps, cap) of gradient equilibrium on the gate logits, set by the trainer; None: off.
    gate_equilibrium: tuple[float, float] | None = None

    def __init__(self, clip, cfg: MethodConfig) -> None:
        super().__init__()
        object.__setattr__(self, "clip", clip)  # frozen backbone: used, not owned (no params, no state)
        self.cfg = cfg
        # A tensor updated in place, not a float: a compiled step (train.compile) reads it as an input
        # rather than recompiling for every value an annealing schedule takes.
        device = clip.text.token_embedding.weight.device
        self.register_buffer("_gate_temperature", torch.ones((), device=device), persistent=False)
        self._gate_temperature_value = 1.0  # what it holds, read on the host

    @property
    def gate_temperature(self) -> torch.Tensor:
        """Temperature T of the gate sigmoid σ(g/T) (a 0-d tensor); the trainer anneals it when the spec asks."""
        return self._gate_temperature

    @gate_temperature.setter
    def gate_temperature(self, value: float) -> None:
        if value != self._gate_temperature_value:  # a constant temperature costs no kernel per step
            self._gate_temperature.fill_(value)
            self._gate_temperature_value = value

    def gate_activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Gate values σ(g/T) of gate logits (with gradient equilibrium in the backward when it is on)."""
        if self.gate_equilibrium is not None and torch.is_grad_enabled():
            return _EqualizedSigmoid.apply(logits, self.gate_temperature, *self.gate_equilibrium)
        return torch.sigmoid(logits / self.gate_temperature)

    @property
    def gates_depend_on_input(self) -> bool:
        """Whether the gates are computed from each input (then gate values are (B, G))."""
        return False

    @abstractmethod
    def features(self, inputs: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized image features (B, E) and text features (C, E) or (B, C, E) of ``class_ids``."""

    def forward(self, inputs: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) over ``class_ids``: CLIP's scaled cosine similarity of the features."""
        return self.clip.logit_scale * cosine(*self.features(inputs, class_ids))

    @abstractmethod
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group (``prompt``, ``gate``, ...), in a stable order."""

    def regularizers(self) -> dict[str, torch.Tensor]:
        """Named regularization terms already multiplied by their weights (only the active ones)."""
        return {}

    def gate_logits(self) -> torch.Tensor | None:
        """The gate logits g: flat (G,) for static gates, (B, G) for input-dependent ones (from the
        last forward); None without learned gates. Default: the ``gate`` group's parameters."""
        gates = self.param_groups().get("gate", [])
        if not gates:
            return None
        return torch.cat([p.reshape(-1) for p in gates])

    def gate_values(self) -> torch.Tensor | None:
        """The gate activations σ(g/T) the forward applies, laid out as :meth:`gate_logits`."""
        gates = self.param_groups().get("gate", [])
        if not gates:
            return None
        return torch.cat([self.gate_activation(p).reshape(-1) for p in gates])

    def gate_states(self) -> torch.Tensor | None:
        """σ(g) of the gate logits, the temperature left out: what the gates have learned, which the
        diagnostics and the gate artifacts report (an annealed temperature alone moves nothing)."""
        logits = self.gate_logits()
        return None if logits is None else torch.sigmoid(logits)

    def swappable_gates(self) -> dict[str, torch.Tensor]:
        """The learned static gate logits by kind: ``token`` (per-token gates, (n,) or one row per layer
        (layers, n)) and ``depth`` (one insertion gate per deep layer). Empty for a method without
        learned gates, or whose gates are computed from the input (a head's weights are no logits)."""
        return {}

    @contextlib.contextmanager
    def swapped_gates(self, strategy: str, seed: int = 0) -> Iterator[None]:
        """Inside, the learned gates are replaced as ``strategy`` (one of :data:`GATE_SWAPS`) says:
        ``fixed`` all on, ``random`` logits ±2 + N(0, 0.5) drawn from a generator seeded with ``seed``
        (depth gates included), ``per_layer`` each layer's token gates set to their mean logit,
        ``per_token`` the learned gates as they are, ``noise`` the learned gates plus N(0, 0.5²) noise
        from that generator (the sensitivity test). Values are written into the gate tensors in place
        and restored bit for bit on exit: the Parameter objects, which the optimizer holds, stay."""
        gates = self.swappable_gates()
        saved = {kind: t.detach().clone() for kind, t in gates.items()}
        generator = torch.Generator().manual_seed(seed)
        try:
            with torch.no_grad():
                for kind, t in gates.items():
                    t.copy_(swapped_logits(strategy, kind, t, generator))
            yield
        finally:
            with torch.no_grad():
                for kind, t in gates.items():
                    t.copy_(saved[kind])

    def metrics(self) -> dict[str, torch.Tensor]:
        """Method-specific metrics for the diagnostics row (device scalars), e.g. ``gate/depth_prob/d3``."""
        return {}

    # ---- training-loop hooks (no-ops unless a method needs them, like ADAPT's pruning) ---------------

    def init_from_data(self, images: torch.Tensor) -> None:
        """Before the first step, for methods that prompt the vision tower: some training images."""

    def on_train_start(self, total_steps: int, steps_per_epoch: int) -> None:
        """Called once before the first step with the trial's step budget and epoch length."""

    def on_backward(self, step: int) -> None:
        """After ``backward()`` of ``step`` (1-based), before the optimizer step: gradients are there."""

    def on_step(self, step: int, total_steps: int) -> None:
        """After the optimizer step of ``step``."""

    def on_epoch_end(self, step: int) -> None:
        """At each epoch boundary (and the last step)."""

    def save_artifacts(self, folder: Path) -> None:
        """Write method artifacts (masks, schedules) into ``folder``; they land in the trial run."""

    def images(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        """Step-aware images to log (key → [(step, RGB uint8 array)]), e.g. ADAPT's masks."""
        return {}

    def finalize(self) -> dict[str, float]:
        """After training: make the model final (e.g. compact pruned prompts); final metrics to log."""
        return {}


def cosine(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, C) cosines of normalized image features (B, E) with text features (C, E), or with each
    image's own text features (B, C, E)."""
    return image @ text.t() if text.dim() == 2 else torch.einsum("bd,bcd->bc", image, text)
