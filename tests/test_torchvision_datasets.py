"""Datasets through torchvision's classes (data.source: torchvision), on trees the tests write in
torchvision's own layouts. Downloading cannot be tested offline; what is tested is that torchvision's
classes find these trees and that their absence gets an error that names the folder and data.download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlgate.cli import main
from mlgate.model import load_backbone
from mlgate.config.spec import StudySpec
from mlgate.training import train
from tests.conftest import TINY, deep_update


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _summary(capsys, name: str, root: Path, shots: int = 2) -> dict:
    code = main(["data", "summary", "--data", name, "--root", str(root), "--source", "torchvision",
                 "--shots", str(shots), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_dtd_with_its_own_splits(tmp_path, capsys):
    data = tmp_path / "dtd" / "dtd"
    classes = ["banded", "blotchy", "braided"]
    for part, count in (("train", 5), ("val", 2), ("test", 3)):
        lines = []
        for c in classes:
            for i in range(count):
                _image(data / "images" / c / f"{c}_{part}_{i}.jpg", i)
                lines.append(f"{c}/{c}_{part}_{i}.jpg")
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"{part}1.txt").write_text("\n".join(lines) + "\n")
    summary = _summary(capsys, "dtd", tmp_path)
    assert summary["base_classes"] == ["banded", "blotchy"] and summary["novel_classes"] == ["braided"]
    assert summary["splits"] == {"train": 4, "val": 4, "test_base": 6, "test_novel": 3}


def test_oxford_pets_holds_out_validation_from_trainval(tmp_path, capsys):
    base = tmp_path / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    breeds = ["Abyssinian", "american_bulldog", "Bengal", "yorkshire_terrier"]
    for part, count in (("trainval", 10), ("test", 2)):
        lines = []
        for label, breed in enumerate(breeds, 1):
            for i in range(count):
                image_id = f"{breed}_{part}{i}"
                _image(base / "images" / f"{image_id}.jpg", i)
                lines.append(f"{image_id} {label} 1 1")
        (base / "annotations" / f"{part}.txt").write_text("\n".join(lines) + "\n")
    summary = _summary(capsys, "oxford_pets", tmp_path, shots=4)
    assert summary["base_classes"] == ["Abyssinian", "American Bulldog"]
    assert summary["novel_classes"] == ["Bengal", "Yorkshire Terrier"]
    # 20% of trainval per class is validation (2 of 10); training draws 4 shots from the other 8.
    assert summary["splits"] == {"train": 8, "val": 4, "test_base": 4, "test_novel": 4}


def test_eurosat_without_splits_gets_a_fixed_50_20_30_split_and_trains(tmp_path, capsys):
    for c in ["AnnualCrop", "Forest", "SeaLake"]:
        for i in range(10):
            _image(tmp_path / "eurosat" / "2750" / c / f"{c}_{i}.jpg", i)
    summary = _summary(capsys, "eurosat", tmp_path, shots=3)
    assert summary["base_classes"] == ["Annual Crop Land", "Forest"] and summary["novel_classes"] == ["Sea or Lake"]
    assert summary["splits"] == {"train": 6, "val": 4, "test_base": 6, "test_novel": 3}
    assert _summary(capsys, "eurosat", tmp_path, shots=3) == summary  # the split is fixed
    spec = StudySpec.model_validate(deep_update(TINY, {"data": {
        "name": "eurosat", "root": str(tmp_path), "source": "torchvision", "shots": 3, "augment_views": 2},
        "search": {}}))
    assert "acc/hm" in train(spec).final


def test_fgvc_aircraft_and_food101(tmp_path, capsys):
    air = tmp_path / "fgvc-aircraft-2013b" / "data"
    (air / "images").mkdir(parents=True)
    (air / "variants.txt").write_text("707-320\nA300B4\n")
    for part, count in (("train", 3), ("val", 2), ("test", 2)):
        rows = [(f"{v}{part}{i}", name) for v, name in enumerate(["707-320", "A300B4"]) for i in range(count)]
        for image_id, _ in rows:
            _image(air / "images" / f"{image_id}.jpg", 0)
        (air / f"images_variant_{part}.txt").write_text("".join(f"{i} {n}\n" for i, n in rows))
    summary = _summary(capsys, "fgvc_aircraft", tmp_path)
    assert summary["base_classes"] == ["707-320"] and summary["novel_classes"] == ["A300B4"]
    assert summary["splits"] == {"train": 2, "val": 2, "test_base": 2, "test_novel": 2}

    food = tmp_path / "food-101"
    (food / "meta").mkdir(parents=True)
    for part, count in (("train", 5), ("test", 2)):
        meta = {c: [f"{c}/{part}{i}" for i in range(count)] for c in ["apple_pie", "baby_back_ribs"]}
        for rels in meta.values():
            for rel in rels:
                _image(food / "images" / f"{rel}.jpg", 1)
        (food / "meta" / f"{part}.json").write_text(json.dumps(meta))
    summary = _summary(capsys, "food101", tmp_path)
    assert summary["base_classes"] == ["apple pie"] and summary["novel_classes"] == ["baby back ribs"]
    norm = load_backbone("mlgate-tiny", None).image_norm
    from mlgate.data import load_dataset

    assert load_dataset("food101", 2, 1, norm, root=str(tmp_path), source="torchvision").template == \
        "a photo of {}, a type of food."


def test_missing_dataset_names_the_folder_and_the_download_switch(tmp_path, capsys):
    assert main(["data", "summary", "--data", "dtd", "--root", str(tmp_path), "--source", "torchvision"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "dtd" / "dtd") in err and "data.download: true" in err and "Traceback" not in err
    assert main(["data", "summary", "--data", "imagenet", "--root", str(tmp_path), "--source", "torchvision"]) == 2
    assert "torchvision has no 'imagenet'" in capsys.readouterr().err
    assert main(["data", "summary", "--data", "dtd", "--root", str(tmp_path), "--download"]) == 2
    assert "--source torchvision" in capsys.readouterr().err
    # torchvision itself refuses some downloads (StanfordCars' URL is gone): said in one paragraph.
    assert main(["data", "summary", "--data", "stanford_cars", "--root", str(tmp_path), "--source", "torchvision",
                 "--download"]) == 2
    err = capsys.readouterr().err
    assert "cannot provide stanford_cars" in err and "data.source: coop" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="data.download needs data.source: torchvision"):
        StudySpec.model_validate(deep_update(TINY, {"data": {"name": "dtd", "download": True}}))
