"""Diagnostics against hand computations, verdicts, and what the training loop's options really do."""

from __future__ import annotations

import math

import pytest
import torch

from mlgate.diagnostics import Diagnostics, at_interval, binary_entropy, cancellation, group_grad_norm
from mlgate.config.spec import StudySpec
from mlgate.training import train
from mlgate.verdicts import ADAPTIVE, COLLAPSED
from tests.conftest import TINY, deep_update


def test_group_grad_norm_is_the_joint_l2_norm():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0, 12.0])
    assert group_grad_norm([a, b]).item() == pytest.approx(13.0)


def test_cancellation_is_zero_when_terms_agree_and_near_one_when_they_oppose():
    g = torch.tensor([1.0, -2.0, 0.5])
    assert cancellation([g, 2 * g, 0.5 * g]).item() == pytest.approx(0.0, abs=1e-6)
    assert cancellation([g, -g * 0.999]).item() == pytest.approx(1.0, abs=1e-3)
    assert cancellation([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]).item() == pytest.approx(1 - 1 / math.sqrt(2))


def test_record_matches_hand_computation():
    prompt = torch.nn.Parameter(torch.zeros(4))
    gates = torch.nn.Parameter(torch.tensor([0.0, 2.0]))
    diag = Diagnostics([prompt], [gates])
    with torch.no_grad():
        gates.copy_(torch.tensor([1.0, 2.0]))  # moved after init
    prompt.grad = torch.full((4,), 50.0)  # norm 100
    gates.grad = torch.tensor([0.6, 0.8])  # norm 1
    sparsity_grad = torch.tensor([0.1, 0.1])
    losses = {"loss/total": torch.tensor(2.0), "loss/cls": torch.tensor(1.5), "loss/reg": torch.tensor(0.5)}
    diag.record(7, losses, [sparsity_grad])
    [(step, m)] = diag.drain()
    sig = torch.sigmoid(torch.tensor([1.0, 2.0]))
    assert step == 7
    assert m["loss/total"] == 2.0 and m["loss/cls"] == 1.5 and m["loss/reg"] == 0.5
    assert m["grad/prompt_norm"] == pytest.approx(100.0)
    assert m["grad/gate_norm"] == pytest.approx(1.0)
    assert m["grad/gap_log10"] == pytest.approx(2.0)
    assert m["gate/mean"] == pytest.approx(sig.mean().item())
    assert m["gate/min"] == pytest.approx(sig[0].item()) and m["gate/max"] == pytest.approx(sig[1].item())
    assert m["gate/drift"] == pytest.approx((sig[0] - 0.5).item())
    assert m["gate/effective_length"] == pytest.approx(sig.sum().item())
    assert "gate/batch_std" not in m  # input-independent gates: no spread to measure
    assert m["gate/entropy"] == pytest.approx(binary_entropy(sig).mean().item())
    cls_grad = torch.tensor([0.5, 0.7])  # total minus the regularizer's part
    expected = 1 - 1.0 / (cls_grad.norm() + sparsity_grad.norm()).item()
    assert m["grad/gate_cancellation"] == pytest.approx(expected, rel=1e-5)
    assert diag.drain() == []


def test_queued_steps_drain_to_the_same_rows_as_one_by_one():
    # Metrics are computed at drain, for all queued steps together: each row must be the one its step
    # would give alone, whatever the steps in between (other loss keys, gradients clipped in place after).
    prompt = torch.nn.Parameter(torch.zeros(3))
    gates = torch.nn.Parameter(torch.tensor([0.0, 1.0, -1.0]))
    queued = Diagnostics([prompt], [gates])
    alone = [Diagnostics([prompt], [gates]) for _ in range(3)]
    expected, generator = [], torch.Generator().manual_seed(0)
    for i, single in enumerate(alone):
        with torch.no_grad():
            gates.add_(torch.randn(3, generator=generator))
        prompt.grad, gates.grad = torch.randn(3, generator=generator), torch.randn(3, generator=generator)
        losses = {"loss/total": torch.tensor(float(i))} if i != 1 else None
        reg = [torch.randn(3, generator=generator)] if i == 2 else None
        queued.record(i + 1, losses, reg)
        single.record(i + 1, losses, reg)
        expected.append(single.drain()[0])
        gates.grad.mul_(0.1)  # clipping scales gradients in place after recording
    rows = queued.drain()
    assert [step for step, _ in rows] == [1, 2, 3]
    for (_, got), (_, want) in zip(rows, expected):
        assert got.keys() == want.keys()
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert rows[1][1].keys() >= {"grad/prompt_norm", "gate/drift"} and "loss/total" not in rows[1][1]
    assert rows[2][1]["grad/gate_cancellation"] > 0 and rows[0][1]["grad/gate_cancellation"] == 0


