"""Datasets and the few-shot base-to-novel protocol (CoOp / CoCoOp / MaPLe).

K shots per class are drawn with a seed from the training pool, validation gets min(K, 4) shots,
base classes are the first ceil(n/2) labels and novel classes the rest; training sees base classes
only, and evaluation reports base and novel test accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mlgate.clip import ImageNorm
from mlgate.errors import MlgateError
from mlgate.folders import COOP_DATASETS, ImageSet, read_coop_split, read_image_folder, read_imagenet

BUNDLED_DATASET = "shapes"
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class Split:
    """Images (N, 3, H, W) normalized for the backbone — a tensor, or an :class:`~mlgate.folders.ImageSet`
    that reads files on demand — and global class labels (N,)."""

    images: torch.Tensor | ImageSet
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FewShotData:
    """What one trial trains and evaluates on."""

    name: str
    classnames: list[str]
    base: list[int]
    novel: list[int]
    train: Split
    val: Split
    test_base: Split
    test_novel: Split
    template: str = "a photo of a {}."  # the hand-crafted prompt of zero-shot CLIP on this dataset

    def summary(self) -> dict:
        """The contract's ``mlgate data summary`` object."""
        return {
            "dataset": self.name,
            "n_classes": len(self.classnames),
            "base_classes": [self.classnames[i] for i in self.base],
            "novel_classes": [self.classnames[i] for i in self.novel],
            "splits": {
                "train": len(self.train),
                "val": len(self.val),
                "test_base": len(self.test_base),
                "test_novel": len(self.test_novel),
            },
        }


def split_base_novel(n_classes: int) -> tuple[list[int], list[int]]:
    """Base = the first ceil(n/2) labels, novel = the rest (CoCoOp's subsample_classes)."""
    m = math.ceil(n_classes / 2)
    return list(range(m)), list(range(m, n_classes))


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, ``shots`` training and ``min(shots, 4)`` disjoint validation indices (seeded)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        pool = rng.permutation(np.flatnonzero(labels == c))
        train.append(pool[:shots])
        val.append(pool[shots : shots + min(shots, 4)])
    return np.concatenate(train), np.concatenate(val)


def _subset(images: torch.Tensor, labels: np.ndarray, idx: np.ndarray) -> Split:
    return Split(images[torch.as_tensor(idx)], torch.as_tensor(labels[idx], dtype=torch.long))


def _by_classes(split: Split, classes: list[int]) -> Split:
    keep = torch.isin(split.labels, torch.tensor(classes, dtype=torch.long))
    images = split.images.subset(keep) if isinstance(split.images, ImageSet) else split.images[keep]
    return Split(images, split.labels[keep])


