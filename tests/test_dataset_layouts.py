"""Datasets on disk, on small data the test makes: the CoOp layout with split_zhou JSON, and ImageFolder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from mlgate.cli import main
from mlgate.model import load_backbone
from mlgate.data import load_dataset
from mlgate.errors import MlgateError
from mlgate.data.shapes import COLORS, render
from mlgate.config.spec import StudySpec
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


def test_image_files_load_one_step_ahead_with_the_crops_of_direct_reads(eurosat_root):
    # Training reads image files in parallel threads and, for a GPU, the next step's batch while this
    # one trains.
    # The crops and flips come from (seed, number of the draw), so they are those of reading the same
    # batches one by one, whichever thread loads which file; the labels follow the indices.
    from mlgate.data import Split
    from mlgate.training.batches import batch_indices, step_batches

    clip = load_backbone("mlgate-tiny", "mlgate")
    train_split = load_dataset("eurosat", 4, 1, clip.image_norm, root=str(eurosat_root)).train
    augmented = Split(train_split.images.augmented(seed=5), train_split.labels)
    indices = list(batch_indices(torch.Generator().manual_seed(0), len(augmented), 6, 4, torch.device("cpu")))
    batches = step_batches(augmented, iter(indices), torch.device("cpu"), ahead=True)  # (a GPU's default)
    first = next(batches)
    assert augmented.images._draws == 12  # the second step's batch is already loading
    direct = train_split.images.augmented(seed=5)
    for idx, (images, labels) in zip(indices, [first, *batches], strict=True):
        torch.testing.assert_close(images, direct[idx])
        torch.testing.assert_close(labels, train_split.labels[idx])
    assert not torch.allclose(first[0], train_split.images[indices[0]])  # augmented, not the test view
    on_cpu = Split(train_split.images.augmented(seed=5), train_split.labels)
    next(step_batches(on_cpu, iter(indices), torch.device("cpu")))
    assert on_cpu.images._draws == 6  # on the CPU, no batch loads beside a training step


def test_fgvc_aircraft_text_splits(tmp_path, capsys):
    base = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(variants) + "\n")
    for part, count in (("train", 4), ("val", 2), ("test", 3)):
        lines = []
        for label, variant in enumerate(variants):
            for i in range(count):
                image_id = f"{label}{part[:2]}{i:03d}"
                _image(base / "images" / f"{image_id}.jpg", list(COLORS)[label], i)
                lines.append(f"{image_id} {variant}")
        (base / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    assert main(["data", "summary", "--data", "fgvc_aircraft", "--root", str(tmp_path), "--shots", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["base_classes"] == ["707-320", "A300B4"] and summary["novel_classes"] == ["Cessna 172"]
    assert summary["splits"] == {"train": 4, "val": 4, "test_base": 6, "test_novel": 3}
    data = load_dataset("fgvc_aircraft", 2, 1, load_backbone("mlgate-tiny", None).image_norm, root=str(tmp_path))
    assert data.template == "a photo of a {}, a type of aircraft."
    (base / "images_variant_test.txt").write_text("0te000 Boeing 999\n")
    assert main(["data", "summary", "--data", "fgvc_aircraft", "--root", str(tmp_path)]) == 2
    assert "'Boeing 999' is not in" in capsys.readouterr().err


def test_few_shot_draw_is_cached_beside_the_dataset(eurosat_root):
    norm = load_backbone("mlgate-tiny", None).image_norm
    first = load_dataset("eurosat", 4, 1, norm, root=str(eurosat_root))
    saved_path = eurosat_root / "eurosat" / "split_fewshot" / "shot_4-seed_1.json"
    saved = json.loads(saved_path.read_text())
    assert len(saved["train"]) == 16 and len(saved["val"]) == 8  # 4 shots and min(4, 4) val shots × 4 classes
    base_rows = [eurosat_root / "eurosat" / rel for rel, label in saved["train"] if label < 2]
    assert first.train.images.paths == base_rows  # the base classes' shots train; the file holds all classes
    # The file is what later loads read: edit the draw and the next load follows it.
    saved["train"] = [row for row in saved["train"] if row[1] != 0] + [saved["train"][0]] * 4
    saved_path.write_text(json.dumps(saved))
    again = load_dataset("eurosat", 4, 1, norm, root=str(eurosat_root))
    assert again.train.images.paths.count(first.train.images.paths[0]) == 4
    # A changed dataset (another split file) gets a fresh draw.
    split_file = eurosat_root / "eurosat" / "split_zhou_EuroSAT.json"
    split = json.loads(split_file.read_text())
    split["train"] = split["train"][1:]
    split_file.write_text(json.dumps(split))
    fresh = load_dataset("eurosat", 4, 1, norm, root=str(eurosat_root))
    assert fresh.train.images.paths.count(first.train.images.paths[0]) <= 1


def test_frozen_feature_methods_train_on_cached_augmented_views(eurosat_root):
    from mlgate.training.features import frozen_features
    from mlgate.training import load_data

    spec = StudySpec.model_validate(deep_update(TINY, {
        "data": {"name": "eurosat", "root": str(eurosat_root), "augment_views": 3}, "search": {}}))
    clip = load_backbone("mlgate-tiny", "mlgate")
    data = load_data(spec, clip)
    splits = frozen_features(clip, data, spec, torch.device("cpu"))
    n = len(data.train)
    assert splits["train"].images.shape == (3 * n, clip.model.visual.output_dim)
    assert torch.equal(splits["train"].labels, data.train.labels.repeat(3))
    views = splits["train"].images.view(3, n, -1)
    assert not torch.allclose(views[0], views[1]) and not torch.allclose(views[1], views[2])
    test_view = clip.encode_image(data.train.images[0:n]).float()
    assert not torch.allclose(views[0], test_view, atol=1e-4)  # augmented, not the centre crop
    # Each view is cached on its own: a second pass reads the same features back.
    torch.testing.assert_close(frozen_features(clip, data, spec, torch.device("cpu"))["train"].images,
                               splits["train"].images)
    no_aug = spec.model_copy(update={"data": spec.data.model_copy(update={"augment": False})})
    torch.testing.assert_close(frozen_features(clip, data, no_aug, torch.device("cpu"))["train"].images, test_view)
