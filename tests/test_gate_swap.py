"""Table II at evaluation: one trained model's learned gates swapped for fixed, random, per-layer and
its own per-token gates, and restored exactly (the Parameter objects the optimizer holds stay)."""

from __future__ import annotations

import pytest
import torch

from mlgate.model import load_backbone
from mlgate.data import Split
from mlgate.methods import build_method, method_class
from mlgate.methods.gates import GATE_ON, GATE_SWAPS, random_gate_logits
from mlgate.config.spec import StudySpec, TrainSpec
from mlgate.training.evaluation import accuracy
from mlgate.training.step import build_optimizer, check_optimizer_covers, seed_everything
from mlgate.training import train
from mlgate.training.loop import NullSink
from tests.conftest import TINY, deep_update

CLASSES = ["zero", "one", "two", "three", "four", "five"]
GATED = [("coop", {}), ("cocoop", {"gate": {"enabled": True}}), ("adaptive_bimaple", {})]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_backbone("mlgate-tiny", None)


def _trained_like(clip, name, settings):
    """A method whose gates sit at distinct values, some of them closed (as training might leave them)."""
    torch.manual_seed(0)
    method = build_method(method_class(name).Config(**settings), clip, CLASSES)
    with torch.no_grad():
        for logits in method.swappable_gates().values():
            logits.copy_(torch.linspace(-3.0, 3.0, logits.numel()).view_as(logits))
    return method.eval()


def _inputs(clip, method, n=4):
    size = clip.image_norm.size
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return images if method.prompts_vision else clip.encode_image(images)


@pytest.mark.parametrize("name, settings", GATED, ids=[n for n, _ in GATED])
def test_swaps_restore_the_gates_bit_for_bit_in_the_optimizers_objects(clip, name, settings):
    method = _trained_like(clip, name, settings)
    optimizer = build_optimizer(method, TrainSpec())
    objects = list(method.parameters())
    values = [p.detach().clone() for p in objects]
    for strategy in GATE_SWAPS:
        with method.swapped_gates(strategy, seed=3):
            method(_inputs(clip, method), torch.arange(3))
    with pytest.raises(RuntimeError, match="inside"), method.swapped_gates("random", seed=3):
        raise RuntimeError("a failure inside the swap")
    assert all(a is b for a, b in zip(method.parameters(), objects, strict=True))
    assert all(torch.equal(p, v) for p, v in zip(method.parameters(), values))
    check_optimizer_covers(method, optimizer)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(g) in held for g in method.swappable_gates().values())


@pytest.mark.parametrize("name, settings", GATED, ids=[n for n, _ in GATED])
def test_fixed_and_random_gates_are_what_the_forward_sees(clip, name, settings):
    method = _trained_like(clip, name, settings)
    x, classes = _inputs(clip, method), torch.arange(len(CLASSES))
    gates = method.swappable_gates()
    trained = {kind: g.detach().clone() for kind, g in gates.items()}
    generator = torch.Generator().manual_seed(3)
    expected_logits = {"fixed": {k: torch.full_like(g, GATE_ON) for k, g in trained.items()},
                       "random": {k: random_gate_logits(tuple(g.shape), generator) for k, g in trained.items()}}
    with torch.no_grad():
        plain = method(x, classes)
        for strategy, logits in expected_logits.items():
            with method.swapped_gates(strategy, seed=3):
                swapped, values = method(x, classes), method.gate_values()
            for kind, g in gates.items():  # the same forward with the gates written by hand
                g.copy_(logits[kind])
            expected, expected_values = method(x, classes), method.gate_values()
            for kind, g in gates.items():
                g.copy_(trained[kind])
            torch.testing.assert_close(swapped, expected, rtol=0, atol=0)
            torch.testing.assert_close(values, expected_values, rtol=0, atol=0)
            assert not torch.allclose(swapped, plain), strategy
        with method.swapped_gates("per_token", seed=3):
            torch.testing.assert_close(method(x, classes), plain, rtol=0, atol=0)


