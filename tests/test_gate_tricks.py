"""The paper's repair attempts: each must really change the optimization."""

from __future__ import annotations

import pytest

from mlgate.cli import main
from mlgate.config.spec import PhasesSpec, StudySpec, TemperatureSpec
from mlgate.training.step import frozen_groups, temperature_at
from mlgate.training import train
from tests.conftest import TINY, deep_update
from tests.test_studies_in_mlflow import runs_of

ZERO_GATES = {"method": {"gate": {"init": "zero"}}}


def _train(**sections):
    return train(StudySpec.model_validate(deep_update(deep_update(TINY, ZERO_GATES), sections)))


def test_temperature_schedules():
    linear = TemperatureSpec(start=2.0, end=0.5)
    assert [temperature_at(s, 5, linear) for s in range(1, 6)] == pytest.approx([2.0, 1.625, 1.25, 0.875, 0.5])
    exp = TemperatureSpec(start=1.0, end=0.01, schedule="exponential")
    assert temperature_at(3, 5, exp) == pytest.approx(0.1)
    cosine = TemperatureSpec(start=1.0, end=0.0 + 0.5, schedule="cosine")
    assert temperature_at(1, 5, cosine) == 1.0 and temperature_at(5, 5, cosine) == pytest.approx(0.5)


def test_temperature_scales_the_gate_gradient():
    # With all gate logits at 0, σ(g/T) = 0.5 whatever T: same forward, gate gradient × 1/T.
    hot = _train(train={"steps": 1})
    cold = _train(train={"steps": 1, "gates": {"temperature": {"start": 0.25, "end": 0.25}}})
    assert cold.history["grad/gate_norm"][0] / hot.history["grad/gate_norm"][0] == pytest.approx(4.0, rel=1e-4)
    assert cold.history["loss/cls"][0] == pytest.approx(hot.history["loss/cls"][0])


def test_gradient_equilibrium_scales_the_gate_gradient_in_training():
    # Gates at σ(0): the sigmoid's slope is 1/4, which equilibrium undoes (× 4, under the cap).
    plain = _train(train={"steps": 1})
    equal = _train(train={"steps": 1, "gates": {"equilibrium": {"enabled": True}}})
    ratio = equal.history["grad/gate_norm"][0] / plain.history["grad/gate_norm"][0]
    assert ratio == pytest.approx(4.0, rel=1e-4)


def test_phases_freeze_the_right_groups():
    phases = PhasesSpec(warmup=2, gate_only=3)
    groups = ["prompt", "gate"]
    assert [frozen_groups(s, phases, groups) for s in range(1, 7)] == [  # steps count from 1
        {"gate"}, {"gate"}, {"prompt"}, {"prompt"}, {"prompt"}, set()]
    run = _train(train={"phases": {"warmup": 3}, "optimizer": {"lr": 0.5}})
    drift = run.history["gate/drift"]  # measured before each step's update
    assert drift[:4] == [0.0, 0.0, 0.0, 0.0] and drift[5] > 0
    assert run.history["grad/gate_norm"][0] > 0  # frozen gates are still measured


def test_collapse_pruning_prunes_collapsed_and_spares_healthy(workdir, write_spec):
    early = {"collapse_pruning": {"enabled": True, "warmup_steps": 6}, "n_trials": 1}
    write_spec("collapsing", study=early, search={}, train={"steps": 12})
    write_spec("healthy", study=early, search={}, train={"steps": 12, "gate_lr_mult": 10000.0})
    assert main(["run", "collapsing"]) == 0 and main(["run", "healthy"]) == 0
    _, _, [collapsed] = runs_of("collapsing")
    assert collapsed.info.status == "KILLED" and collapsed.data.tags["mlgate.state"] == "PRUNED"
    assert collapsed.data.tags["mlgate.verdict"] == "collapsed"
    assert collapsed.data.tags["mlgate.pruned_by"] == "collapse"
    assert max(m.step for m in runs_of("collapsing")[0].get_metric_history(collapsed.info.run_id, "loss/total")) == 6
    _, _, [healthy] = runs_of("healthy")
    assert healthy.info.status == "FINISHED" and healthy.data.tags["mlgate.verdict"] == "adaptive"
