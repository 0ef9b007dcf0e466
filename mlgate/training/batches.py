"""Each step's batch: indices drawn ahead in blocks, image files read in threads (and ahead on a GPU)."""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch

from mlgate.data import Split
from mlgate.data.images import ImageSet, PendingBatch


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
