"""``mlgate bench``: training-step speed of a method in four configurations, measured in one run.

- ``reference``: the way the reference trainers work (:mod:`mlgate.bench.reference`) — the frozen
  image encoder runs every step, the text encoder sees the full 77-token context through open_clip's
  own blocks, every prompt in one text pass, the loss is read back to the host every step, no
  diagnostics; on CUDA, where mlgate runs bf16 autocast, in a half-precision copy of CLIP, as the
  reference trainers run it there (PREC fp16);
- ``mlgate``: cached image features (for methods that do not prompt the vision tower), prompts
  trimmed to the longest one, one batched text pass, nothing synced to the host;
- ``mlgate_diagnostics``: plus the gradient/gate diagnostics at the trainer's interval
  (``logging.diagnostics_every``; one transfer per flush);
- ``mlgate_logging``: plus the metrics sent to an MLflow run (SQLite in a temp dir) by the metric
  sender process, as the trainer sends them (``logging.detail_every``), at its flush cadence (at least
  twice per timed pass). The sender runs
  beside the trainer, on cores the trainer leaves idle; its own CPU time is reported too
  (``sender_cpu_ms_per_step``, and ``ratios.logging_cpu`` as a fraction of step time): on a machine
  with no core to spare, logging adds at least that much to a trial.

Each configuration runs in timed passes, round-robin; steps/s come from its median pass, and each
ratio is the median of the two configurations' pass-time ratios within a round (``pass_seconds``
holds every pass), so a drift in a shared machine's load across rounds does not enter it.

Random-init weights and random images: the cost of a step does not depend on their values.
"""

from __future__ import annotations

import contextlib
import resource
import tempfile
from typing import Any

import torch
import torch.nn.functional as F

from mlgate.bench.measure import measure, paired_ratio
from mlgate.bench.reference import ReferenceCLIP
from mlgate.model import load_backbone
from mlgate.methods.describe import method_config
from mlgate.diagnostics import Diagnostics, at_interval
from mlgate.methods import build_method
from mlgate.config.spec import LoggingSpec, TrainSpec
from mlgate.training.batches import batch_indices
from mlgate.training.step import build_optimizer, optimization_step, resolve_device, use_bf16

CONFIGS = ("reference", "mlgate", "mlgate_diagnostics", "mlgate_logging")


