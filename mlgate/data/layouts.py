"""Datasets on disk: the CoOp/Dassl layout with ``split_zhou_*.json`` files (FGVC-Aircraft with its text
splits), ImageNet's CoOp folder layout, and any ImageFolder. Every reader returns a :class:`Listing`
(docs/datasets.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlgate.config.datasets import DATASETS
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


def read_listing(name: str, root: str | None) -> Listing:
    """Dataset ``name`` laid out under ``root`` as its entry in ``mlgate.config.datasets`` says."""
    reader = DATASETS[name].reader
    if reader == "coop":
        return read_coop_split(name, root)
    return {"fgvc_aircraft": read_fgvc_aircraft, "imagenet": read_imagenet, "imagefolder": read_image_folder}[reader](root)
