"""A training step never waits for the device: batches reach it a block of steps at a time, no step
reads a scalar back, a constant gate temperature costs no kernel."""

from __future__ import annotations


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlgate.config.spec import StudySpec
from mlgate.model import load_backbone
from mlgate.training import train
from tests.conftest import TINY, deep_update


def test_batches_are_one_permutation_per_step_sent_to_the_device_a_block_at_a_time():
    # The trainer's batches: the first `batch` of a fresh permutation per step, as drawn before, but
    # sent in one non-blocking copy per block of steps (a blocking copy per step syncs a GPU with the
    # host at every step). On the meta device a copy dispatches, so the copies can be counted.
    from mlgate.training.batches import batch_indices

    drawn = list(batch_indices(torch.Generator().manual_seed(3), 20, 6, 130, torch.device("cpu")))
    generator = torch.Generator().manual_seed(3)
    assert len(drawn) == 130
    for got in drawn:
        torch.testing.assert_close(got, torch.randperm(20, generator=generator)[:6])

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
            return func(*args, **(kwargs or {}))

    with Copies() as copies:
        on_meta = list(batch_indices(torch.Generator().manual_seed(3), 20, 6, 130, torch.device("meta")))
    assert len(on_meta) == 130 and {(t.device.type, tuple(t.shape)) for t in on_meta} == {("meta", (6,))}
    assert copies.count == 3  # blocks of 64, 64 and 2 steps


@pytest.mark.parametrize("method", ["coop", "cocoop", "maple", "bimaple", "adaptive_bimaple", "adapt"])
def test_a_training_step_reads_nothing_back_from_the_device(method, monkeypatch):
    # A scalar read (.item(), float(t), int(t), `if t:`) or an op whose output size depends on the
    # data (nonzero, masked_select) waits for the GPU: inside a step it keeps the host from queueing
    # the next one. Counted where they dispatch, so the CPU sees them too: none in any method's step,
    # with diagnostics recorded and ADAPT pruning (its prune steps included).
    import mlgate.training.loop as training

    syncing = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}

    class Reads(TorchDispatchMode):
        seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in syncing:
                self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    step = training.optimization_step

    def watched(*args, **kwargs):
        with Reads():
            step(*args, **kwargs)

    monkeypatch.setattr(training, "optimization_step", watched)
    sections = {"method": {"name": method}, "train": {"steps": 8, "eval_interval": 8}, "logging": {"diagnostics_every": 2}}
    if method == "adapt":
        sections["method"].update({"t_target": 30, "max_len": 8})
    outcome = train(StudySpec.model_validate(deep_update(TINY, sections)))
    assert len(outcome.history["loss/total"]) == 4
    if method == "adapt":
        assert outcome.final["mask/active_tokens"] < 48  # it pruned inside the watched steps
    assert Reads.seen == []


def test_a_constant_gate_temperature_costs_no_op_per_step():
    # The trainer sets the temperature every step; only a new value reaches the device (a kernel
    # launch a step on a GPU otherwise), and the forward reads what was set.
    from mlgate.methods.describe import method_config
    from mlgate.methods import build_method

    coop = build_method(method_config("coop", []), load_backbone("mlgate-tiny", "mlgate"),
                        ["cat", "dog"])

    class Ops(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        for value in (1.0, 1.0, 0.5, 0.5, 0.5):
            coop.gate_temperature = value
    assert ops.count == 1 and coop.gate_temperature.item() == 0.5
    logits = torch.tensor([0.3, -1.2])
    torch.testing.assert_close(coop.gate_activation(logits), torch.sigmoid(logits / 0.5))
