"""`train.compile` and `train.precision`: compiled steps train like eager ones, compile once, keep no
state, and read the frozen bf16 matrices an eager step kept; bf16 autocast trains."""

from __future__ import annotations

import math

import pytest
import torch

from mlgate.config.spec import StudySpec
from mlgate.model import load_backbone
from mlgate.training import train
from tests.conftest import TINY, deep_update


def test_bf16_autocast_trains(monkeypatch):
    outcome = train(StudySpec.model_validate(deep_update(TINY, {"train": {"precision": "bf16"}, "search": {}})))
    assert math.isfinite(outcome.final["loss/total"])
    assert outcome.history["gate/drift"][-1] > 0


def test_a_compiled_step_leaves_nothing_on_the_model():
    # With CUDA graphs (train.compile: reduce-overhead) the tensors a compiled step makes live in the
    # graphs' memory, which the next replay overwrites: anything kept from step to step (a mask, a kept
    # copy) must be made outside the compiled step, or inside it at every step. On the CPU (no CUDA
    # graphs) the same mistake shows as state the compiled step leaves on the model's objects.
    from torch import nn

    from mlgate.methods.describe import method_config
    from mlgate.methods import build_method
    from mlgate.training.step import classification_loss

    clip = load_backbone("mlgate-tiny", "mlgate")
    coop = build_method(method_config("coop", []), clip, [f"class {i}" for i in range(5)])
    owners = [*clip.modules(), *coop.modules(),
              *(v for v in vars(coop).values() if hasattr(v, "__dict__") and not isinstance(v, (nn.Module, torch.Tensor)))]

    def state() -> dict:  # (owner, attribute name) → the value's identity, and a dict's items'
        return {(id(owner), f"{type(owner).__name__}.{key}"):
                (id(value), sorted((str(k), id(v)) for k, v in value.items()) if isinstance(value, dict) else None)
                for owner in owners for key, value in vars(owner).items()}

    torch.manual_seed(0)
    with torch.no_grad():
        features = clip.encode_image(torch.randn(8, 3, clip.image_norm.size, clip.image_norm.size))
    before = state()
    step = torch.compile(classification_loss, dynamic=False)
    step(coop, features, torch.arange(5), torch.randint(0, 5, (8,)), False).backward()
    assert coop.ctx.grad is not None
    after = state()
    assert [name for owner, name in after if after[owner, name] != before.get((owner, name))] == []


@pytest.mark.parametrize("method", ["coop", "adapt"])
def test_a_compiled_bf16_step_reads_the_frozen_matrices_kept_by_an_eager_one(method):
    # Under bf16 autocast the frozen towers' matrices are kept in bf16 by the first (eager) step; the
    # compiled steps take those copies as static inputs (no copy into CUDA graphs' memory) instead of
    # casting the fp32 weights inside the graph, which CUDA graphs would redo at every replay. Seen in
    # the graphs: no cast of a weight-shaped input in the forward, and every bf16 input static.
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters

    from mlgate.methods.describe import method_config
    from mlgate.methods import build_method
    from mlgate.training.step import classification_loss

    clip = load_backbone("mlgate-tiny", "mlgate")
    model = build_method(method_config(method, []), clip, [f"class {i}" for i in range(5)])
    torch.manual_seed(0)
    images = torch.randn(4, 3, clip.image_norm.size, clip.image_norm.size)
    inputs = images if model.prompts_vision else clip.encode_image(images).detach()
    targets, ids = torch.randint(0, 5, (4,)), torch.arange(5)
    eager = classification_loss(model, inputs, ids, targets, True)
    graphs = []

    def forward_compiler(graph, example_inputs):
        graphs.append(graph)
        return graph

    def backend(graph, example_inputs):
        graphs.append(graph)
        return aot_autograd(fw_compiler=forward_compiler)(graph, example_inputs)

    counters.clear()
    compiled = torch.compile(classification_loss, backend=backend, dynamic=False)(model, inputs, ids, targets, True)
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    traced, forward = graphs
    matrices = {tuple(p.shape) for name, p in clip.named_parameters()
                if p.dim() == 2 and name.endswith(("weight", "proj", "projection"))}
    casts = [node.args[0] for node in forward.graph.nodes if node.op == "call_function"
             and str(node.target) in ("prims.convert_element_type.default", "aten._to_copy.default")]
    cast_inputs = {tuple(arg.meta["val"].shape) for arg in casts if arg.op == "placeholder"}
    assert casts and not matrices & cast_inputs, cast_inputs  # (activations are cast: layer norms give fp32)
    bf16_inputs = [node for node in traced.graph.find_nodes(op="placeholder")
                   if getattr(node.meta.get("example_value"), "dtype", None) == torch.bfloat16]
    assert len(bf16_inputs) >= 4 * len(clip.model.transformer.resblocks)  # each text block's attention
    assert all(node.meta["tensor_dict"].get("_dynamo_static_input_type") for node in bf16_inputs)