def _to_model_images(gray: np.ndarray, norm: ImageNorm) -> torch.Tensor:
    # (N, h, w) in [0, 1] → (N, 3, S, S) normalized with the backbone's mean/std.
    x = torch.as_tensor(gray, dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=(norm.size, norm.size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _few_shot_data(name: str, classnames: list[str], images: torch.Tensor, labels: np.ndarray,
                   pool_idx: np.ndarray, test_idx: np.ndarray, shots: int, seed: int, subsample: str) -> FewShotData:
    # K shots (and min(K, 4) validation shots) per class from the pool; base/novel split of the labels.
    train_rel, val_rel = few_shot_indices(labels[pool_idx], shots, seed)
    train = _subset(images, labels, pool_idx[train_rel])
    val = _subset(images, labels, pool_idx[val_rel])
    test = _subset(images, labels, test_idx)
    base, novel = (list(range(len(classnames))), []) if subsample == "all" else split_base_novel(len(classnames))
    return FewShotData(
        name=name, classnames=list(classnames), base=base, novel=novel,
        train=_by_classes(train, base), val=_by_classes(val, base), test_base=_by_classes(test, base),
        test_novel=_by_classes(test, novel if novel else []),
    )


def _files_data(name: str, classnames: list[str], items: dict[str, list], norm: ImageNorm, shots: int,
                seed: int, subsample: str, template: str) -> FewShotData:
    # Few-shot draw from the dataset's train list (and min(K, 4) from its val list, else the train rest).
    def as_split(rows: list) -> Split:
        return Split(ImageSet([p for p, _ in rows], norm), torch.tensor([c for _, c in rows], dtype=torch.long))

    train_labels = np.array([c for _, c in items["train"]])
    train_idx, val_idx = few_shot_indices(train_labels, shots, seed)
    train = as_split([items["train"][i] for i in train_idx])
    if items.get("val"):
        val_labels = np.array([c for _, c in items["val"]])
        val_pick, _ = few_shot_indices(val_labels, min(shots, 4), seed)
        val = as_split([items["val"][i] for i in val_pick])
    else:
        val = as_split([items["train"][i] for i in val_idx])
    test = as_split(items["test"])
    base, novel = (list(range(len(classnames))), []) if subsample == "all" else split_base_novel(len(classnames))
    data = FewShotData(name=name, classnames=classnames, base=base, novel=novel, train=_by_classes(train, base),
                       val=_by_classes(val, base), test_base=_by_classes(test, base),
                       test_novel=_by_classes(test, novel), template=template)
    return data


def load_shapes_dataset(shots: int, seed: int, norm: ImageNorm, subsample: str = "base") -> FewShotData:
    """The bundled task: 20 colour–shape classes (``mlgate.shapes``). The 10 base classes are
    combinations the embedded CLIP saw in pretraining, the 10 novel ones combinations it never saw.
    40 images per class form the few-shot pool and 50 the test set (fixed; the draw follows ``seed``)."""
    from mlgate.shapes import CLASSNAMES, task_images

    pool_per_class, test_per_class = 40, 50
    raw, labels = task_images(pool_per_class + test_per_class, seed=12345)
    x = torch.as_tensor(raw).permute(0, 3, 1, 2)
    if x.shape[-1] != norm.size:
        x = F.interpolate(x, size=(norm.size, norm.size), mode="bilinear", align_corners=False)
    images = (x - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1)
    per = pool_per_class + test_per_class
    offsets = np.arange(len(CLASSNAMES))[:, None] * per
    pool_idx = (offsets + np.arange(pool_per_class)).ravel()
    test_idx = (offsets + np.arange(pool_per_class, per)).ravel()
    return _few_shot_data("shapes", CLASSNAMES, images, labels, pool_idx, test_idx, shots, seed, subsample)


def load_digits_dataset(shots: int, seed: int, norm: ImageNorm, subsample: str = "base") -> FewShotData:
    """scikit-learn's 8×8 digits (1,797 images, 10 classes) under the few-shot protocol.

    The pool/test split is fixed (half of each class each); the few-shot draw follows ``seed``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    images = _to_model_images(digits.images / 16.0, norm)
    fixed = np.random.default_rng(0)
    pool, test = [], []
    for c in range(10):
        idx = fixed.permutation(np.flatnonzero(labels == c))
        pool.append(idx[: len(idx) // 2])
        test.append(idx[len(idx) // 2 :])
    pool_idx, test_idx = np.concatenate(pool), np.concatenate(test)
    return _few_shot_data("digits", DIGIT_NAMES, images, labels, pool_idx, test_idx, shots, seed, subsample)


DATASETS = {"shapes": load_shapes_dataset, "digits": load_digits_dataset}


def dataset_names() -> list[str]:
    """Every dataset name ``data.name`` accepts."""
    return sorted([*DATASETS, *COOP_DATASETS, "imagenet", "imagefolder"])


def load_dataset(name: str, shots: int, seed: int, norm: ImageNorm, subsample: str = "base",
                 root: str | None = None) -> FewShotData:
    """The few-shot splits of dataset ``name`` prepared for a backbone's image size and normalization.
    ``root`` is the folder holding the dataset's own folder (bundled datasets need none)."""
    if name in DATASETS:
        return DATASETS[name](shots=shots, seed=seed, norm=norm, subsample=subsample)
    if name in COOP_DATASETS:
        classnames, items, template = read_coop_split(name, root)
        return _files_data(name, classnames, items, norm, shots, seed, subsample, template)
    if name == "imagenet":
        classnames, items = read_imagenet(root)
        return _files_data(name, classnames, items, norm, shots, seed, subsample, "a photo of a {}.")
    if name == "imagefolder":
        classnames, items = read_image_folder(root)
        return _files_data(name, classnames, items, norm, shots, seed, subsample, "a photo of a {}.")
    raise MlgateError(f"data.name: unknown dataset {name!r}; valid: {', '.join(dataset_names())}.")
