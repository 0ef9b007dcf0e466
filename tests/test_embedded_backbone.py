"""The embedded pretrained backbone and the bundled shapes task (what the default study stands on)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

import mlgate.model.backbone as backbone_module
from mlgate.cli import main
from mlgate.model.backbone import embedded_weights_info
from mlgate.model import load_backbone
from mlgate.data import load_dataset
from mlgate.errors import MlgateError
from mlgate.config.spec import StudySpec
from mlgate.training import train
from mlgate.model.zeroshot import evaluate_zero_shot


@pytest.fixture(scope="module")
def zero_shot():
    clip = load_backbone("mlgate-tiny", "mlgate")
    return evaluate_zero_shot(clip, load_dataset("shapes", 16, 1, clip.image_norm))


def test_weights_load_offline_and_match_their_checksum():
    path = backbone_module.WEIGHTS_DIR / "mlgate-tiny.pt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == embedded_weights_info()["sha256"]
    assert path.stat().st_size < 5_000_000  # a few MB at most
    clip = load_backbone("mlgate-tiny", "mlgate")
    assert clip.name == "mlgate-tiny" and not any(p.requires_grad for p in clip.model.parameters())


def test_a_corrupted_weights_file_is_refused(tmp_path, monkeypatch):
    for name in ("mlgate-tiny.pt", "mlgate-tiny.json"):
        shutil.copy(backbone_module.WEIGHTS_DIR / name, tmp_path / name)
    with open(tmp_path / "mlgate-tiny.pt", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    monkeypatch.setattr(backbone_module, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(MlgateError, match="checksum"):
        load_backbone("mlgate-tiny", "mlgate")
    with pytest.raises(MlgateError, match="mlgate-tiny"):
        load_backbone("ViT-B-16", "mlgate")


def test_zero_shot_is_well_above_chance_on_base_and_novel(zero_shot):
    chance = 100 / 10  # 10 base and 10 novel classes
    assert zero_shot["acc_base"] >= 2 * chance
    assert zero_shot["acc_novel"] >= 2 * chance  # novel colour-shape pairs were never seen as such


def test_short_coop_run_raises_base_accuracy_above_zero_shot(zero_shot):
    spec = StudySpec.model_validate({
        "method": {"name": "coop", "gate": {"enabled": False}},
        "train": {"steps": 60, "batch_size": 32, "eval_interval": 60, "optimizer": {"lr": 0.02}},
    })
    outcome = train(spec)
    assert outcome.final["acc/base"] > zero_shot["acc_base"] + 2.0


def test_eval_and_data_summary_commands(capsys, zero_shot):
    assert main(["eval", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["acc_base"] == pytest.approx(zero_shot["acc_base"])
    assert set(result) >= {"acc_base", "acc_novel", "acc_hm"}
    assert main(["data", "summary", "--shots", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_classes"] == 20 and summary["base_classes"][0] == "red circle"
    assert summary["novel_classes"][0] == "blue circle"
    assert summary["splits"] == {"train": 40, "val": 40, "test_base": 500, "test_novel": 500}
    assert main(["data", "summary", "--data", "cifar"]) == 2
    assert "unknown dataset 'cifar'" in capsys.readouterr().err


def test_a_local_checkpoint_loads_back_and_a_missing_one_is_named(tmp_path, capsys):
    import torch

    torch.manual_seed(3)
    random_model = load_backbone("mlgate-tiny", None)  # random init, as any open_clip model
    path = tmp_path / "checkpoint.pt"
    torch.save(random_model.model.state_dict(), path)
    loaded = load_backbone("mlgate-tiny", str(path))
    for (name, a), (_, b) in zip(random_model.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    with pytest.raises(MlgateError, match="backbone.pretrained: could not load weights .*missing.pt"):
        load_backbone("mlgate-tiny", str(tmp_path / "missing.pt"))
    assert main(["eval", "--pretrained", str(path), "--json"]) == 0  # the local file through the CLI
    assert 0 <= json.loads(capsys.readouterr().out)["acc_base"] <= 100


def test_a_backbone_loaded_again_is_a_fresh_copy_and_leaves_the_generator_where_a_first_load_does():
    import torch

    backbone_module._LOADED.__init__()  # nothing loaded yet in this process
    torch.manual_seed(7)
    first = load_backbone("mlgate-tiny", "mlgate")
    after_first = torch.get_rng_state()
    torch.manual_seed(7)
    again = load_backbone("mlgate-tiny", "mlgate")
    assert torch.equal(torch.get_rng_state(), after_first)  # prompt and gate init draw the same values
    assert again.model is not first.model and again.tokenizer is first.tokenizer
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    torch.manual_seed(8)  # a generator state not seen before: created again, and remembered
    load_backbone("mlgate-tiny", "mlgate")
    assert len(backbone_module._LOADED.rng_after) == 2


def test_the_bundled_datasets_load_the_same_every_time():
    import torch

    norm = load_backbone("mlgate-tiny", None).image_norm
    for name in ("shapes", "digits"):
        a, b = load_dataset(name, 4, 1, norm), load_dataset(name, 4, 1, norm)
        for split in ("train", "val", "test_base", "test_novel"):
            assert torch.equal(getattr(a, split).images, getattr(b, split).images)
            assert torch.equal(getattr(a, split).labels, getattr(b, split).labels)
        a.train.images.add_(1.0)  # a trial's splits are its own
        assert not torch.equal(load_dataset(name, 4, 1, norm).train.images, a.train.images)
