"""The gating paper's measurements in every trial, against hand computations: Table III's
representation metrics, the appendix's gradient diagnostics (B1, B3, A3) and gate noise sensitivity (C1)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import silhouette_score

from mlgate.config import StudySpec
from mlgate.config.methods import METHOD_CONFIGS
from mlgate.data import load_dataset
from mlgate.diagnostics import Diagnostics, depth_metrics, regularizer_conflict
from mlgate.methods import build_method
from mlgate.methods.base import cosine
from mlgate.model import load_backbone
from mlgate.training import train
from mlgate.training.evaluation import evaluate
from mlgate.training.features import frozen_features
from tests.conftest import TINY, deep_update


@pytest.fixture(scope="module")
def setup():
    clip = load_backbone("mlgate-tiny", "mlgate")
    spec = StudySpec.model_validate(deep_update(TINY, {"search": {}}))
    data = load_dataset("shapes", 4, 1, clip.image_norm)
    return clip, spec, data, frozen_features(clip, data, spec, torch.device("cpu"))


def test_representation_metrics_are_table_iiis_on_the_test_features(setup):
    clip, spec, data, splits = setup
    torch.manual_seed(0)
    method = build_method(METHOD_CONFIGS["coop"](), clip, data.classnames).eval()
    got = evaluate(method, data, splits)
    images, labels, aligned, pair_cos, pairs = [], [], [], 0.0, 0
    with torch.no_grad():
        for split, classes in ((splits["test_base"], data.base), (splits["test_novel"], data.novel)):
            image, text = method.features(split.images, torch.tensor(classes))
            own = text[[classes.index(int(y)) for y in split.labels]]
            aligned += (image * own).sum(-1).tolist()
            gram = text @ text.t()
            pair_cos += (gram.sum() - gram.diagonal().sum()).item() / 2
            pairs += len(classes) * (len(classes) - 1) // 2
            images.append(image)
            labels.append(split.labels)
            assert got[f"acc/{'base' if classes == data.base else 'novel'}"] == pytest.approx(
                100 * (torch.tensor(classes)[cosine(image, text).argmax(-1)] == split.labels).float().mean().item())
    assert got["repr/alignment"] == pytest.approx(sum(aligned) / len(aligned), rel=1e-5)
    assert got["repr/separation"] == pytest.approx(1 - pair_cos / pairs, rel=1e-5)
    expected = silhouette_score(torch.cat(images).numpy(), torch.cat(labels).numpy(), metric="cosine")
    assert got["repr/silhouette"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_conditional_text_features_are_measured_per_image(setup):
    clip, spec, data, splits = setup
    torch.manual_seed(0)
    method = build_method(METHOD_CONFIGS["cocoop"](gate={"enabled": True}, gate_mode="conditional"), clip,
                          data.classnames).eval()
    got = evaluate(method, data, splits)
    split, classes = splits["test_base"], data.base
    with torch.no_grad():
        image, text = method.features(split.images, torch.tensor(classes))  # (B, C, E): each image its own
    gram = text @ text.transpose(1, 2)
    base_pairs = (gram.sum() - gram.diagonal(dim1=1, dim2=2).sum()).item() / 2
    assert text.dim() == 3 and 0 < got["repr/separation"] < 1
    # Base and novel images pool their class pairs; the base images' alone are close to the whole.
    assert got["repr/separation"] == pytest.approx(1 - base_pairs / (len(image) * 10 * 9 / 2), abs=0.05)


def test_regularizer_conflict_and_dominance_by_hand():
    cls, reg = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([-2.0, 2.0, 0.0])
    cosine_, dominance = regularizer_conflict(cls, reg)
    assert cosine_.item() == pytest.approx(-1 / math.sqrt(2)) and dominance.item() == pytest.approx(math.sqrt(8))
    # Through the diagnostics: the classification part is the total minus the regularizers'.
    gates, prompt = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    diagnostics = Diagnostics([prompt], [gates])
    gates.grad, prompt.grad = cls + reg, torch.ones(2)
    diagnostics.record(1, {}, [reg])
    [(_, m)] = diagnostics.drain()
    assert m["grad/conflict_cos"] == pytest.approx(-1 / math.sqrt(2), rel=1e-6)
    assert m["grad/reg_dominance"] == pytest.approx(math.sqrt(8), rel=1e-6)
    diagnostics.record(2, {})  # no regularizer on the gates: nothing to compare
    [(_, m)] = diagnostics.drain()
    assert "grad/conflict_cos" not in m and "grad/reg_dominance" not in m


def test_depth_decay_is_the_slope_of_log_norms():
    out = depth_metrics(torch.tensor([1.0, 0.1, 0.01, 0.001]))
    assert out["grad/depth_decay"].item() == pytest.approx(-1.0, rel=1e-5)
    assert out["grad/prompt_norm/d2"].item() == pytest.approx(0.01)
    assert "grad/depth_decay" not in depth_metrics(torch.tensor([0.5]))


def test_a_trial_logs_every_measurement_where_it_applies():
    # AdaptiveBiMaPLe with its sparsity and smoothness regularizers on the gates, depth 3.
    spec = StudySpec.model_validate(deep_update(TINY, {"method": {"name": "adaptive_bimaple"}, "search": {},
                                                       "train": {"steps": 4, "eval_interval": 2}}))
    outcome = train(spec)
    h = outcome.history
    assert len(h["repr/alignment"]) == len(h["acc/val"]) == 2  # at each evaluation
    for key in ("repr/silhouette", "repr/separation", "gate/noise_sensitivity"):
        assert len(h[key]) == 2, key
    for key in ("grad/conflict_cos", "grad/reg_dominance", "grad/depth_decay", "grad/prompt_norm/d2"):
        assert len(h[key]) == 4, key  # at every diagnosed step (every step here)
    assert set(k for k in outcome.final if k.startswith("acc/gates/")) == {
        "acc/gates/fixed", "acc/gates/random", "acc/gates/per_layer", "acc/gates/per_token"}
    # CoOp without a regularizer on its gates: no conflict to measure, no depths to compare.
    coop = train(StudySpec.model_validate(deep_update(TINY, {"search": {}, "train": {"steps": 2, "eval_interval": 2}})))
    assert "grad/conflict_cos" not in coop.history and "grad/depth_decay" not in coop.history
    assert "gate/noise_sensitivity" in coop.history and "repr/alignment" in coop.history


def test_noise_sensitivity_is_the_accuracy_lost_to_seeded_noise(setup):
    clip, spec, data, splits = setup
    torch.manual_seed(0)
    method = build_method(METHOD_CONFIGS["coop"](gate={"init": "constant", "init_value": 0.0}), clip,
                          data.classnames).eval()
    with torch.no_grad():
        method.gates.copy_(torch.tensor([3.0, -3.0, 0.0, 3.0]))
    before = method.gates.detach().clone()
    first, again = evaluate(method, data, splits, seed=7), evaluate(method, data, splits, seed=7)
    assert first["gate/noise_sensitivity"] == again["gate/noise_sensitivity"]  # a fixed noise seed
    assert torch.equal(method.gates, before)  # the gates are restored exactly
    noisy = before + 0.5 * torch.randn(4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        method.gates.copy_(noisy)
        acc = evaluate(method, data, splits)["acc/val"]
        method.gates.copy_(before)
    assert first["gate/noise_sensitivity"] == pytest.approx(first["acc/val"] - acc)
