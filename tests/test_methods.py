"""CoOp(-gating) on the shared prompted forward: shapes, gradients, parameter counts, optimizer coverage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlgate.clip import load_backbone
from mlgate.methods import build_method
from mlgate.methods.base import GateConfig, init_gate_logits
from mlgate.methods.coop import CoOpConfig
from mlgate.spec import TrainSpec
from mlgate.training import build_optimizer, check_optimizer_covers

CLASSES = ["zero", "one", "two", "three", "four", "five"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_backbone("mlgate-tiny", None)


def test_prompted_text_forward_matches_open_clip(clip):
    # Our block-by-block, length-trimmed text forward must equal open_clip's own encode_text.
    texts = ["a photo of a cat.", "a rather longer photo caption of a dog."]
    ours = clip.encode_class_texts(texts)
    reference = F.normalize(clip.model.encode_text(clip.tokenize(texts)), dim=-1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_coop_logits_shape_and_gradients(clip):
    method = build_method(CoOpConfig(n_ctx=4), clip, CLASSES)
    features = torch.randn(5, clip.model.visual.output_dim)
    class_ids = torch.tensor([0, 2, 3])
    logits = method(features, class_ids)
    assert logits.shape == (5, 3)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1])).backward()
    assert method.ctx.grad is not None and method.ctx.grad.abs().sum() > 0
    assert method.gates.grad is not None and method.gates.grad.abs().sum() > 0
    # The frozen backbone gets no gradient.
    assert all(p.grad is None for p in clip.model.parameters())


def test_gates_scale_the_context(clip):
    method = build_method(CoOpConfig(n_ctx=4, gate=GateConfig(init="constant", init_value=0.0)), clip, CLASSES)
    torch.testing.assert_close(method.context(), 0.5 * method.ctx)
    with torch.no_grad():
        method.gates.fill_(-1e4)  # gates closed: the prompt loses its context entirely
    assert method.context().abs().max() == 0


@pytest.mark.parametrize("csc", [False, True])
def test_parameter_count_formula(clip, csc):
    n_ctx, width = 4, clip.text_width
    method = build_method(CoOpConfig(n_ctx=n_ctx, csc=csc), clip, CLASSES)
    expected = (len(CLASSES) if csc else 1) * n_ctx * width + n_ctx
    assert sum(p.numel() for p in method.parameters() if p.requires_grad) == expected
    ungated = build_method(CoOpConfig(n_ctx=n_ctx, csc=csc, gate=GateConfig(enabled=False)), clip, CLASSES)
    assert sum(p.numel() for p in ungated.parameters()) == expected - n_ctx


def test_ctx_init_uses_the_phrase_embeddings(clip):
    method = build_method(CoOpConfig(n_ctx=4, ctx_init="a photo of a"), clip, CLASSES)
    tokens = clip.tokenize(["a photo of a"])
    torch.testing.assert_close(method.ctx.data, clip.embed_tokens(tokens)[0, 1:5])
    with pytest.raises(ValueError, match="has 2 tokens but n_ctx is 4"):
        build_method(CoOpConfig(n_ctx=4, ctx_init="a photo"), clip, CLASSES)


def test_gate_init_modes():
    assert torch.equal(init_gate_logits(3, GateConfig(init="constant", init_value=1.5)), torch.full((3,), 1.5))
    uniform = init_gate_logits(1000, GateConfig(init="uniform", init_low=-1.0, init_high=2.0))
    assert uniform.min() >= -1.0 and uniform.max() <= 2.0 and uniform.std() > 0.5
    biased = init_gate_logits(5, GateConfig(init="biased", init_low=-2.0, init_high=2.0))
    torch.testing.assert_close(biased, torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0]))
    assert torch.equal(init_gate_logits(3, GateConfig(init="zero", init_value=5.0)), torch.zeros(3))
    normal = init_gate_logits(4000, GateConfig(init="normal", init_value=1.0, init_std=0.1))
    assert abs(normal.mean() - 1.0) < 0.01 and abs(normal.std() - 0.1) < 0.01


def test_optimizer_coverage_check_catches_an_orphaned_gate(clip):
    method = build_method(CoOpConfig(n_ctx=4), clip, CLASSES)
    optimizer = build_optimizer(method, TrainSpec())
    check_optimizer_covers(method, optimizer)  # all held
    # The reference code's bug: a diagnostic replaces the Parameter object after the optimizer was built.
    method.gates = torch.nn.Parameter(method.gates.detach().clone())
    with pytest.raises(RuntimeError, match="gates"):
        check_optimizer_covers(method, optimizer)


def test_gate_lr_multiplier_scales_the_gate_update(clip):
    deltas = {}
    for mult in (1.0, 100.0):
        torch.manual_seed(0)
        method = build_method(CoOpConfig(n_ctx=4), clip, CLASSES)
        spec = TrainSpec.model_validate({"gate_lr_mult": mult, "optimizer": {"momentum": 0.0, "weight_decay": 0.0}})
        optimizer = build_optimizer(method, spec)
        before = method.gates.detach().clone()
        F.cross_entropy(method(torch.randn(4, clip.model.visual.output_dim, generator=torch.Generator().manual_seed(1)),
                               torch.arange(6)), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()
        deltas[mult] = (method.gates.detach() - before).norm()
    assert deltas[1.0] > 0
    torch.testing.assert_close(deltas[100.0] / deltas[1.0], torch.tensor(100.0), rtol=1e-3, atol=0)