def bench(method: str = "coop", backbone: str = "mlgate-tiny", n_classes: int = 10, batch: int = 32,
          steps: int = 20, warmup: int = 3, overrides: list[str] | None = None, device: str = "auto",
          flush_every: int = 50, rounds: int = 3, configs: tuple[str, ...] = CONFIGS,
          name_words: int = 1, compile: bool | str = False, diagnostics_every: int | None = None) -> dict[str, Any]:
    """Steps/s, images/s and peak memory of ``method`` in the chosen configurations (default: all
    four), and the ratios between them. Class names are ``name_words`` words long (ImageNet's run
    to about 6), which sets the length of the trimmed prompts. ``compile`` runs the mlgate
    configurations with ``train.compile`` set to it (true, or a mode: 'reduce-overhead'); the reference
    stays eager, as the reference trainers.
    ``diagnostics_every`` is the trainer's ``logging.diagnostics_every`` (default: the spec's)."""
    if diagnostics_every is None:
        diagnostics_every = LoggingSpec().diagnostics_every
    detail_interval = diagnostics_every * LoggingSpec().detail_every  # what the trainer sends, as it sends it
    dev = resolve_device(device)
    cfg = method_config(method, overrides or [])
    train_cfg = TrainSpec(compile=compile)
    clip = load_backbone(backbone, None, dev)
    classnames = [" ".join([f"class {i}"] + ["word"] * (name_words - 1)) for i in range(n_classes)]
    size = clip.image_norm.size
    gen = torch.Generator().manual_seed(0)
    pool = max(4 * batch, 64)
    images = torch.randn(pool, 3, size, size, generator=gen).to(dev)
    labels = torch.randint(0, n_classes, (pool,), generator=gen).to(dev)
    class_ids = torch.arange(n_classes, device=dev)
    total = warmup + rounds * steps
    # The reference's batches, drawn up front on the device: its sampling costs it nothing.
    batches = [torch.randint(0, pool, (batch,), generator=gen).to(dev) for _ in range(total)]

    def fresh(backbone_model=clip):
        torch.manual_seed(0)
        m = build_method(cfg, backbone_model, classnames).to(dev)
        return m, build_optimizer(m, train_cfg), m.param_groups()

    # Reference: no cache, full 77-token context, loss.item() every step. Where mlgate runs bf16
    # autocast (CUDA), the reference runs a half-precision copy of CLIP, as the reference trainers
    # do on a GPU (PREC fp16: the model cast once, no per-op casts), so the ratios measure the work
    # saved, not a dtype.
    bf16 = use_bf16(train_cfg, dev)
    ref_clip, ref_dtype = clip, torch.float32
    if bf16:
        ref_clip, ref_dtype = load_backbone(backbone, None, dev), torch.bfloat16
        ref_clip.model.to(ref_dtype)
    ref_clip = ReferenceCLIP.of(ref_clip)
    ref, ref_opt, _ = fresh(ref_clip)
    ref.train()

    def reference_step(i: int) -> None:
        idx = batches[i - 1]
        x = images[idx].to(ref_dtype)
        logits = ref(x if ref.prompts_vision else ref_clip.encode_image(x), class_ids)
        loss = F.cross_entropy(logits.float(), labels[idx])
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        loss.item()  # the reference trainers log the loss every step

    features = images if fresh()[0].prompts_vision else torch.cat(
        [clip.encode_image(images[i : i + 256]).float() for i in range(0, pool, 256)]).detach()

    # The trainer's flush cadence, but at least twice per timed pass: one send overlaps the pass.
    every = max(1, min(flush_every, steps // 2))
    logged_steps = undrained = 0  # training steps whose metrics went to the sender, and those still to go

    def mlgate_step(diagnose: bool, sink=None):
        m, opt, groups = fresh()
        m.train()
        diag = (Diagnostics(groups.get("prompt", []), groups.get("gate", []), m.gate_states, m.metrics)
                if diagnose else None)

        drawn = batch_indices(torch.Generator().manual_seed(0), pool, batch, total, dev)  # as the trainer draws

        def step(i: int) -> None:
            nonlocal logged_steps, undrained
            idx = next(drawn)
            record = diag is not None and i % diagnostics_every == 0  # as the trainer's logging.diagnostics_every
            optimization_step(m, opt, groups, train_cfg, features[idx], labels[idx], class_ids, i, total,
                              diag if record else None)
            undrained += sink is not None
            if diag is not None and i % every == 0:
                rows = diag.drain()
                if sink is not None:
                    logged_steps, undrained = logged_steps + undrained, 0
                    sink.log_metrics(at_interval(rows, detail_interval, total))

        return step

    makers = {"reference": lambda: reference_step, "mlgate": lambda: mlgate_step(False),
              "mlgate_diagnostics": lambda: mlgate_step(True)}
    # (sender CPU seconds, steps logged) once each pass has landed. The first timed pass carries the
    # sender's one-off costs (the store's engine and schema check, SQLAlchemy's statement caches), so
    # the steady state is read from the second pass on.
    landed: list[tuple[float, int]] = []
    with contextlib.ExitStack() as cleanup:
        settle = {}
        if "mlgate_logging" in configs:  # MLflow only where logging is measured (a GPU machine may lack it)
            from mlflow.tracking import MlflowClient

            from mlgate.tracking.sender import MetricSender
            from mlgate.tracking.runs import TrialRun

            tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mlgate-bench-"))
            client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
            run = client.create_run(client.create_experiment("bench"))
            sender = MetricSender(client.tracking_uri)
            cleanup.callback(sender.close)  # after the last flush, before the store is deleted
            sink = TrialRun(client, run.info.run_id, sender)
            cleanup.callback(sink.flush)  # the last batch lands
            makers["mlgate_logging"] = lambda: mlgate_step(True, sink)

            def settle_logging() -> None:
                sink.flush()
                landed.append((sender.cpu_seconds(), logged_steps))

            settle["mlgate_logging"] = settle_logging
        results = measure({name: makers[name]() for name in configs}, steps, warmup, rounds, dev, settle=settle)
    sender_s_per_step = None
    if len(landed) >= 2:
        (cpu_start, steps_start), (cpu_end, steps_end) = landed[1 if len(landed) > 2 else 0], landed[-1]
        sender_s_per_step = (cpu_end - cpu_start) / max(1, steps_end - steps_start)

    seconds = {k: 1.0 / v[0] for k, v in results.items()}
    passes = {k: v[3] for k, v in results.items()}

    def ratio(slower: str, faster: str, minus: float = 0.0) -> float | None:
        return paired_ratio(passes[slower], passes[faster]) - minus if slower in passes and faster in passes else None

    return {
        "method": method, "backbone": backbone, "device": str(dev), "classes": n_classes, "batch": batch,
        "steps": steps, "warmup": warmup, "rounds": rounds, "bf16": bf16, "compile": compile,
        "diagnostics_every": diagnostics_every,
        "steps_per_s": {k: v[0] for k, v in results.items()},
        "pass_seconds": passes,  # every timed pass, round by round: the ratios pair them
        "images_per_s": {k: v[0] * batch for k, v in results.items()},
        "peak_memory_mb": {"gpu": {k: v[1] for k, v in results.items()},
                           "host_step": {k: v[2] for k, v in results.items()},
                           "host": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        "ratios": {
            "speedup_vs_reference": ratio("reference", "mlgate"),
            "diagnostics_overhead": ratio("mlgate_diagnostics", "mlgate", 1.0),
            "logging_overhead": ratio("mlgate_logging", "mlgate_diagnostics", 1.0),
            # The sender's CPU time per step over the step's time: where no core is spare, logging
            # adds at least this much (its slices also stall the trainer's threads at their barriers).
            "logging_cpu": (sender_s_per_step / seconds["mlgate_diagnostics"]
                            if sender_s_per_step is not None and "mlgate_diagnostics" in seconds else None),
        },
        "sender_cpu_ms_per_step": None if sender_s_per_step is None else 1e3 * sender_s_per_step,
    }