@pytest.mark.parametrize(("method", "mode"), [("coop", True), ("adapt", "reduce-overhead"), ("cocoop", True)])
def test_a_compiled_step_trains_like_an_eager_one_and_compiles_once(method, mode, monkeypatch):
    # train.compile: the same losses and diagnostics step by step, also while the gate temperature
    # anneals (a tensor the compiled graph reads, not a constant it would recompile for at every
    # value), while ADAPT prunes (masks updated in place), and with CoCoOp's text pass in checkpointed
    # chunks (a large label set's path). 'reduce-overhead' adds CUDA graphs on CUDA; on the CPU it
    # runs the same compiled step (each step marked as a new CUDA-graph step).
    import mlgate.model.text as text_module
    from mlgate.model import PromptedCLIP
    from torch._dynamo.utils import counters

    sections = {"method": {"name": method},
                "train": {"steps": 8, "eval_interval": 8, "gates": {"temperature": {"start": 2.0, "end": 0.5}}}}
    if method == "adapt":
        sections["method"].update({"n_k": 2, "r_p": 2, "t_target": 88})  # pruning at steps 2, 4, 6 and 8
    keys = ["loss/total", "grad/prompt_norm"] + {"coop": ["grad/gap_log10", "gate/drift", "gate/entropy"],
                                                 "adapt": ["mask/active_tokens"]}.get(method, [])
    series = {}
    checkpoint = text_module.checkpoint
    if method == "cocoop":
        monkeypatch.setattr(PromptedCLIP, "text_chunk", 20)  # a few images' prompts per chunk
    for compiled in (False, mode):
        counters.clear()
        chunks = []
        if method == "cocoop" and not compiled:  # (counted in eager only: a side effect would break the graph)
            monkeypatch.setattr(text_module, "checkpoint", lambda *a, **k: chunks.append(1) or checkpoint(*a, **k))
        spec = StudySpec.model_validate(deep_update(TINY, deep_update(sections, {"train": {"compile": compiled}})))
        outcome = train(spec)
        if method == "cocoop" and not compiled:
            assert len(chunks) > 8  # several chunks per training step
            monkeypatch.setattr(text_module, "checkpoint", checkpoint)
        series[bool(compiled)] = {key: list(outcome.history[key]) for key in keys}
        assert counters["stats"]["unique_graphs"] == (1 if compiled else 0)  # whatever the step
        assert not counters["graph_break"]  # a break splits the step, and its CUDA graphs, in pieces
    if method == "adapt":
        assert series[True]["mask/active_tokens"][-1] < series[True]["mask/active_tokens"][0]  # it pruned
    for key in keys:
        assert len(series[True][key]) == len(series[False][key]) >= 8
        assert series[True][key] == pytest.approx(series[False][key], rel=1e-4, abs=1e-5), key