def test_input_dependent_gates_report_their_spread_across_the_batch():
    prompt = torch.nn.Parameter(torch.zeros(2))
    per_input = torch.tensor([[0.2, 0.9], [0.4, 0.5], [0.6, 0.1]])  # (B, G)
    init = torch.tensor([0.5, 0.5])
    diag = Diagnostics([prompt], [torch.nn.Parameter(torch.zeros(2))], lambda: per_input, gate_init=init)
    for step in (1, 2):
        prompt.grad = torch.ones(2)
        diag.record(step)
    rows = diag.drain()
    assert len(rows) == 2
    m = rows[1][1]
    assert m["gate/batch_std"] == pytest.approx(per_input.std(0).mean().item())
    assert m["gate/mean"] == pytest.approx(per_input.mean().item())
    assert m["gate/drift"] == pytest.approx((per_input.mean(0) - init).abs().max().item())  # from the given init


def test_a_batch_of_one_has_no_batch_spread():
    prompt = torch.nn.Parameter(torch.zeros(2))
    diag = Diagnostics([prompt], [torch.nn.Parameter(torch.zeros(2))], lambda: torch.tensor([[0.3, 0.7]]),
                       gate_init=torch.tensor([0.5, 0.5]))
    prompt.grad = torch.ones(2)
    diag.record(1)
    [(_, m)] = diag.drain()
    assert "gate/batch_std" not in m and m["gate/drift"] == pytest.approx(0.2)


def test_input_dependent_gates_need_their_init():
    with pytest.raises(ValueError, match="gate_init"):
        Diagnostics([], [torch.nn.Parameter(torch.zeros(2))], lambda: torch.rand(3, 2))


def _spec(**sections) -> StudySpec:
    return StudySpec.model_validate(deep_update(TINY, sections))


def test_training_logs_the_vocabulary_at_the_diagnostics_interval():
    rows = []

    class Keep:
        def log_metrics(self, r):
            rows.extend(r)

        def log_artifacts(self, d):
            rows.append(("artifacts", sorted(str(p.relative_to(d)) for p in d.rglob("*.*"))))

        def log_image(self, key, image, step):
            rows.append(("image", key, step))

    outcome = train(_spec(), Keep())
    diag_steps = [s for s, m in rows if isinstance(m, dict) and "grad/gap_log10" in m]
    assert diag_steps == list(range(1, 7))
    assert ("artifacts", ["gates/steps.npy", "gates/trajectory.npy", "gates/trajectory.png",
                          "metrics/history.csv", "plots/gradient_gap.png"]) in rows
    for key in ("acc/val", "acc/base", "acc/novel", "acc/hm", "params/trainable", "gate/drift"):
        assert key in outcome.final
    b, n = outcome.final["acc/base"], outcome.final["acc/novel"]
    assert outcome.final["acc/hm"] == pytest.approx(2 * b * n / (b + n))
    assert outcome.verdict in (COLLAPSED, ADAPTIVE)

    # The spec's default interval: every 10 steps, and the last step (the verdict's final values).
    rows.clear()
    default = deep_update(TINY, {"train": {"steps": 25, "eval_interval": 25}})
    default["logging"] = {"flush_every": 2}
    train(StudySpec.model_validate(default), Keep())
    assert [s for s, m in rows if isinstance(m, dict) and "grad/gap_log10" in m] == [10, 20, 25]


def test_gradient_clipping_bounds_the_update():
    sgd = {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0}
    free = train(_spec(train={"optimizer": sgd, "steps": 2}))
    clipped = train(_spec(train={"optimizer": sgd, "steps": 2, "grad_clip": 1e-3}))
    # Same first gradient (metrics are taken before the clip), but the clipped step barely moves the gates.
    assert free.history["grad/gate_norm"][0] == pytest.approx(clipped.history["grad/gate_norm"][0])
    assert 0 < clipped.history["gate/drift"][1] < free.history["gate/drift"][1] / 10


def test_sgd_and_adamw_train_differently():
    sgd = train(_spec(train={"optimizer": {"name": "sgd"}}))
    adamw = train(_spec(train={"optimizer": {"name": "adamw"}}))
    assert sgd.final["gate/drift"] != pytest.approx(adamw.final["gate/drift"])


def test_non_finite_loss_fails_the_trial():
    with pytest.raises(FloatingPointError, match="non-finite"):
        train(_spec(train={"optimizer": {"lr": 1e30}, "steps": 6}))


def test_only_the_headline_diagnostics_are_sent_at_every_step_the_others_at_the_interval_and_the_last():
    row = {"loss/total": 1.0, "loss/cls": 1.0, "grad/prompt_norm": 2.0, "grad/gate_norm": 0.1, "grad/gap_log10": 1.3,
           "gate/mean": 0.5, "gate/drift": 0.01, "gate/entropy": 0.69, "gate/depth_prob/d3": 0.4,
           "mask/active_tokens": 12.0, "mask/active_tokens/d0": 4.0}
    rows = [(step, dict(row)) for step in (10, 20, 30, 40, 50, 60, 65)]
    sent = at_interval(rows, 50, last_step=65)
    headline = {"loss/total", "grad/prompt_norm", "grad/gate_norm", "grad/gap_log10", "gate/mean", "gate/drift",
                "mask/active_tokens"}
    assert [(step, set(values)) for step, values in sent] == [
        (10, headline), (20, headline), (30, headline), (40, headline), (50, set(row)), (60, headline), (65, set(row))]
    assert at_interval(rows, 1, last_step=65) == rows
