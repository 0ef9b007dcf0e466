"""Datasets on disk: the CoOp/Dassl layout with ``split_zhou_*.json`` files (FGVC-Aircraft with its
text splits), ImageNet's CoOp folder layout, and any ImageFolder. Every reader returns a :class:`Listing`.

Images are loaded lazily (an :class:`ImageSet` reads a batch of files when indexed, in parallel
threads), resized on the short side and centre-cropped to the backbone's size with its normalization,
as the references test.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlgate.clip import ImageNorm
from mlgate.errors import MlgateError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class Listing:
    """What a dataset on disk holds: readable class names (by label), the ``train``/``val``/``test`` items
    as ``(image path, label)`` (``val`` may be empty), the dataset's prompt template, and its own folder
    (where the few-shot draws are cached, as CoOp's ``split_fewshot/``)."""

    classnames: list[str]
    items: dict[str, list[tuple[Path, int]]]
    template: str
    folder: Path


@dataclass(frozen=True)
class CoOpLayout:
    folder: str
    images: str
    split_file: str
    template: str = "a photo of a {}."


# ROOT/<folder>/<images>/... with ROOT/<folder>/<split_file> (CoOp's DATASETS.md).
COOP_DATASETS = {
    "eurosat": CoOpLayout("eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
    "caltech101": CoOpLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "dtd": CoOpLayout("dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
    "oxford_pets": CoOpLayout("oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet."),
    "oxford_flowers": CoOpLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                                 "a photo of a {}, a type of flower."),
    "food101": CoOpLayout("food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
    "stanford_cars": CoOpLayout("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "sun397": CoOpLayout("sun397", "SUN397", "split_zhou_SUN397.json"),
    "ucf101": CoOpLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}."),
}
AIRCRAFT_TEMPLATE = "a photo of a {}, a type of aircraft."
# CoOp's readable names for EuroSAT's folder names.
EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}


def clean_classname(name: str) -> str:
    """Folder and split names as readable text: ``sea_lake`` → ``sea lake``."""
    return EUROSAT_NAMES.get(name, name).replace("_", " ").strip()


_LOADERS: ThreadPoolExecutor | None = None


def _loaders() -> ThreadPoolExecutor:
    # Threads, not processes: PIL decodes and resizes with the GIL released, so a batch's files load
    # in parallel with no pickling, and no forked copy of a process that holds a CUDA context.
    global _LOADERS
    if _LOADERS is None:
        _LOADERS = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="mlgate-images")
    return _LOADERS


class PendingBatch:
    """A batch of image files loading in the background (:meth:`ImageSet.fetch`), each file decoded
    straight into its row of one host buffer (pinned for a GPU)."""

    def __init__(self, batch: torch.Tensor, loads: list[Future], device: torch.device) -> None:
        self._batch, self._loads, self._device = batch, loads, device

    def result(self) -> torch.Tensor:
        """The normalized batch on the set's device (the copy to a GPU does not wait for it)."""
        for load in self._loads:
            load.result()  # (raises what a load raised)
        return self._batch.to(self._device, non_blocking=True)


class ImageSet:
    """Image files read on demand: ``images[idx]`` (a slice, or an index tensor) is a normalized batch,
    its files loaded in parallel; :meth:`fetch` starts the loading and returns before it is done.

    Test-time preprocessing: short-side resize and centre crop. With ``augment`` (training), the
    references' augmentation instead: a random resized crop (scale 0.08–1, aspect 3/4–4/3) and a random
    horizontal flip, each image drawn from a generator seeded by ``seed`` and the number of the draw
    (images drawn from this set so far), so the crops do not depend on which thread loads what.
    """

    def __init__(self, paths: list[Path], norm: ImageNorm, device: torch.device | str = "cpu",
                 augment: bool = False, seed: int = 0) -> None:
        self.paths, self.norm, self.device = list(paths), norm, torch.device(device)
        self.augment, self.seed = augment, seed
        self._draws = 0

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """Identifies the pixels: the files (path, size, mtime) and the preprocessing (for augmented
        views, the seed of their crops and flips: a fresh set's first pass over its files)."""
        view = ("augment", self.seed, "per-draw") if self.augment else ("center",)
        h = hashlib.sha1(repr((self.norm.size, self.norm.mean, self.norm.std, view)).encode())
        for p in self.paths:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.paths, self.norm, device, self.augment, self.seed)

    def subset(self, keep: torch.Tensor) -> ImageSet:
        return ImageSet([p for p, k in zip(self.paths, keep.tolist()) if k], self.norm, self.device,
                        self.augment, self.seed)

    def augmented(self, seed: int) -> ImageSet:
        """The same files with training augmentation."""
        return ImageSet(self.paths, self.norm, self.device, True, seed)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        return self.fetch(idx).result()

    def fetch(self, idx: Any) -> PendingBatch:
        """Start loading ``self[idx]`` (a slice, or host indices) in the background."""
        if isinstance(idx, slice):
            chosen = self.paths[idx]
        else:
            chosen = [self.paths[i] for i in torch.as_tensor(idx).reshape(-1).tolist()]
        first, self._draws = self._draws, self._draws + len(chosen)
        size = self.norm.size
        batch = torch.empty(len(chosen), 3, size, size, pin_memory=self.device.type == "cuda")
        loads = [_loaders().submit(self._load_into, batch[i], path, first + i) for i, path in enumerate(chosen)]
        return PendingBatch(batch, loads, self.device)

    def _load_into(self, row: torch.Tensor, path: Path, draw: int) -> None:
        row.copy_(self._load(path, draw))

    def _center(self, im):
        from PIL import Image

        w, h = im.size
        scale = self.norm.size / min(w, h)
        im = im.resize((max(self.norm.size, round(w * scale)), max(self.norm.size, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - self.norm.size) // 2, (h - self.norm.size) // 2
        return im.crop((left, top, left + self.norm.size, top + self.norm.size))

    def _random_resized_crop(self, im, rng: np.random.Generator):
        from PIL import Image

        box = _crop_box(*im.size, rng)
        if box is None:
            return self._center(im)
        return im.crop(box).resize((self.norm.size, self.norm.size), Image.BICUBIC)

    def _load(self, path: Path, draw: int) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(path) as im:
                if self.augment:
                    rng = np.random.default_rng((self.seed, draw))
                    im = self._random_resized_crop(im.convert("RGB"), rng)
                    if rng.random() < 0.5:
                        im = im.transpose(Image.FLIP_LEFT_RIGHT)
                else:
                    im = self._center(im.convert("RGB"))
                x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        except OSError as exc:
            raise MlgateError(f"data: cannot read image {path} ({exc}).") from None
        mean = torch.tensor(self.norm.mean).view(3, 1, 1)
        std = torch.tensor(self.norm.std).view(3, 1, 1)
        return (x - mean) / std


def _crop_box(w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    # A random area (8%–100%) and aspect ratio (3/4–4/3) that fits the image; None after 10 misses.
    for _ in range(10):
        area = w * h * rng.uniform(0.08, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    return None


def read_coop_split(name: str, root: str | None) -> Listing:
    """A CoOp-layout dataset: ``ROOT/<folder>/<images>/...`` listed by ``ROOT/<folder>/split_zhou_*.json``."""
    layout = COOP_DATASETS[name]
    if root is None:
        raise MlgateError(f"data.root: {name} needs --root/data.root, the folder that holds "
                          f"{layout.folder}/{layout.split_file}.")
    base = Path(root) / layout.folder
    split_path = base / layout.split_file
    if not split_path.is_file():
        raise MlgateError(f"data.root: no {split_path}; expected the CoOp layout ROOT/{layout.folder}/"
                          f"{layout.images + '/' if layout.images else ''}... with ROOT/{layout.folder}/"
                          f"{layout.split_file} (see CoOp's DATASETS.md).")
    try:
        split = json.loads(split_path.read_text())
    except json.JSONDecodeError as exc:
        raise MlgateError(f"data.root: {split_path} is not valid JSON ({exc}).") from None
    names: dict[int, str] = {}
    items: dict[str, list[tuple[Path, int]]] = {}
    for part in ("train", "val", "test"):
        rows = split.get(part)
        if not isinstance(rows, list):
            raise MlgateError(f"data.root: {split_path} has no {part!r} list of [path, label, classname].")
        items[part] = []
        for rel, label, classname in rows:
            names.setdefault(int(label), clean_classname(classname))
            items[part].append((base / layout.images / rel, int(label)))
    _check_listed_files(items, split_path)
    return Listing([names[i] for i in sorted(names)], items, layout.template, base)


def _check_listed_files(items: dict[str, list[tuple[Path, int]]], listed_in: Path) -> None:
    missing = [str(p) for part in items.values() for p, _ in part if not p.is_file()][:3]
    if missing:
        raise MlgateError(f"data.root: images listed in {listed_in} are missing, e.g. {', '.join(missing)}.")


def read_fgvc_aircraft(root: str | None) -> Listing:
    """CoOp's FGVC-Aircraft layout: ``ROOT/fgvc_aircraft/images/<id>.jpg``, ``variants.txt`` (one class per
    line, in label order) and ``images_variant_{train,val,test}.txt`` (lines ``<id> <variant>``)."""
    base = Path(root or "") / "fgvc_aircraft"
    variants = base / "variants.txt"
    if root is None or not variants.is_file():
        raise MlgateError(f"data.root: fgvc_aircraft expects ROOT/fgvc_aircraft/images/<id>.jpg, "
                          f"ROOT/fgvc_aircraft/variants.txt and ROOT/fgvc_aircraft/images_variant_{{train,val,test}}.txt"
                          f" (CoOp's DATASETS.md); got {root!r}.")
    classnames = [line.strip() for line in variants.read_text().splitlines() if line.strip()]
    index = {c: i for i, c in enumerate(classnames)}
    items: dict[str, list[tuple[Path, int]]] = {}
    for part in ("train", "val", "test"):
        listing = base / f"images_variant_{part}.txt"
        if not listing.is_file():
            raise MlgateError(f"data.root: no {listing} (lines '<image id> <variant>').")
        items[part] = []
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in index:
                raise MlgateError(f"data.root: {listing}:{number}: variant {variant!r} is not in {variants}.")
            items[part].append((base / "images" / f"{image_id}.jpg", index[variant]))
    _check_listed_files(items, base)
    return Listing(classnames, items, AIRCRAFT_TEMPLATE, base)


def read_imagenet(root: str | None) -> Listing:
    """CoOp's ImageNet layout: ``ROOT/imagenet/images/{train,val}/<wnid>/*`` and
    ``ROOT/imagenet/classnames.txt`` (lines ``<wnid> <class name>``, e.g. ``n01440764 tench``); val serves as val and test."""
    base = Path(root or "") / "imagenet"
    names_file = base / "classnames.txt"
    if root is None or not names_file.is_file() or not (base / "images" / "train").is_dir():
        raise MlgateError(f"data.root: imagenet expects ROOT/imagenet/images/train/<wnid>/*, "
                          f"ROOT/imagenet/images/val/<wnid>/* and ROOT/imagenet/classnames.txt; got {root!r}.")
    wnids, names = [], []
    for line in names_file.read_text().splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            wnids.append(wnid)
            names.append(name.strip() or wnid)
    index = {w: i for i, w in enumerate(wnids)}
    items: dict[str, list[tuple[Path, int]]] = {}
    for part in ("train", "val"):
        folder = base / "images" / part
        items[part] = [(p, index[d.name]) for d in sorted(folder.iterdir()) if d.is_dir() and d.name in index
                       for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES] if folder.is_dir() else []
    if not items["val"]:
        raise MlgateError(f"data.root: no images in {base}/images/val/<wnid>/ (CoOp uses val as the test set; "
                          "its images must be in class folders).")
    items["test"] = items["val"]
    return Listing(names, items, "a photo of a {}.", base)


def read_image_folder(root: str | None) -> Listing:
    """``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (and optionally ``ROOT/val/<class>/*``)."""
    if root is None or not (Path(root) / "train").is_dir() or not (Path(root) / "test").is_dir():
        raise MlgateError(f"data.root: imagefolder expects ROOT/train/<class>/* and ROOT/test/<class>/* "
                          f"(optionally ROOT/val/<class>/*); got {root!r}.")
    classes = sorted(d.name for d in (Path(root) / "train").iterdir() if d.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    items: dict[str, list[tuple[Path, int]]] = {}
    for part in ("train", "val", "test"):
        folder = Path(root) / part
        items[part] = [(p, index[d.name]) for d in sorted(folder.iterdir()) if d.is_dir() and d.name in index
                       for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES] if folder.is_dir() else []
    if not items["train"]:
        raise MlgateError(f"data.root: no images under {root}/train/<class>/.")
    return Listing([clean_classname(c) for c in classes], items, "a photo of a {}.", Path(root))


# Datasets read from files, by ``data.name`` (the CoOp source).
FILE_READERS = {
    **{name: (lambda root, name=name: read_coop_split(name, root)) for name in COOP_DATASETS},
    "fgvc_aircraft": read_fgvc_aircraft,
    "imagenet": read_imagenet,
    "imagefolder": read_image_folder,
}
