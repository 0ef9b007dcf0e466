"""Datasets under the few-shot base-to-novel protocol: the bundled ones, the papers' datasets on disk
(CoOp's layouts, or torchvision's classes), and any ImageFolder. :func:`load_dataset` reads a dataset
as its entry in :data:`mlgate.config.datasets.DATASETS` says."""

from __future__ import annotations

import os

from mlgate.config.datasets import DATASETS, dataset_names
from mlgate.data.fewshot import FewShotData, Split, cache_root, files_data
from mlgate.data.images import ImageNorm, ImageSet
from mlgate.errors import MlgateError

__all__ = ["FewShotData", "ImageNorm", "ImageSet", "Split", "cache_root", "dataset_names", "load_dataset"]


def load_dataset(name: str, shots: int, seed: int, norm: ImageNorm, subsample: str = "base",
                 root: str | None = None, source: str = "coop", download: bool = False) -> FewShotData:
    """The few-shot splits of dataset ``name`` prepared for a backbone's image size and normalization.
    ``root`` is the folder holding the dataset's own folder (bundled datasets need none); ``source`` says
    how it is laid out there: CoOp's layout, or torchvision's (which may ``download`` it)."""
    info = DATASETS.get(name)
    if info is None:
        raise MlgateError(f"data.name: unknown dataset {name!r}; valid: {', '.join(dataset_names())}.")
    if info.reader == "bundled":
        from mlgate.data.bundled import LOADERS

        return LOADERS[name](shots=shots, seed=seed, norm=norm, subsample=subsample)
    root = os.path.expanduser(root) if root else root  # '~/data', as CoOp's $DATA
    if source == "torchvision":
        from mlgate.data.torchvision_sets import read_torchvision

        listing = read_torchvision(name, root, download)
    else:
        from mlgate.data.layouts import read_listing

        listing = read_listing(name, root)
    return files_data(name, listing, norm, shots, seed, subsample)
