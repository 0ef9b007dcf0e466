"""Monitoring hook for anyone's training loop: mlgate's diagnostics, logged to the active MLflow run.

    import mlflow, mlgate

    with mlflow.start_run():
        with mlgate.monitor(model, optimizer, prompt_params=[ctx], gate_params=[gates]) as mon:
            for images, labels in loader:
                cls, reg = criterion(model(images), labels), penalty(gates)
                optimizer.zero_grad()
                mon.regularizers(sparsity=reg)  # optional, before backward: conflict and cancellation
                (cls + reg).backward()
                mon.losses(total=cls + reg, cls=cls, reg=reg)   # optional: also log loss/*
                optimizer.step()                # the hook records grad/* and gate/* here

The run then carries mlgate's metric vocabulary (docs/metrics.md) and an ``mlgate.verdict`` tag, so
``python -m mlgate.compare`` can diagnose it like a run mlgate trained itself.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import mlflow
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from torch import nn

from mlgate.diagnostics import Diagnostics, depth_metrics, group_grad_norm
from mlgate.verdicts import MetricHistory, Thresholds


class Monitor:
    """Records diagnostics at every ``every``-th optimizer step through a step pre-hook.

    Gradients are read as the optimizer sees them (after any clipping the loop does before
    ``optimizer.step()``). Metrics reach MLflow in one ``log_batch`` per ``flush_every`` steps.
    ``depth_params`` (the prompt parameters of each depth, shallowest first) adds the per-depth
    prompt-gradient norms ``grad/prompt_norm/d<k>`` and their decay with depth, ``grad/depth_decay``.
    """

    def __init__(self, model: nn.Module | None, optimizer: torch.optim.Optimizer,
                 prompt_params: Iterable[nn.Parameter], gate_params: Iterable[nn.Parameter] = (), *,
                 activation: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid, every: int = 1,
                 flush_every: int = 50, run_id: str | None = None, method: str | None = None,
                 thresholds: Thresholds = Thresholds(),
                 depth_params: Sequence[Sequence[nn.Parameter]] = ()) -> None:
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise RuntimeError("mlgate.monitor needs an active MLflow run (mlflow.start_run()) or run_id=")
            run_id = active.info.run_id
        self.run_id = run_id
        self.client = MlflowClient(mlflow.get_tracking_uri())
        gate_params = list(gate_params)
        depths = [list(params) for params in depth_params]
        self.diagnostics = Diagnostics(
            list(prompt_params), gate_params, lambda: torch.cat([activation(p).reshape(-1) for p in gate_params]),
            (lambda: depth_metrics(torch.stack([group_grad_norm(ps) for ps in depths]))) if depths else None)
        self.history = MetricHistory()
        self.thresholds = thresholds
        self.every, self.flush_every = every, flush_every
        self.step = 0
        self._losses: dict[str, torch.Tensor] = {}
        self._reg_gate_grads: list[torch.Tensor] | None = None
        self._hook = optimizer.register_step_pre_hook(self._before_step)
        tags = {"mlgate.monitored": "true"}
        if method:
            tags["mlgate.method"] = method
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
        if model is not None:
            trainable = float(sum(p.numel() for p in model.parameters() if p.requires_grad))
            self._log([(0, {"params/trainable": trainable})])

    def losses(self, **terms: torch.Tensor) -> None:
        """Loss values for the coming step, e.g. ``total=loss, cls=ce, reg=penalty`` → ``loss/*``."""
        self._losses = {f"loss/{name}": value for name, value in terms.items()}

    def regularizers(self, **terms: torch.Tensor) -> None:
        """The coming step's regularization terms that act on the gates (``sparsity=penalty``), called
        before ``backward()``: their gate gradients give ``grad/gate_cancellation``,
        ``grad/conflict_cos`` and ``grad/reg_dominance`` (the classification part is the rest)."""
        if (self.step + 1) % self.every == 0:  # the coming step is recorded
            self._reg_gate_grads = self.diagnostics.term_gate_grads(terms)

    def _before_step(self, optimizer, args, kwargs) -> None:
        self.step += 1
        if self.step % self.every == 0:
            self.diagnostics.record(self.step, self._losses, self._reg_gate_grads)
        self._losses, self._reg_gate_grads = {}, None
        if self.step % self.flush_every == 0:
            self.flush()

    def _log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for step, values in rows for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.history.add(rows)

    def flush(self) -> None:
        """Send what was recorded since the last flush (one host transfer, one ``log_batch``)."""
        rows = self.diagnostics.drain()
        if rows:
            self._log(rows)

    def log(self, step: int | None = None, **metrics: float) -> None:
        """Log extra metrics (e.g. ``log(**{"acc/base": 81.2})``) at ``step`` (default: the current one)."""
        self._log([(self.step if step is None else step, metrics)])

    def close(self) -> str:
        """Flush, detach the hook, log the verdict's evidence (``verdict/*``) and tag the run with its
        verdict; returns the verdict."""
        self.flush()
        self._hook.remove()
        self._log([(self.step, self.history.evidence().as_metrics())])
        verdict = self.history.verdict(self.thresholds)
        self.client.set_tag(self.run_id, "mlgate.verdict", verdict)
        return verdict

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def monitor(model: nn.Module | None, optimizer: torch.optim.Optimizer, *, prompt_params: Iterable[nn.Parameter],
            gate_params: Iterable[nn.Parameter] = (), **options) -> Monitor:
    """Attach mlgate's diagnostics to a training loop; see :class:`Monitor` for the options."""
    return Monitor(model, optimizer, prompt_params, gate_params, **options)
