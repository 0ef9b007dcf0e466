"""CoOp(-gating) on the shared prompted forward: shapes, gradients, parameter counts, optimizer coverage."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlgate.model import load_backbone
from mlgate.methods.base import cosine
from mlgate.methods import build_method
from mlgate.config.methods import GateConfig
from mlgate.methods.gates import init_gate_logits
from mlgate.methods.coop import CoOpConfig
from mlgate.config.spec import TrainSpec
from mlgate.errors import SpecError
from mlgate.training.step import build_optimizer, check_optimizer_covers

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
    with pytest.raises(SpecError, match="has 2 tokens but n_ctx is 4"):
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


@pytest.mark.parametrize("optimizer", [{"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
                                       {"name": "adamw", "weight_decay": 0.01}])
def test_fused_optimizer_steps_as_the_per_parameter_loop(clip, optimizer):
    # build_optimizer takes torch's fused kernels where it has them; the trajectory must be the one the
    # per-parameter loop gives, gate LR multiplier and a frozen (gradient-less) group included.
    spec = TrainSpec.model_validate({"gate_lr_mult": 10.0, "optimizer": {"lr": 0.05, **optimizer}})
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        method = build_method(CoOpConfig(n_ctx=4), clip, CLASSES)
        opt = build_optimizer(method, spec)
        if fused:
            assert all(group.get("fused") for group in opt.param_groups), "fused kernels exist for the CPU"
        for group in opt.param_groups:
            group["fused"], group["foreach"] = fused, False
        for step in range(4):
            features = torch.randn(4, clip.model.visual.output_dim, generator=torch.Generator().manual_seed(step))
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(method(features, torch.arange(6)), torch.tensor([0, 1, 2, 3])).backward()
            if step == 1:
                method.gates.grad = None  # a phase that freezes the gates
            opt.step()
        runs[fused] = [p.detach().clone() for p in method.parameters() if p.requires_grad]
    for fused_param, loop_param in zip(runs[True], runs[False]):
        torch.testing.assert_close(fused_param, loop_param, rtol=1e-4, atol=1e-5)  # Adam divides by tiny roots


# --------------------------------------------------------------------------------------------------
# Every method of the gating paper on the shared prompted forward.

from mlgate.methods.describe import describe  # noqa: E402
from mlgate.methods import method_class, method_names  # noqa: E402
from mlgate.training.step import check_optimizer_covers as _covers  # noqa: E402

VARIANTS = [
    ("coop", {}), ("coop", {"csc": True, "class_token_position": "middle"}),
    ("coop", {"class_token_position": "front", "gate": {"enabled": False}}),
    ("cocoop", {}), ("cocoop", {"gate": {"enabled": True}}),
    ("cocoop", {"gate": {"enabled": True}, "gate_mode": "conditional"}),
    ("maple", {}), ("bimaple", {}),
    ("adaptive_bimaple", {}), ("adaptive_bimaple", {"mode": "length_only"}),
    ("adaptive_bimaple", {"mode": "depth_only"}), ("adaptive_bimaple", {"gate_strategy": "per_layer"}),
    ("adaptive_bimaple", {"gate_strategy": "fixed"}), ("adaptive_bimaple", {"gate_strategy": "random"}),
    ("adaptive_bimaple", {"control": "param_matched"}), ("adaptive_bimaple", {"control": "always_frozen"}),
    ("adaptive_bimaple", {"control": "explicit_reg"}),
    ("adapt", {}), ("adapt", {"distill_weight": 0.5, "score": "l2"}),
]


def _inputs(clip, method, n=3):
    size = clip.image_norm.size
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return images if method.prompts_vision else clip.encode_image(images)


def test_every_registered_method_is_covered():
    assert set(method_names()) == {name for name, _ in VARIANTS}


@pytest.mark.parametrize("name, settings", VARIANTS, ids=lambda v: str(v))
def test_shapes_and_a_gradient_step(clip, name, settings):
    torch.manual_seed(0)
    method = build_method(method_class(name).Config(**settings), clip, CLASSES)
    optimizer = build_optimizer(method, TrainSpec())
    _covers(method, optimizer)
    method.train()
    logits = method(_inputs(clip, method), torch.tensor([1, 3, 4, 5]))
    assert logits.shape == (3, 4)
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2])) + sum(method.regularizers().values(), torch.tensor(0.0))
    optimizer.zero_grad()
    loss.backward()
    for group, params in method.param_groups().items():
        grads = [p.grad for p in params]
        assert all(g is not None for g in grads), group
        assert sum(g.abs().sum() for g in grads) > 0, f"{group} got zero gradient"
    before = [p.detach().clone() for ps in method.param_groups().values() for p in ps]
    optimizer.step()
    after = [p.detach() for ps in method.param_groups().values() for p in ps]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    method.eval()
    with torch.no_grad():
        assert method(_inputs(clip, method), torch.tensor([0, 2])).shape == (3, 2)


def test_cocoop_parameter_count_formula(clip):
    n_ctx, width, feat = 4, clip.text_width, clip.model.visual.output_dim
    hidden = feat // 16
    meta = feat * hidden + hidden + hidden * width + width
    plain = build_method(method_class("cocoop").Config(n_ctx=n_ctx), clip, CLASSES)
    assert sum(p.numel() for p in plain.parameters()) == n_ctx * width + meta
    static = build_method(method_class("cocoop").Config(n_ctx=n_ctx, gate={"enabled": True}), clip, CLASSES)
    assert sum(p.numel() for p in static.parameters()) == n_ctx * width + meta + n_ctx
    cond = build_method(method_class("cocoop").Config(n_ctx=n_ctx, gate={"enabled": True}, gate_mode="conditional"),
                        clip, CLASSES)
    assert sum(p.numel() for p in cond.parameters()) == n_ctx * width + meta + width * n_ctx + n_ctx


def test_conditional_gates_depend_on_the_input(clip):
    cfg = method_class("cocoop").Config(gate={"enabled": True}, gate_mode="conditional")
    method = build_method(cfg, clip, CLASSES)
    with torch.no_grad():
        method.gate_head.weight.normal_(0, 1.0)
    method(_inputs(clip, method, n=5), torch.arange(3))
    values = method.gate_values()
    assert values.shape == (5, 4) and values.std(0).mean() > 0


def test_maple_parameter_count_matches_the_reference_formula():
    # MaPLe on ViT-B/16, N_CTX 2, depth 9: ≈3.555M trainable parameters (random init, no download).
    info = describe("maple", "ViT-B-16", ["method.n_ctx=2", "method.depth=9"], n_classes=2)
    d_t, d_v = 512, 768
    assert info["trainable_params"] == 2 * d_t + (d_t * d_v + d_v) + 8 * (2 * d_t + d_t * d_v + d_v) == 3_555_072
    assert 30 < info["gflops_per_image"] < 45  # one ViT-B/16 image forward with 2 extra tokens


@pytest.mark.parametrize("name", ["maple", "bimaple"])
def test_deep_couplings_run_batched_with_each_depths_own_layers(clip, name):
    # The couplings of all deep layers run as batched matmuls: each depth must still get its own
    # layers' values and gradients, as one module call per depth gives them (and the cycle loss the
    # mean of the per-depth MSEs).
    torch.manual_seed(0)
    method = build_method(method_class(name).Config(depth=3), clip, CLASSES)
    if name == "bimaple":
        with torch.no_grad():
            method.alpha.normal_(), method.beta.normal_()  # a fusion of its own at every depth
    params = [p for ps in method.param_groups().values() for p in ps]

    def per_depth():
        text, vision = [method.ctx], [method.proj(method.ctx)]
        for i, t in enumerate(method.deep_text):
            v = method.deep_proj[i](t)
            if name == "bimaple":
                a, b = torch.sigmoid(method.alpha[i]), torch.sigmoid(method.beta[i])
                t = a * t + (1 - a) * method.v2l[i](v)
                v = b * v + (1 - b) * method.l2v[i](t)
            text.append(t)
            vision.append(v)
        return text, vision

    outputs = []
    for prompts in (method.layer_prompts, per_depth):
        text, vision = prompts()
        weights = torch.arange(1.0, 1 + len(text))  # every depth counts differently in the loss
        loss = sum(w * (t.square().sum() + v.sin().sum()) for w, t, v in zip(weights, text, vision))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        outputs.append(([*text, *vision], grads))
    (batched, batched_grads), (expected, expected_grads) = outputs
    assert len(batched) == len(expected) == 6
    for got, want in zip(batched, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(batched_grads, expected_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    if name == "bimaple":
        cycle = torch.stack([F.mse_loss(method.v2l[i](method.l2v[i](t)), t) for i, t in enumerate(method.deep_text)])
        torch.testing.assert_close(method.regularizers()["cycle"], method.cfg.cycle_weight * cycle.mean())


def _adaptive(clip, **settings):
    torch.manual_seed(0)
    return build_method(method_class("adaptive_bimaple").Config(**settings), clip, CLASSES)


@pytest.mark.parametrize("control", ["none", "param_matched"])
def test_adaptive_gates_and_controls_act_on_every_depth_at_once(clip, control):
    # Training scales all depths' prompts in one op per gate or control: the logits and gradients
    # must be those of scaling each depth's prompts by its own gates, one depth at a time.
    method = _adaptive(clip, depth=3, control=control)
    with torch.no_grad():
        for p in method.parameters():
            if p.dim() <= 2 and p.numel() < 64:  # gates, fusion logits, the controls: off their inits
                p.normal_()
    method.train()
    images, ids = _inputs(clip, method), torch.tensor([1, 3, 4])

    def per_depth():
        text, vision = method.layer_prompts()
        if control == "param_matched":
            scale = [1.0, *(1 + method.depth_scale)]
            text = [(t + method.token_bias[i]) * scale[i] for i, t in enumerate(text)]
            vision = [(v + method.token_bias[i]) * scale[i] for i, v in enumerate(vision)]
        else:
            length, depth = method._length_probs(), method._depth_probs()
            text = [t * length[i, :, None] * (depth[i - 1] if i else 1) for i, t in enumerate(text)]
            vision = [v * length[i, :, None] * (depth[i - 1] if i else 1) for i, v in enumerate(vision)]
        return method.clip.logit_scale * cosine(*method.encode(images, ids, text, vision))

    params = [p for ps in method.param_groups().values() for p in ps]
    results = []
    for forward in (lambda: method(images, ids), per_depth):
        logits = forward()
        results.append((logits, torch.autograd.grad(logits.square().sum(), params)))
    (logits, grads), (expected, expected_grads) = results
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_inference_drops_gated_tokens_but_training_keeps_them_soft(clip):
    method = _adaptive(clip)
    images, classes = _inputs(clip, method), torch.arange(4)
    with torch.no_grad():
        method.length_gates[0].copy_(torch.tensor([5.0, -5.0, 5.0, -5.0]))  # depth 0: tokens 1 and 3 off
    method.eval()
    with torch.no_grad():
        before_eval = method(images, classes)
        method.train()
        before_train = method(images, classes)
        method.ctx[1].add_(1.0)  # change a token that inference drops
        method.ctx[3].add_(1.0)
        after_train = method(images, classes)
        method.eval()
        after_eval = method(images, classes)
    torch.testing.assert_close(after_eval, before_eval)  # dropped: no part in the computation
    assert not torch.allclose(after_train, before_train)  # soft gates still pass σ(-5) of it


def test_closed_depth_gate_skips_its_layer_at_inference(clip):
    method = _adaptive(clip)
    images, classes = _inputs(clip, method), torch.arange(4)
    with torch.no_grad():
        method.depth_gates.copy_(torch.tensor([5.0, -5.0]))  # layer 2 inserts nothing
        method.eval()
        before = method(images, classes)
        method.deep_text[1].add_(1.0)
        torch.testing.assert_close(method(images, classes), before)
        method.deep_text[0].add_(1.0)  # layer 1 is inserted: it matters
        assert not torch.allclose(method(images, classes), before)


def test_eot_stays_right_when_every_context_token_is_dropped(clip):
    method = _adaptive(clip, depth=1, mode="length_only", cycle_weight=0.0)
    with torch.no_grad():
        method.length_gates.fill_(-5.0)
    method.eval()
    with torch.no_grad():
        text, _ = method._hard_prompts(*method.layer_prompts(), method._length_probs(), None)
        prompts, eot = method.tokens.assemble(text[0], torch.arange(len(CLASSES)))
        features = F.normalize(clip.encode_text_embeddings(prompts, eot - 4, 0), dim=-1)
    # With no context left the prompt is just "<classname>." — pooled at its real EOT.
    torch.testing.assert_close(features, clip.encode_class_texts([f"{c}." for c in CLASSES]), atol=1e-5, rtol=1e-5)


def test_inference_flops_fall_when_gates_close(clip):
    method = _adaptive(clip)
    method.eval().requires_grad_(False)
    images, classes = _inputs(clip, method), torch.arange(4)
    from mlgate.methods.describe import _flops

    open_flops = _flops(lambda: method(images, classes))
    method.length_gates.fill_(-5.0)
    assert _flops(lambda: method(images, classes)) < open_flops


def test_describe_cli(capsys):
    from mlgate.cli import main

    assert main(["describe", "coop", "--set", "method.n_ctx=2", "--set", "method.ctx_init=a photo", "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["params_by_group"] == {"prompt": 2 * 128, "gate": 2}
    assert main(["describe", "coop", "--set", "method.n_ctx=zero"]) == 2
    assert "method.n_ctx" in capsys.readouterr().err
    assert main(["describe", "nope"]) == 2


def test_chunked_checkpointed_text_encoding_matches_and_backpropagates(clip):
    method = build_method(CoOpConfig(n_ctx=4), clip, [f"class {i}" for i in range(12)])
    class_ids = torch.arange(12)
    features = torch.randn(3, clip.model.visual.output_dim, generator=torch.Generator().manual_seed(0))
    full = method(features, class_ids)
    full.sum().backward()
    grad_full = method.ctx.grad.clone()
    method.ctx.grad = None
    clip.text_chunk = 5  # 12 class prompts in chunks of 5, 5, 2 under checkpointing
    try:
        chunked = method(features, class_ids)
        chunked.sum().backward()
    finally:
        clip.text_chunk = 256
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(method.ctx.grad, grad_full, atol=1e-4, rtol=1e-4)


def test_per_depth_gradient_and_gate_metrics(clip):
    from mlgate.diagnostics import Diagnostics

    method = _adaptive(clip)
    groups = method.param_groups()
    diagnostics = Diagnostics(groups["prompt"], groups["gate"], method.gate_states, method.metrics)
    method(_inputs(clip, method), torch.arange(4)).logsumexp(-1).sum().backward()
    diagnostics.record(1, {})
    [(_, m)] = diagnostics.drain()
    assert m["grad/prompt_norm/d0"] == pytest.approx(method.ctx.grad.norm().item(), rel=1e-5)
    assert m["grad/prompt_norm/d2"] == pytest.approx(method.deep_text.grad[1].norm().item(), rel=1e-5)
    assert m["grad/gate_norm/length/d1"] == pytest.approx(method.length_gates.grad[1].norm().item(), rel=1e-5)
    assert m["grad/gap_log10/d1"] == pytest.approx(
        math.log10(m["grad/prompt_norm/d1"] / m["grad/gate_norm/length/d1"]), rel=1e-4)
    probs = torch.sigmoid(method.length_gates).detach()
    assert m["gate/effective_length/d2"] == pytest.approx(probs[2].sum().item(), rel=1e-5)
    assert m["gate/effective_length"] == pytest.approx(probs.sum(-1).mean().item(), rel=1e-5)
    assert m["gate/depth_prob/d1"] == pytest.approx(torch.sigmoid(method.depth_gates[0]).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["cocoop", "maple", "bimaple", "adaptive_bimaple"])
def test_every_method_trains_end_to_end(name):
    from mlgate.config.spec import StudySpec
    from mlgate.training import train
    from tests.conftest import TINY, deep_update

    spec = StudySpec.model_validate(deep_update(TINY, {"method": {"name": name}, "search": {},
                                                       "train": {"steps": 3, "eval_interval": 3}}))
    outcome = train(spec)
    assert outcome.final["flops/gflops_per_image"] > 0 and "acc/hm" in outcome.final


# --------------------------------------------------------------------------------------------------
# The reference code's bugs stay absent (each test fails when its bug is put back).

@pytest.mark.parametrize("name", ["maple", "bimaple", "adaptive_bimaple"])
def test_vision_prompts_are_n_ctx_tokens_at_every_depth_whatever_the_class_count(clip, name):
    # The reference's AdaptiveBiDirMaPLe appended one shallow vision token per class (n_cls of them).
    # The vision tower must see CLS + patches + n_ctx tokens at every layer, training and inference.
    n_ctx, visual = 3, clip.model.visual
    method = build_method(method_class(name).Config(n_ctx=n_ctx, ctx_init=None), clip, CLASSES)
    assert method.depth == clip.num_layers and len(CLASSES) != n_ctx  # every layer prompted
    lengths: list[int] = []
    hooks = [block.ln_1.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
             for block in visual.transformer.resblocks]
    try:
        for training in (True, False):
            method.train(training)
            with torch.no_grad():
                method(_inputs(clip, method), torch.arange(len(CLASSES)))
    finally:
        for hook in hooks:
            hook.remove()
    expected = visual.positional_embedding.shape[0] + n_ctx  # CLS + patches + the prompt
    assert lengths == [expected] * (2 * len(visual.transformer.resblocks))


def test_length_only_mode_applies_its_sparsity_regularizer(clip):
    # The reference computed its sparsity term only in modes full and depth_only, so in its main
    # config (length_only) the gate regularizer was exactly 0. Cycle loss off: loss/reg is the gates' term.
    from mlgate.config.spec import StudySpec
    from mlgate.training import train
    from tests.conftest import TINY, deep_update

    method = {"name": "adaptive_bimaple", "mode": "length_only", "cycle_weight": 0.0}
    spec = StudySpec.model_validate(deep_update(TINY, {"method": method, "search": {},
                                                       "train": {"steps": 1, "eval_interval": 1}}))
    outcome = train(spec)
    n_gates = min(spec.method.default_depth, clip.num_layers) * spec.method.n_ctx  # every depth's tokens
    expected = spec.method.gate.sparsity * n_gates * torch.sigmoid(torch.tensor(1.0)).item()  # gates at σ(1)
    assert outcome.history["loss/reg"][0] == pytest.approx(expected, rel=1e-5) and expected > 0


@pytest.mark.parametrize("full_context", [False, True])
def test_eot_follows_the_tokens_dropped_at_inference(clip, monkeypatch, full_context):
    # The reference shortened the prompt at inference but pooled at the EOT of the full-length prompt.
    # Tokens 1 and 3 closed: the text features must be open_clip's own for "[SOS] v0 v2 <classname>.",
    # with trimmed prompts and with the full 77-token context alike.
    from open_clip.transformer import text_global_pool

    from mlgate.bench.reference import ReferenceCLIP

    backbone = ReferenceCLIP.of(clip) if full_context else clip
    method = _adaptive(backbone, depth=1, mode="length_only", cycle_weight=0.0)
    with torch.no_grad():
        method.length_gates[0].copy_(torch.tensor([5.0, -5.0, 5.0, -5.0]))
    seen = []
    encode = backbone.encode_text_embeddings
    monkeypatch.setattr(backbone, "encode_text_embeddings", lambda *a, **k: seen.append(encode(*a, **k)) or seen[-1])
    method.eval()
    with torch.no_grad():
        method(_inputs(clip, method), torch.arange(len(CLASSES)))
        model = clip.model
        tokens = clip.tokenize([f"X X {c}." for c in CLASSES])  # two kept tokens, then the class name
        x = model.token_embedding(tokens)
        x[:, 1:3] = method.ctx[[0, 2]]
        x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
        expected = text_global_pool(model.ln_final(x), tokens, model.text_pool_type) @ model.text_projection
    [features] = seen
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
