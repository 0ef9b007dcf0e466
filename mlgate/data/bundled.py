"""The datasets that ship with mlgate: the procedural ``shapes`` task and scikit-learn's ``digits``."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from mlgate.data.fewshot import FewShotData, few_shot_data
from mlgate.data.images import ImageNorm

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _to_model_images(gray: np.ndarray, norm: ImageNorm) -> torch.Tensor:
    # (N, h, w) in [0, 1] → (N, 3, S, S) normalized with the backbone's mean/std.
    x = torch.as_tensor(gray, dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=(norm.size, norm.size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    return (x - mean) / std


def load_shapes_dataset(shots: int, seed: int, norm: ImageNorm, subsample: str = "base") -> FewShotData:
    """The bundled task: 20 colour–shape classes (``mlgate.shapes``). The 10 base classes are
    combinations the embedded CLIP saw in pretraining, the 10 novel ones combinations it never saw.
    40 images per class form the few-shot pool and 50 the test set (fixed; the draw follows ``seed``)."""
    from mlgate.data.shapes import CLASSNAMES

    images, labels, pool_idx, test_idx = _shapes_images(norm)
    return few_shot_data("shapes", CLASSNAMES, images, labels, pool_idx, test_idx, shots, seed, subsample)


def load_digits_dataset(shots: int, seed: int, norm: ImageNorm, subsample: str = "base") -> FewShotData:
    """scikit-learn's 8×8 digits (1,797 images, 10 classes) under the few-shot protocol.

    The pool/test split is fixed (half of each class each); the few-shot draw follows ``seed``.
    """
    images, labels, pool_idx, test_idx = _digits_images(norm)
    return few_shot_data("digits", DIGIT_NAMES, images, labels, pool_idx, test_idx, shots, seed, subsample)


# Each bundled dataset's fixed images, rendered or read once per process (a few MB at their own size),
# then prepared for the backbone's size and normalization per call.

@functools.lru_cache(maxsize=1)
def _shapes_raw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mlgate.data.shapes import CLASSNAMES, task_images

    pool_per_class, test_per_class = 40, 50
    raw, labels = task_images(pool_per_class + test_per_class, seed=12345)
    per = pool_per_class + test_per_class
    offsets = np.arange(len(CLASSNAMES))[:, None] * per
    pool_idx = (offsets + np.arange(pool_per_class)).ravel()
    test_idx = (offsets + np.arange(pool_per_class, per)).ravel()
    return _read_only(raw, labels, pool_idx, test_idx)


def _shapes_images(norm: ImageNorm) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    raw, labels, pool_idx, test_idx = _shapes_raw()
    x = torch.from_numpy(raw.copy()).permute(0, 3, 1, 2)
    if x.shape[-1] != norm.size:
        x = F.interpolate(x, size=(norm.size, norm.size), mode="bilinear", align_corners=False)
    images = (x - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1)
    return images, labels, pool_idx.copy(), test_idx.copy()


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    fixed = np.random.default_rng(0)
    pool, test = [], []
    for c in range(10):
        idx = fixed.permutation(np.flatnonzero(labels == c))
        pool.append(idx[: len(idx) // 2])
        test.append(idx[len(idx) // 2 :])
    return _read_only(digits.images / 16.0, labels, np.concatenate(pool), np.concatenate(test))


def _digits_images(norm: ImageNorm) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    gray, labels, pool_idx, test_idx = _digits_raw()
    return _to_model_images(gray.copy(), norm), labels, pool_idx.copy(), test_idx.copy()


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


LOADERS = {"shapes": load_shapes_dataset, "digits": load_digits_dataset}
