"""ADAPT's pruning schedule as arithmetic: when it prunes, and whether it reaches ``t_target``.

Torch-free, so spec validation can refuse a schedule that cannot finish before any model is built.
The trainer's :class:`~mlgate.methods.adapt.PruningSchedule` takes its numbers from here too.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlgate.config.datasets import DATASETS

DERIVED_SHARE = 0.8  # a derived n_k finishes pruning within this share of the steps after the warmup


@dataclass(frozen=True)
class PruningPlan:
    """``r_p`` tokens pruned every ``n_k`` steps after ``warmup`` steps, in a trial of ``steps`` steps,
    from ``2 × depth × max_len`` prompt tokens down to ``t_target``."""

    depth: int
    max_len: int
    t_target: int
    steps: int
    warmup: int
    n_k: int
    r_p: int
    derived: bool = False  # n_k (and r_p) derived from the step budget

    @property
    def capacity(self) -> int:
        return 2 * self.depth * self.max_len

    @property
    def excess(self) -> int:
        return max(0, self.capacity - self.t_target)

    @property
    def events_needed(self) -> int:
        return math.ceil(self.excess / self.r_p)

    @property
    def events_available(self) -> int:
        # Steps warmup + n_k, warmup + 2 n_k, ... up to the last one.
        return max(0, self.steps - self.warmup) // self.n_k

    @property
    def reaches(self) -> bool:
        return self.events_available >= self.events_needed

    def problem(self) -> str | None:
        """Why this schedule does not prune to ``t_target`` (with the numbers), or None."""
        if self.t_target >= self.capacity:
            return prunes_nothing(self.depth, self.max_len, self.t_target)
        if self.reaches:
            return None
        after = self.steps - self.warmup
        have = (f"{self.steps} steps after a {self.warmup}-step warmup give {self.events_available}"
                if self.warmup else f"{self.steps} steps give {self.events_available}")
        if after >= self.events_needed:
            best = after // self.events_needed
            fix = f"An n_k of {best} or less finishes" if best > 1 else "Only n_k 1 finishes"
        elif after > 0:
            fix = (f"No n_k finishes at r_p {self.r_p}: r_p {math.ceil(self.excess / after)} at n_k 1 would, as "
                   f"would more steps{' or a shorter warmup' if self.warmup else ''}")
        else:
            fix = "The warmup leaves no step to prune in: shorten it or train longer"
        return (f"ADAPT cannot reach method.t_target {self.t_target}: {self.excess} of its {self.capacity} prompt "
                f"tokens are to be pruned, {self.r_p} per pruning event, which takes {self.events_needed} event{'s' * (self.events_needed != 1)}, "
                f"but {have} at {'the derived ' if self.derived else ''}n_k {self.n_k}. {fix}"
                + ("." if self.derived else " (method.n_k: null derives n_k from the step budget)."))


def prunes_nothing(depth: int, max_len: int, t_target: int) -> str:
    capacity = 2 * depth * max_len
    return (f"method.t_target {t_target} prunes nothing: the prompts hold {capacity} tokens (2 towers x {depth} "
            f"layers x max_len {max_len}); choose a t_target below {capacity}.")


def plan_pruning(depth: int, max_len: int, t_target: int, r_p: int, n_k: int | None, warmup_steps: int,
                 warmup_epochs: float, steps: int, steps_per_epoch: int = 1) -> PruningPlan:
    """The schedule of a trial. Without ``n_k`` it is derived so that pruning finishes within
    ``DERIVED_SHARE`` of the steps after the warmup (pruning more than ``r_p`` per event if need be)."""
    warmup = warmup_steps + round(warmup_epochs * steps_per_epoch)
    derived = n_k is None
    if derived:
        excess = max(0, 2 * depth * max_len - t_target)
        window = max(1, int(DERIVED_SHARE * (steps - warmup)))
        events = max(1, math.ceil(excess / r_p))
        if events > window:  # too few steps for r_p: prune more per event instead
            r_p, events = math.ceil(excess / window), window
        n_k = max(1, window // events)
    return PruningPlan(depth, max_len, t_target, steps, warmup, n_k, r_p, derived)


@functools.cache
def backbone_layers(name: str) -> int | None:
    """Layers both towers of an open_clip model have, from its model-config JSON (mlgate's own configs,
    then open_clip's), read without importing open_clip; None when there is no such file."""
    folders = [Path(__file__).parent.parent / "model" / "configs"]
    found = importlib.util.find_spec("open_clip")
    if found is not None and found.submodule_search_locations:
        folders += [Path(p) / "model_configs" for p in found.submodule_search_locations]
    for folder in folders:
        path = folder / f"{name}.json"
        if path.is_file():
            cfg = json.loads(path.read_text())
            try:
                return min(int(cfg["text_cfg"]["layers"]), int(cfg["vision_cfg"]["layers"]))
            except (KeyError, TypeError, ValueError):
                return None
    return None


def training_images(data: Any) -> int | None:
    """Training images of a spec's ``data`` section (shots × trained classes), for known datasets."""
    info = DATASETS.get(data.name)
    classes = None if info is None else info.classes
    if classes is None:
        return None
    return data.shots * (classes if data.subsample == "all" else math.ceil(classes / 2))


def trial_problem(spec: Any, layers: int | None, n_train: int | None) -> str | None:
    """Why an ADAPT trial config's pruning does not reach its target, given its backbone's layers and its
    training images (None where unknown: then only what the rest determines is checked); None when it
    does, and for other methods."""
    method, train = spec.method, spec.train
    if method.name != "adapt" or layers is None or (method.depth or layers) > layers:
        return None  # (a depth beyond the backbone's layers is reported when the method is built)
    depth = method.depth or layers
    if method.t_target >= 2 * depth * method.max_len:
        return prunes_nothing(depth, method.max_len, method.t_target)
    per_epoch = None if n_train is None else max(1, math.ceil(n_train / train.batch_size))
    if per_epoch is None and (train.steps is None or method.warmup_epochs):
        return None
    steps = train.steps if train.steps is not None else max(1, math.ceil(train.epochs * per_epoch))
    problem = plan_pruning(depth, method.max_len, method.t_target, method.r_p, method.n_k, method.warmup_steps,
                           method.warmup_epochs, steps, per_epoch or 1).problem()
    if problem and (train.steps is None or method.warmup_epochs):  # say where the epochs' steps come from
        problem += (f" ({spec.data.name}: {n_train} training images, {per_epoch} steps an epoch at batch "
                    f"{train.batch_size}.)")
    return problem
