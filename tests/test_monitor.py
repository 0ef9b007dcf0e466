"""The monitoring hook on a plain, hand-written training loop with a real MLflow run."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import mlgate


def test_monitor_logs_the_vocabulary_from_a_plain_loop(workdir):
    torch.manual_seed(0)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("outside-loop")
    ctx = torch.nn.Parameter(torch.randn(4, 8))
    gates = torch.nn.Parameter(torch.zeros(4))
    head = torch.nn.Linear(8, 3).requires_grad_(False)
    optimizer = torch.optim.SGD([ctx, gates], lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    expected_prompt_norms = []
    with mlflow.start_run() as run:
        with mlgate.monitor(None, optimizer, prompt_params=[ctx], gate_params=[gates], flush_every=3,
                            method="my_coop") as mon:
            for _ in range(7):
                features = x @ (torch.sigmoid(gates)[:, None] * ctx)
                loss = torch.nn.functional.cross_entropy(head(features), y)
                optimizer.zero_grad()
                loss.backward()
                expected_prompt_norms.append(ctx.grad.norm().item())
                mon.losses(total=loss)
                optimizer.step()
            mon.log(**{"acc/base": 50.0})
    client = MlflowClient(uri)
    history = client.get_metric_history(run.info.run_id, "grad/prompt_norm")
    assert [m.step for m in history] == list(range(1, 8))
    assert [m.value for m in history] == pytest.approx(expected_prompt_norms, rel=1e-5)
    data = client.get_run(run.info.run_id).data
    assert {"loss/total", "grad/gate_norm", "grad/gap_log10", "gate/mean", "gate/drift", "acc/base"} <= set(data.metrics)
    assert "gate/batch_std" not in data.metrics  # these gates do not depend on the input
    assert math.isclose(data.metrics["grad/gap_log10"],
                        math.log10(data.metrics["grad/prompt_norm"] / data.metrics["grad/gate_norm"]), rel_tol=1e-5)
    assert data.tags["mlgate.verdict"] in ("collapsed", "adaptive")
    assert data.metrics["verdict/has_gates"] == 1.0  # the evidence the tag was judged from, for compare
    assert data.metrics["verdict/drift_final"] == data.metrics["gate/drift"]
    assert data.tags["mlgate.method"] == "my_coop"
    # The hook is gone after close: further steps are not recorded.
    optimizer.step()
    assert len(client.get_metric_history(run.info.run_id, "grad/prompt_norm")) == 7


def test_monitor_needs_a_run(workdir):
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="active MLflow run"):
        mlgate.monitor(None, torch.optim.SGD([p], lr=0.1), prompt_params=[p])


def test_monitor_offers_the_gradient_diagnostics_to_a_plain_loop(workdir):
    # Given the regularizer (before backward) and the prompts of each depth, a foreign loop gets the
    # appendix diagnostics mlgate's own trials log: conflict, dominance, per-depth norms and their decay.
    torch.manual_seed(0)
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow.set_experiment("outside-loop")
    shallow, deep = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(4, 8))
    gates = torch.nn.Parameter(torch.zeros(4))
    head = torch.nn.Linear(8, 3).requires_grad_(False)
    optimizer = torch.optim.SGD([shallow, deep, gates], lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with mlflow.start_run() as run:
        with mlgate.monitor(None, optimizer, prompt_params=[shallow, deep], gate_params=[gates],
                            depth_params=[[shallow], [deep]], flush_every=10) as mon:
            for _ in range(3):
                gated = torch.sigmoid(gates)[:, None]
                cls = torch.nn.functional.cross_entropy(head(x @ (gated * shallow) + 0.1 * x @ (gated * deep)), y)
                reg = 0.5 * torch.sigmoid(gates).sum()
                optimizer.zero_grad()
                mon.regularizers(sparsity=reg)
                cls_grad, = torch.autograd.grad(cls, gates, retain_graph=True)
                reg_grad, = torch.autograd.grad(reg, gates, retain_graph=True)
                (cls + reg).backward()
                norms = [shallow.grad.norm().item(), deep.grad.norm().item()]
                optimizer.step()
    m = MlflowClient().get_run(run.info.run_id).data.metrics
    cosine = torch.nn.functional.cosine_similarity(cls_grad, reg_grad, dim=0).item()
    assert m["grad/conflict_cos"] == pytest.approx(cosine, rel=1e-4, abs=1e-6)
    assert m["grad/reg_dominance"] == pytest.approx((reg_grad.norm() / cls_grad.norm()).item(), rel=1e-4)
    assert m["grad/prompt_norm/d0"] == pytest.approx(norms[0], rel=1e-5)
    assert m["grad/depth_decay"] == pytest.approx(math.log10(norms[1]) - math.log10(norms[0]), rel=1e-4)
    assert m["grad/gate_cancellation"] > 0
