"""Datasets on disk, on small data the test makes: the CoOp layout with split_zhou JSON, and ImageFolder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from mlgate.cli import main
from mlgate.clip import load_backbone
from mlgate.data import load_dataset
from mlgate.errors import MlgateError
from mlgate.shapes import COLORS, render
from mlgate.spec import StudySpec
from mlgate.training import train
from tests.conftest import TINY, deep_update

EUROSAT = ["AnnualCrop", "Forest", "Highway", "SeaLake"]
COLOR_OF = dict(zip(EUROSAT, ["yellow", "green", "white", "blue"]))


def _image(path: Path, color: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = render(color, "square", "large", "center", np.random.default_rng(seed))
    Image.fromarray((pixels * 255).astype(np.uint8)).resize((64, 48)).save(path)


@pytest.fixture
def eurosat_root(tmp_path):
    split = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(EUROSAT):
        for i in range(12):
            rel = f"{cls}/{cls}_{i}.jpg"
            _image(tmp_path / "eurosat" / "2750" / rel, COLOR_OF[cls], label * 100 + i)
            part = "train" if i < 6 else "val" if i < 8 else "test"
            split[part].append([rel, label, cls])
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return tmp_path


def test_coop_layout_summary_and_class_names(eurosat_root, capsys):
    assert main(["data", "summary", "--data", "eurosat", "--root", str(eurosat_root), "--shots", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["base_classes"] == ["Annual Crop Land", "Forest"]
    assert summary["novel_classes"] == ["Highway or Road", "Sea or Lake"]
    assert summary["splits"] == {"train": 8, "val": 4, "test_base": 8, "test_novel": 8}


def test_few_shot_draw_is_reproducible_by_seed(eurosat_root):
    clip = load_backbone("mlgate-tiny", "mlgate")
    a = load_dataset("eurosat", 4, 1, clip.image_norm, root=str(eurosat_root))
    b = load_dataset("eurosat", 4, 1, clip.image_norm, root=str(eurosat_root))
    c = load_dataset("eurosat", 4, 2, clip.image_norm, root=str(eurosat_root))
    assert a.train.images.paths == b.train.images.paths and a.train.images.paths != c.train.images.paths
    batch = a.train.images[0:3]
    assert batch.shape == (3, 3, 32, 32) and abs(batch.mean().item()) < 3  # resized, cropped, normalized


def test_eval_and_training_on_files(eurosat_root, capsys):
    assert main(["eval", "--data", "eurosat", "--root", str(eurosat_root), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["acc_base"] <= 100 and result["acc_hm"] is not None
    for method in ({"name": "coop"}, {"name": "maple"}):  # cached features, and images read per step
        spec = StudySpec.model_validate(deep_update(TINY, {
            "method": method, "data": {"name": "eurosat", "root": str(eurosat_root)}, "search": {}}))
        outcome = train(spec)
        assert "acc/hm" in outcome.final and outcome.history["loss/total"]


def test_image_folder(tmp_path, capsys):
    for part, count in (("train", 6), ("test", 3)):
        for label, cls in enumerate(["red_circle", "blue_square", "green_cross"]):
            for i in range(count):
                _image(tmp_path / part / cls / f"{i}.png", list(COLORS)[label], i)
    assert main(["data", "summary", "--data", "imagefolder", "--root", str(tmp_path), "--shots", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["base_classes"] == ["blue square", "green cross"] and summary["novel_classes"] == ["red circle"]
    assert summary["splits"]["train"] == 4 and summary["splits"]["test_novel"] == 3


def test_layout_errors_say_what_was_expected_where(tmp_path, capsys):
    assert main(["data", "summary", "--data", "eurosat", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "split_zhou_EuroSAT.json" in err and str(tmp_path) in err and "Traceback" not in err
    assert main(["data", "summary", "--data", "eurosat"]) == 2
    assert "data.root" in capsys.readouterr().err
    assert main(["data", "summary", "--data", "imagefolder", "--root", str(tmp_path)]) == 2
    assert "ROOT/train/<class>" in capsys.readouterr().err
    (tmp_path / "eurosat").mkdir()
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(
        {"train": [["Forest/missing.jpg", 0, "Forest"]], "val": [], "test": []}))
    with pytest.raises(MlgateError, match="missing"):
        load_dataset("eurosat", 1, 1, load_backbone("mlgate-tiny", None).image_norm, root=str(tmp_path))


def test_imagenet_layout(tmp_path, capsys):
    wnids = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
    for label, wnid in enumerate(wnids):
        for part, count in (("train", 5), ("val", 3)):
            for i in range(count):
                _image(tmp_path / "imagenet" / "images" / part / wnid / f"{i}.JPEG", list(COLORS)[label], i)
    (tmp_path / "imagenet" / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in wnids.items()))
    assert main(["data", "summary", "--data", "imagenet", "--root", str(tmp_path), "--shots", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["base_classes"] == ["tench", "goldfish"] and summary["novel_classes"] == ["great white shark"]
    assert summary["splits"] == {"train": 4, "val": 4, "test_base": 6, "test_novel": 3}
    assert main(["data", "summary", "--data", "imagenet", "--root", str(tmp_path / "nothing")]) == 2
    assert "classnames.txt" in capsys.readouterr().err


def test_training_augmentation_varies_views_and_is_seeded(eurosat_root):
    clip = load_backbone("mlgate-tiny", "mlgate")
    data = load_dataset("eurosat", 4, 1, clip.image_norm, root=str(eurosat_root))
    plain = data.train.images
    views = [plain.augmented(seed=0)[0:4] for _ in range(2)]
    torch.testing.assert_close(views[0], views[1])  # same seed, same views
    again = plain.augmented(seed=0)
    first, second = again[0:4], again[0:4]
    assert not torch.allclose(first, second)  # a fresh crop and flip on every access
    torch.testing.assert_close(plain[0:4], plain[0:4])  # test-time view is fixed
    assert first.shape == plain[0:4].shape
