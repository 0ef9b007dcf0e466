"""The datasets ``data.name`` accepts: how each is read and how many classes it has.

The spec validates names against :data:`DATASETS` (and checks ADAPT's pruning schedules with its class
counts, before anything is loaded); ``mlgate.data.load_dataset`` reads a dataset the way its entry says.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    reader: str  # bundled | coop (CoOp's split_zhou layout) | fgvc_aircraft | imagenet | imagefolder
    classes: int | None  # None: known once read (an ImageFolder)
    torchvision: bool = False  # also readable through torchvision's classes (data.source: torchvision)


DATASETS: dict[str, DatasetInfo] = {
    "shapes": DatasetInfo("bundled", 20),
    "digits": DatasetInfo("bundled", 10),
    "eurosat": DatasetInfo("coop", 10, torchvision=True),
    "caltech101": DatasetInfo("coop", 100, torchvision=True),
    "dtd": DatasetInfo("coop", 47, torchvision=True),
    "oxford_pets": DatasetInfo("coop", 37, torchvision=True),
    "oxford_flowers": DatasetInfo("coop", 102, torchvision=True),
    "food101": DatasetInfo("coop", 101, torchvision=True),
    "stanford_cars": DatasetInfo("coop", 196, torchvision=True),
    "sun397": DatasetInfo("coop", 397, torchvision=True),
    "ucf101": DatasetInfo("coop", 101),
    "fgvc_aircraft": DatasetInfo("fgvc_aircraft", 100, torchvision=True),
    "imagenet": DatasetInfo("imagenet", 1000),
    "imagefolder": DatasetInfo("imagefolder", None),
}
BUNDLED_DATASET = "shapes"


def dataset_names() -> list[str]:
    """Every name ``data.name`` accepts, sorted."""
    return sorted(DATASETS)
