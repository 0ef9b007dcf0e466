"""The verdict rule (docs/verdicts.md) on hand-made histories, and on real trials of the cases it exists for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlgate.model import load_backbone
from mlgate.diagnostics import Diagnostics, binary_entropy, cancellation
from mlgate.methods import build_method
from mlgate.config.methods import GateConfig
from mlgate.methods.gates import init_gate_logits
from mlgate.config.spec import StudySpec, TrainSpec
from mlgate.config import load_spec
from mlgate.training.step import optimization_step
from mlgate.training import train
from mlgate.verdicts import ADAPTIVE, COLLAPSED, PRUNED, STATIC, Thresholds, second_half_median, verdict
from tests.conftest import TINY, deep_update


def _points(values, start=1):
    return [(start + i, v) for i, v in enumerate(values)]


def _history(**series):
    return {key.replace("__", "/"): _points(values) for key, values in series.items()}


def test_gates_that_never_moved_are_collapsed_whatever_the_gap():
    # The basic case: CoOp-gating whose gates stayed at their init; the gap stayed under 2 orders.
    never_moved = _history(gate__mean=[0.5] * 8, gate__drift=[0.0, 0.001, 0.002, 0.003, 0.004, 0.004, 0.004, 0.004],
                           grad__gap_log10=[1.8] * 8)
    assert verdict(never_moved) == COLLAPSED
    assert verdict(never_moved, Thresholds(drift=0.003)) == ADAPTIVE


def test_gates_that_moved_then_stood_still_while_starved_are_collapsed():
    # Moved early (drift 0.2), then nothing changed in the second half while the gap stayed >= 2 orders.
    settled = _history(gate__mean=[0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7],
                       gate__drift=[0.0, 0.1, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
                       grad__gap_log10=[1.0, 1.0, 1.5, 1.5, 2.5, 2.5, 2.6, 2.4])
    assert verdict(settled) == COLLAPSED
    assert verdict(settled, Thresholds(gap_log10=3.0)) == ADAPTIVE  # not starved enough
    still_moving = {**settled, "gate/drift": _points([0.0, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45])}
    assert verdict(still_moving) == ADAPTIVE
    mean_moving = {**settled, "gate/mean": _points([0.5, 0.6, 0.6, 0.62, 0.64, 0.66, 0.68, 0.7])}
    assert verdict(mean_moving) == ADAPTIVE
    # Without a measured gap, standing still alone proves nothing.
    assert verdict({k: v for k, v in settled.items() if k != "grad/gap_log10"}) == ADAPTIVE


def test_input_dependent_gates_are_not_collapsed():
    never_moved = _history(gate__mean=[0.5] * 4, gate__drift=[0.0] * 4, grad__gap_log10=[3.0] * 4)
    assert verdict({**never_moved, "gate/input_std": _points([0.3])}) == ADAPTIVE
    assert verdict({**never_moved, "gate/batch_std": _points([0.3])}) == ADAPTIVE
    # input_std, measured on the validation inputs, wins over the training batch's spread.
    assert verdict({**never_moved, "gate/batch_std": _points([0.3]), "gate/input_std": _points([0.001])}) == COLLAPSED
    assert verdict({**never_moved, "gate/input_std": _points([0.3])}, Thresholds(input_std=0.5)) == COLLAPSED


def test_pruned_needs_tokens_to_fall_to_the_target():
    assert verdict(_history(mask__active_tokens=[64, 32, 16]), t_target=16) == PRUNED
    assert verdict(_history(mask__active_tokens=[64, 32, 24]), t_target=16) == STATIC  # target missed
    assert verdict(_history(mask__active_tokens=[64, 32, 32])) == PRUNED  # no target: stopped falling
    assert verdict(_history(mask__active_tokens=[96, 96, 96]), t_target=96) == STATIC  # pruned nothing
    assert verdict(_history(mask__active_tokens=[96, 96, 96])) == STATIC
    assert verdict(_history(loss__total=[1.0])) == STATIC


def test_second_half_is_by_step():
    assert second_half_median(_points([9.0, 9.0, 1.0, 2.0, 3.0])) == 2.0
    assert second_half_median([(10, 5.0), (20, 1.0), (30, 2.0), (40, 3.0)]) == 2.5  # steps 30 and 40
    assert second_half_median([]) is None


def test_coop_gating_at_the_reference_recipe_is_collapsed():
    # The default study's CoOp-gating with the reference's SGD lr 0.002 and no repair trick, 200 steps:
    # the gates never leave σ(0) although the gap stays under 2 orders, so only "ended near their
    # init" can call it (a gap-only rule called it adaptive).
    outcome = train(load_spec("gradient_balancing", ["train.optimizer.lr=0.002", "train.steps=200"]))
    gap = list(enumerate(outcome.history["grad/gap_log10"], start=1))  # logged at every step
    assert outcome.final["gate/drift"] < 0.05
    assert second_half_median(gap) < 2.0
    assert outcome.verdict == COLLAPSED
    assert outcome.final["acc/base"] > 60  # the prompts did learn: it is the gates that did not


def _tiny(**sections) -> StudySpec:
    return StudySpec.model_validate(deep_update(TINY, sections))


def test_an_annealed_temperature_alone_is_no_drift():
    # Gates at logit 1 (σ = 0.73) that learn nothing while T goes 1 → 0.1: σ(g/T) goes to 1.0, but the
    # gates did not move, and the verdict must say so.
    frozen = {"optimizer": {"lr": 1e-12}, "steps": 8, "eval_interval": 8,
              "gates": {"temperature": {"start": 1.0, "end": 0.1}}}
    outcome = train(_tiny(method={"gate": {"init": "constant", "init_value": 1.0}}, train=frozen))
    assert outcome.final["gate/drift"] < 1e-6
    assert outcome.final["gate/mean"] == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=1e-6)
    assert outcome.verdict == COLLAPSED


@pytest.fixture(scope="module")
def clip():
    return load_backbone("mlgate-tiny", "mlgate", "cpu")


def _coop(clip, **gate):
    torch.manual_seed(0)
    cfg = {"name": "coop", "gate": {"init": "normal", "init_std": 1.0, **gate}}
    return build_method(StudySpec.model_validate({"method": cfg}).method, clip, ["red circle", "blue square", "cyan ring"])


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_gradient_equilibrium_gives_the_logits_the_gradient_of_the_gate_values(clip, temperature):
    coop = _coop(clip)
    coop.gate_temperature = temperature
    features, classes = torch.randn(4, clip.model.visual.output_dim), torch.arange(3)
    targets = torch.tensor([0, 1, 2, 0])
    # ∂L/∂σ: the loss as a function of the gate values themselves.
    values = torch.sigmoid(coop.gates.detach() / temperature).requires_grad_(True)
    coop.gate_activation = lambda logits: values
    (wanted,) = torch.autograd.grad(F.cross_entropy(coop(features, classes), targets), values)
    del coop.gate_activation
    coop.gate_equilibrium = (1e-9, 1e9)  # no cap, no epsilon: the sigmoid's slope and 1/T undone exactly
    (got,) = torch.autograd.grad(F.cross_entropy(coop(features, classes), targets), coop.gates)
    assert got == pytest.approx(wanted, rel=1e-4, abs=1e-8)
    coop.gate_equilibrium = (1e-6, 2.0)  # the plain gradient ∂L/∂σ · σ'/T scaled by min(T / σ', 2)
    (capped,) = torch.autograd.grad(F.cross_entropy(coop(features, classes), targets), coop.gates)
    slope = torch.sigmoid(coop.gates.detach() / temperature).mul(1 - torch.sigmoid(coop.gates.detach() / temperature))
    plain = wanted * slope / temperature
    assert capped == pytest.approx(plain * (temperature / (slope + 1e-6)).clamp(max=2.0), rel=1e-4, abs=1e-8)
    assert (temperature / slope > 2.0).any()  # some gates hit the cap


def test_with_equilibrium_every_terms_gate_gradient_is_on_the_same_scale(clip):
    # The cancellation of the gate gradient across loss terms, as logged, against each term's gate
    # gradient taken on its own (all through the equilibrium's backward).
    cfg = TrainSpec.model_validate({"gates": {"equilibrium": {"enabled": True}}})
    features, classes = torch.randn(6, clip.model.visual.output_dim), torch.arange(3)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    coop = _coop(clip, sparsity=0.05)
    by_hand = _coop(clip, sparsity=0.05)
    groups = coop.param_groups()
    diagnostics = Diagnostics(groups["prompt"], groups["gate"], coop.gate_states)
    optimizer = torch.optim.SGD(coop.parameters(), lr=0.0)
    optimization_step(coop, optimizer, groups, cfg, features, targets, classes, 1, 10, diagnostics)
    [(_, logged)] = diagnostics.drain()
    by_hand.gate_equilibrium = (cfg.gates.equilibrium.eps, cfg.gates.equilibrium.cap)
    terms = [F.cross_entropy(by_hand(features, classes), targets), by_hand.regularizers()["sparsity"]]
    grads = [torch.autograd.grad(term, by_hand.gates)[0] for term in terms]
    assert logged["grad/gate_cancellation"] == pytest.approx(cancellation(grads).item(), rel=1e-4, abs=1e-7)
    assert logged["grad/gate_cancellation"] > 0.01  # the two terms do disagree here


def test_entropy_regularization_pushes_gates_away_from_saturation():
    saturated = {"method": {"gate": {"init": "constant", "init_value": 3.0}},
                 "train": {"optimizer": {"lr": 0.5}, "steps": 6}}
    plain = train(_tiny(**saturated))
    entropic = train(_tiny(**deep_update(saturated, {"train": {"gates": {"entropy_weight": 1.0}}})))
    h = binary_entropy(torch.sigmoid(torch.tensor(3.0))).item()
    assert entropic.history["loss/reg"][0] == pytest.approx(-4 * h, rel=1e-5)  # −λ·Σ H, 4 gates
    assert entropic.final["gate/mean"] < plain.final["gate/mean"] - 0.01  # towards 0.5
    assert entropic.final["gate/entropy"] > plain.final["gate/entropy"]


def test_conditional_gates_are_measured_across_inputs_and_from_their_init_over_the_inputs():
    conditional = {"name": "cocoop", "gate": {"enabled": True}, "gate_mode": "conditional"}
    outcome = train(_tiny(method=conditional, train={"batch_size": 1, "steps": 4, "eval_interval": 2},
                          search={}))
    assert "gate/batch_std" not in outcome.history  # one input per batch: no spread to measure
    assert len(outcome.history["gate/input_std"]) == 3  # at init and at each evaluation
    assert all(v > 0 for v in outcome.history["gate/input_std"])
    # Drift is measured from the gates' mean over the validation inputs at init, not from the first
    # training image (from which the first recorded drift would be exactly 0).
    assert outcome.history["gate/drift"][0] > 0
    batched = train(_tiny(method=conditional, train={"batch_size": 4, "steps": 2, "eval_interval": 2}, search={}))
    assert len(batched.history["gate/batch_std"]) == 2


def test_static_gates_log_no_input_spread():
    outcome = train(_tiny(train={"steps": 2, "eval_interval": 2}))
    assert "gate/batch_std" not in outcome.history and "gate/input_std" not in outcome.history
    assert outcome.history["gate/drift"]


def test_biased_init_decays_over_the_tokens_of_each_depth():
    logits = init_gate_logits((3, 4), GateConfig(init="biased", init_low=-2.0, init_high=2.0))
    assert torch.equal(logits, torch.linspace(2.0, -2.0, 4).expand(3, 4))