def test_per_layer_gives_each_layer_its_mean_gate(clip):
    method = _trained_like(clip, "adaptive_bimaple", {})
    token, depth = method.length_gates.detach().clone(), method.depth_gates.detach().clone()
    with method.swapped_gates("per_layer"):
        torch.testing.assert_close(method.length_gates.detach(), token.mean(-1, keepdim=True).expand_as(token))
        assert torch.equal(method.depth_gates, depth)  # already one per layer
    coop = _trained_like(clip, "coop", {})
    mean = coop.gates.detach().mean()
    with coop.swapped_gates("per_layer"):
        assert torch.equal(coop.gates.detach(), mean.expand(coop.cfg.n_ctx))  # CoOp: one layer, one mean


def test_random_swap_follows_the_seed_depth_gates_included(clip):
    method = _trained_like(clip, "adaptive_bimaple", {})
    size = clip.image_norm.size
    val = Split(torch.randn(12, 3, size, size, generator=torch.Generator().manual_seed(1)), torch.arange(12) % 6)

    def draw(seed):
        with method.swapped_gates("random", seed):
            gates = {k: g.detach().clone() for k, g in method.swappable_gates().items()}
            return gates, accuracy(method, val, list(range(6)))

    (first, acc_first), (again, acc_again), (other, _) = draw(1), draw(1), draw(2)
    assert set(first) == {"token", "depth"}
    assert all(torch.equal(first[k], again[k]) for k in first) and acc_first == acc_again
    assert all(not torch.equal(first[k], other[k]) for k in first)


def test_random_gate_strategy_is_drawn_from_the_trial_seed(clip):
    # gate_strategy random: the method is built after train() seeds the global RNG with the trial's seed.
    def build(seed):
        seed_everything(seed)
        method = build_method(method_class("adaptive_bimaple").Config(gate_strategy="random"), clip, CLASSES)
        return method.length_gates.clone(), method.depth_gates.clone()

    (length, depth), (length_again, depth_again), (length_other, depth_other) = build(1), build(1), build(2)
    assert torch.equal(length, length_again) and torch.equal(depth, depth_again)
    assert not torch.equal(length, length_other) and not torch.equal(depth, depth_other)
    assert depth.abs().min() > 0.2 and not torch.equal(depth, torch.full_like(depth, 1.0))  # random, not the init


class Rows(NullSink):
    """Keeps the metric rows a trial sends, with their steps (artifacts and images are dropped)."""

    def __init__(self):
        self.rows = []

    def log_metrics(self, rows):
        self.rows += rows


@pytest.mark.parametrize("method, logging, logged", [
    ({"name": "coop"}, {}, True),
    ({"name": "adaptive_bimaple"}, {}, True),
    ({"name": "coop"}, {"gate_swap": False}, False),
    ({"name": "coop", "gate": {"enabled": False}}, {}, False),
    ({"name": "adaptive_bimaple", "gate_strategy": "fixed"}, {}, False),
], ids=["coop", "adaptive_bimaple", "switched-off", "no-gates", "fixed-gates"])
def test_a_trial_logs_the_four_swaps_at_its_end(method, logging, logged):
    spec = StudySpec.model_validate(deep_update(TINY, {"method": method, "search": {}, "logging": logging,
                                                       "train": {"steps": 2, "eval_interval": 2}}))
    sink = Rows()
    outcome = train(spec, sink)
    swaps = {f"acc/gates/{s}" for s in GATE_SWAPS}
    logged_keys = {k for _, metrics in sink.rows for k in metrics if k.startswith("acc/gates/")}
    assert logged_keys == (swaps if logged else set())
    if logged:
        [(step, metrics)] = [(s, m) for s, m in sink.rows if "acc/gates/fixed" in m]
        assert step == 2 and all(0.0 <= metrics[k] <= 100.0 for k in swaps)
        assert outcome.final["acc/gates/per_token"] == outcome.final["acc/val"]  # the trained gates as they are
