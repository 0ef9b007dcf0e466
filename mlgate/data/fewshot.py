"""The few-shot base-to-novel protocol (CoOp / CoCoOp / MaPLe).

K shots per class are drawn with a seed from the training pool, validation gets min(K, 4) shots,
base classes are the first ceil(n/2) labels and novel classes the rest; training sees base classes
only, and evaluation reports base and novel test accuracy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlgate.data.images import ImageNorm, ImageSet
from mlgate.data.layouts import Listing


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
        """The object ``mlgate data summary --json`` prints."""
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


def few_shot_data(name: str, classnames: list[str], images: torch.Tensor, labels: np.ndarray,
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


def cache_root() -> Path:
    """mlgate's cache folder ($MLGATE_CACHE_DIR, else ~/.cache/mlgate)."""
    return Path(os.environ.get("MLGATE_CACHE_DIR") or Path.home() / ".cache" / "mlgate")


def _draw_file(listing: Listing, shots: int, seed: int) -> Path:
    # CoOp's place for the draw (ROOT/<dataset>/split_fewshot/), or mlgate's cache where that is read-only.
    name = f"shot_{shots}-seed_{seed}.json"
    folder = listing.folder / "split_fewshot"
    with contextlib.suppress(OSError):  # a read-only dataset mount
        folder.mkdir(exist_ok=True)
    if folder.is_dir() and os.access(folder, os.W_OK):
        return folder / name
    return cache_root() / "fewshot" / hashlib.sha1(str(listing.folder.resolve()).encode()).hexdigest()[:16] / name


def few_shot_draw(listing: Listing, shots: int, seed: int) -> dict[str, list[tuple[Path, int]]]:
    """K training shots per class from the dataset's train list, and min(K, 4) validation shots from its val
    list (else from the rest of train), drawn with ``seed`` once and then read back from
    ``<dataset>/split_fewshot/shot_K-seed_S.json``: every method and trial sees the same images. The file
    records a digest of the lists it was drawn from, so a changed dataset gets a fresh draw."""
    digest = hashlib.sha1(repr([(str(p), c) for part in ("train", "val") for p, c in listing.items[part]]).encode())
    path = _draw_file(listing, shots, seed)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("source_digest") == digest.hexdigest():
                return {part: [(listing.folder / rel, int(c)) for rel, c in saved[part]] for part in ("train", "val")}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass  # unreadable: draw again and overwrite
    train_labels = np.array([c for _, c in listing.items["train"]])
    train_idx, rest_idx = few_shot_indices(train_labels, shots, seed)
    draw = {"train": [listing.items["train"][i] for i in train_idx]}
    if listing.items.get("val"):
        val_pick, _ = few_shot_indices(np.array([c for _, c in listing.items["val"]]), min(shots, 4), seed)
        draw["val"] = [listing.items["val"][i] for i in val_pick]
    else:
        draw["val"] = [listing.items["train"][i] for i in rest_idx]
    record = {"shots": shots, "seed": seed, "source_digest": digest.hexdigest(),
              **{part: [[os.path.relpath(p, listing.folder), c] for p, c in rows] for part, rows in draw.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # atomic: workers drawing at once write the same content
    return draw


def files_data(name: str, listing: Listing, norm: ImageNorm, shots: int, seed: int, subsample: str) -> FewShotData:
    def as_split(rows: list) -> Split:
        return Split(ImageSet([p for p, _ in rows], norm), torch.tensor([c for _, c in rows], dtype=torch.long))

    draw = few_shot_draw(listing, shots, seed)
    train, val, test = as_split(draw["train"]), as_split(draw["val"]), as_split(listing.items["test"])
    n = len(listing.classnames)
    base, novel = (list(range(n)), []) if subsample == "all" else split_base_novel(n)
    return FewShotData(name=name, classnames=listing.classnames, base=base, novel=novel,
                       train=_by_classes(train, base), val=_by_classes(val, base), test_base=_by_classes(test, base),
                       test_novel=_by_classes(test, novel), template=listing.template)
