"""The papers' studies (studies/paper/) run as shipped, with only the backbone, data root and budget
overridden: the embedded backbone and small CoOp-layout trees the test writes stand in for ViT-B/16 and
the real datasets."""

from __future__ import annotations

import json
from pathlib import Path

from mlgate.cli import main
from mlgate.methods.describe import describe
from mlgate.data.shapes import COLORS
from mlgate.config import load_spec
from tests.test_dataset_layouts import _image
from tests.test_studies_in_mlflow import runs_of

CLASSES = ["alpha", "beta", "gamma", "delta"]


def _coop_tree(root: Path, folder: str, images: str, split_file: str) -> None:
    split = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(CLASSES):
        for i in range(8):
            rel = f"{cls}/{i}.jpg"
            _image(root / folder / images / rel, list(COLORS)[label], label * 10 + i)
            split["train" if i < 4 else "val" if i < 6 else "test"].append([rel, label, cls])
    (root / folder / split_file).write_text(json.dumps(split))


def _imagenet_tree(root: Path) -> None:
    for label, cls in enumerate(CLASSES):
        for part, count in (("train", 4), ("val", 2)):
            for i in range(count):
                _image(root / "imagenet" / "images" / part / f"n0{label}" / f"{i}.JPEG", list(COLORS)[label], i)
    (root / "imagenet" / "classnames.txt").write_text("".join(f"n0{i} {c}\n" for i, c in enumerate(CLASSES)))


def test_table_vi_runs_its_rows_as_variants(workdir, tmp_path):
    root = tmp_path / "data"
    _coop_tree(root, "eurosat", "2750", "split_zhou_EuroSAT.json")
    _coop_tree(root, "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json")
    _imagenet_tree(root)
    overrides = ["backbone.name=mlgate-tiny", "backbone.pretrained=mlgate", f"data.root={root}",
                 "data.shots=2", "data.augment_views=2", "study.n_trials=4", "study.sampler.seed=0"]
    assert main(["run", "paper/gating_table6", *[a for o in overrides for a in ("--set", o)]]) == 0
    _, [study], trials = runs_of("paper_gating_table6")
    assert len(trials) == 4 and all(t.data.tags["mlgate.state"] == "COMPLETE" for t in trials)
    for t in trials:
        variant = t.data.params["variant"]
        assert variant in {"CoOp", "CoOp-gating", "CoCoOp", "CoCoOp-gating"}
        assert t.data.tags["mlgate.method"] == ("cocoop" if variant.startswith("CoCoOp") else "coop")
        assert t.data.params["train.batch_size"] == ("1" if variant.startswith("CoCoOp") else "32")
        assert t.data.params["method.gate.enabled"] == str(variant.endswith("gating"))
        assert t.data.params["data.name"] in {"imagenet", "caltech101", "eurosat"}
        assert t.data.params["train.seed"] == "null" and "acc/hm" in t.data.metrics
    # The few-shot draws were cached beside each dataset that ran.
    ran = {t.data.params["data.name"] for t in trials}
    folders = {"imagenet": "imagenet", "caltech101": "caltech-101", "eurosat": "eurosat"}
    assert all(list((root / folders[name] / "split_fewshot").glob("shot_2-seed_*.json")) for name in ran)


def _rows(study: str, method: str) -> list[dict]:
    """The settings of ``method`` in every row of a shipped paper study (its variants, or the study itself)."""
    spec = load_spec(f"paper/{study}")
    rows = [spec.with_values({"variant": v}) for v in spec.variants] or [spec]
    return [row.method.model_dump(mode="json") for row in rows if row.method.name == method]


def _trainable_on_vit_b16(settings: dict) -> int:
    overrides = [f"method.{k}={json.dumps(v)}" for k, v in settings.items() if k != "name"]
    return describe(settings["name"], "ViT-B-16", overrides, n_classes=2)["trainable_params"]


def test_paper_adaptive_bimaple_has_the_papers_parameter_count():
    # The paper: AdaptiveBiMaPLe has 13.8M trainable parameters against BiMaPLe's 10.1M on ViT-B/16, and
    # Table V is read by that difference. Every study that runs AdaptiveBiMaPLe builds that one model
    # (the reference code's defaults, 8 tokens and depth 12, as the studies' descriptions say).
    studies = ["gating_table1", "gating_table2", "gating_table5", "gating_d2", "gating_d3"]
    rows = {study: _rows(study, "adaptive_bimaple") for study in studies}
    assert all(rows.values())
    adaptive = [row for study_rows in rows.values() for row in study_rows]
    sized_by = ("n_ctx", "depth", "mode", "gate_strategy", "control")  # (inits and weights vary by row)
    assert len({tuple(row[k] for k in sized_by) for row in adaptive}) == 1
    assert round(_trainable_on_vit_b16(adaptive[0]) / 1e6, 1) == 13.8
    [bimaple] = _rows("gating_table1", "bimaple")
    assert round(_trainable_on_vit_b16(bimaple) / 1e6, 1) == 10.1
