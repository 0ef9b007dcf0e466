"""Datasets through torchvision's classes (``data.source: torchvision``), with ``download`` when allowed.

torchvision knows where each dataset lives under ROOT and how to fetch it; mlgate only takes the file
list and labels from it and reads the images itself (lazily, with the backbone's preprocessing), so the
few-shot protocol, the cache and the augmentation are the same as for the CoOp layout.

Where torchvision has no validation split, 20% of each class of the training split is held out; where it
has no split at all (EuroSAT, Caltech101, SUN397), each class is split 50/20/30 into train/val/test as
CoOp's ``read_and_split_data`` does, with a fixed seed. These are not CoOp's ``split_zhou`` files: for
numbers comparable with the papers, use the CoOp layout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlgate.errors import MlgateError
from mlgate.data.layouts import AIRCRAFT_TEMPLATE, COOP_DATASETS, Listing, clean_classname

Items = list[tuple[Path, int]]

# Caltech101's folder names CoOp renames; Faces_easy duplicates Faces and is dropped, as CoOp does.
CALTECH_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


def _split_by_class(items: Items, fractions: tuple[float, ...], seed: int = 1) -> list[Items]:
    # Per class, a seeded shuffle cut into len(fractions) parts (the last takes the rest).
    rng = np.random.default_rng(seed)
    parts: list[Items] = [[] for _ in fractions]
    labels = np.array([c for _, c in items])
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.round(np.cumsum(fractions[:-1]) * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, bounds)):
            part.extend(items[i] for i in chunk)
    return parts


def _pairs(files: list[Any], labels: list[int]) -> Items:
    return [(Path(f), int(y)) for f, y in zip(files, labels)]


def _eurosat(tv: Any, root: str, download: bool) -> tuple[list[str], dict[str, Items]]:
    ds = tv.EuroSAT(root, download=download)
    train, val, test = _split_by_class(_pairs([p for p, _ in ds.samples], ds.targets), (0.5, 0.2, 0.3))
    return [clean_classname(c) for c in ds.classes], {"train": train, "val": val, "test": test}


def _caltech101(tv: Any, root: str, download: bool) -> tuple[list[str], dict[str, Items]]:
    ds = tv.Caltech101(root, target_type="category", download=download)
    folder = Path(ds.root) / "101_ObjectCategories"
    keep = [c for c in ds.categories if c != "Faces_easy"]
    relabel = {ds.categories.index(c): i for i, c in enumerate(keep)}
    items = [(folder / ds.categories[y] / f"image_{i:04d}.jpg", relabel[y])
             for i, y in zip(ds.index, ds.y) if y in relabel]
    train, val, test = _split_by_class(items, (0.5, 0.2, 0.3))
    return [clean_classname(CALTECH_NAMES.get(c, c)) for c in keep], {"train": train, "val": val, "test": test}


def _sun397(tv: Any, root: str, download: bool) -> tuple[list[str], dict[str, Items]]:
    ds = tv.SUN397(root, download=download)
    train, val, test = _split_by_class(_pairs(ds._image_files, ds._labels), (0.5, 0.2, 0.3))
    # 'apartment_building/outdoor' → 'outdoor apartment building' (CoOp puts the qualifier first).
    names = [clean_classname(" ".join(reversed(c.split("/")))) for c in ds.classes]
    return names, {"train": train, "val": val, "test": test}


def _files(ds: Any) -> Items:
    # Most of torchvision's classes keep their file list and labels side by side.
    return _pairs(ds._image_files, ds._labels)


def _with_splits(cls: str, train: str, test: str, val: str | None,
                 items_of: Callable[[Any], Items] = _files) -> Callable[[Any, str, bool], tuple[list[str], dict[str, Items]]]:
    """A reader for torchvision class ``cls`` built per split; without a val split, 20% of train per class."""

    def read(tv: Any, root: str, download: bool) -> tuple[list[str], dict[str, Items]]:
        built = {part: getattr(tv, cls)(root, split=split, download=download)
                 for part, split in (("train", train), ("test", test), ("val", val)) if split}
        items = {part: items_of(ds) for part, ds in built.items()}
        if "val" not in items:
            items["train"], items["val"] = _split_by_class(items["train"], (0.8, 0.2))
        return [clean_classname(c) for c in built["train"].classes], items

    return read


READERS: dict[str, tuple[Callable[[Any, str, bool], tuple[list[str], dict[str, Items]]], str]] = {
    # data.name: (reader, the folder torchvision expects under ROOT)
    "eurosat": (_eurosat, "eurosat/2750"),
    "caltech101": (_caltech101, "caltech101/101_ObjectCategories"),
    "dtd": (_with_splits("DTD", "train", "test", "val"), "dtd/dtd"),
    "oxford_flowers": (_with_splits("Flowers102", "train", "test", "val"), "flowers-102"),
    "oxford_pets": (_with_splits("OxfordIIITPet", "trainval", "test", None, lambda d: _pairs(d._images, d._labels)),
                    "oxford-iiit-pet"),
    "food101": (_with_splits("Food101", "train", "test", None), "food-101"),
    "fgvc_aircraft": (_with_splits("FGVCAircraft", "train", "test", "val"), "fgvc-aircraft-2013b"),
    "stanford_cars": (_with_splits("StanfordCars", "train", "test", None, lambda d: _pairs(*zip(*d._samples))),
                      "stanford_cars"),
    "sun397": (_sun397, "SUN397"),
}


def template_of(name: str) -> str:
    """The CoOp prompt template of a dataset."""
    return AIRCRAFT_TEMPLATE if name == "fgvc_aircraft" else COOP_DATASETS[name].template


def read_torchvision(name: str, root: str | None, download: bool) -> Listing:
    """``name`` through torchvision's dataset class under ``root`` (downloaded there if ``download``)."""
    import torchvision.datasets as tv

    if name not in READERS:
        raise MlgateError(f"data.source: torchvision has no {name!r}; it serves {', '.join(sorted(READERS))} "
                          "(use source 'coop' for the others).")
    reader, expected = READERS[name]
    if root is None:
        raise MlgateError(f"data.root: {name} from torchvision needs data.root, the folder that holds {expected}/ "
                          "(or where it may be downloaded, with data.download: true).")
    if download:
        Path(root).mkdir(parents=True, exist_ok=True)
    try:
        classnames, items = reader(tv, root, download)
    except (RuntimeError, ValueError) as exc:
        if "not found" not in str(exc) and "corrupted" not in str(exc):  # e.g. StanfordCars' dead download URL
            raise MlgateError(f"data: torchvision cannot provide {name} under {root} ({exc}); use the CoOp "
                              "layout (data.source: coop) with the files in place.") from None
        hint = ("the download did not complete" if download else
                "set data.download: true to let torchvision fetch it there")
        raise MlgateError(f"data.root: torchvision found no {name} at {Path(root) / expected} ({exc}); "
                          f"{hint}, or point data.root at the folder that holds {expected}/.") from None
    except OSError as exc:  # a failed download, or an unreadable annotation file
        raise MlgateError(f"data: torchvision could not read or download {name} under {root} ({exc}).") from None
    return Listing(classnames, items, template_of(name), Path(root) / expected.split("/")[0])
