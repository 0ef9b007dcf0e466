"""What makes trials cheap: the on-disk frozen-feature cache, bf16 autocast, and `mlgate bench`."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlgate.cli import main
from mlgate.clip import load_backbone, stock_blocks
from mlgate.data import load_dataset
from mlgate.spec import StudySpec
from mlgate.training import FeatureCache, cache_dir, train
from tests.conftest import TINY, deep_update


def test_feature_cache_is_computed_once_and_shared(monkeypatch):
    clip = load_backbone("mlgate-tiny", "mlgate")
    split = load_dataset("shapes", 4, 1, clip.image_norm).test_base
    first = FeatureCache(clip, torch.device("cpu"), "mlgate")(split)
    path = FeatureCache(clip, torch.device("cpu"), "mlgate").path(split)
    assert path.is_file() and path.parent == cache_dir()

    def no_encoding(*args, **kwargs):
        raise AssertionError("the image encoder ran again")

    monkeypatch.setattr(clip, "encode_image", no_encoding)
    again = FeatureCache(clip, torch.device("cpu"), "mlgate")(split)  # another trial, another worker
    torch.testing.assert_close(again.images, first.images)
    # Other weights or other pixels: another entry.
    assert FeatureCache(clip, torch.device("cpu"), None).path(split) != path


def test_bf16_autocast_trains(monkeypatch):
    outcome = train(StudySpec.model_validate(deep_update(TINY, {"train": {"precision": "bf16"}, "search": {}})))
    assert math.isfinite(outcome.final["loss/total"])
    assert outcome.history["gate/drift"][-1] > 0


def test_bench_reports_four_configurations_and_their_ratios(capsys):
    assert main(["bench", "--steps", "4", "--warmup", "1", "--batch", "8", "--diagnostics-every", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    configs = {"reference", "mlgate", "mlgate_diagnostics", "mlgate_logging"}
    assert set(result["steps_per_s"]) == configs and all(v > 0 for v in result["steps_per_s"].values())
    assert set(result["peak_memory_mb"]["gpu"]) == configs and result["peak_memory_mb"]["host"] > 0
    sps, ratios, passes = result["steps_per_s"], result["ratios"], result["pass_seconds"]
    # Steps/s from each configuration's median pass; ratios pair the passes of each round (3 rounds).
    assert all(len(passes[c]) == 3 and sps[c] == pytest.approx(4 / sorted(passes[c])[1]) for c in configs)

    def paired(slower, faster):
        return sorted(a / b for a, b in zip(passes[slower], passes[faster]))[1]

    assert ratios["speedup_vs_reference"] == pytest.approx(paired("reference", "mlgate"))
    assert ratios["diagnostics_overhead"] == pytest.approx(paired("mlgate_diagnostics", "mlgate") - 1)
    assert ratios["logging_overhead"] == pytest.approx(paired("mlgate_logging", "mlgate_diagnostics") - 1)
    assert result["images_per_s"]["mlgate"] == pytest.approx(8 * sps["mlgate"])
    # The metric sender's own CPU time is measured (a few log_batch calls: tens of ms), not left out.
    assert result["sender_cpu_ms_per_step"] > 0
    assert ratios["logging_cpu"] == pytest.approx(result["sender_cpu_ms_per_step"] / 1e3 * sps["mlgate_diagnostics"])
    assert main(["bench", "--method", "maple", "--steps", "1", "--warmup", "0", "--batch", "4"]) == 0
    assert "speed-up vs reference" in capsys.readouterr().out
    assert main(["bench", "--steps", "0"]) == 2
    assert main(["bench", "--diagnostics-every", "0"]) == 2


def test_batches_are_one_permutation_per_step_sent_to_the_device_a_block_at_a_time():
    # The trainer's batches: the first `batch` of a fresh permutation per step, as drawn before, but
    # sent in one non-blocking copy per block of steps (a blocking copy per step syncs a GPU with the
    # host at every step). On the meta device a copy dispatches, so the copies can be counted.
    from mlgate.training import batch_indices

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
    import mlgate.training as training

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
    from mlgate.describe import method_config
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


def test_the_bench_reference_encodes_every_prompt_in_one_pass(monkeypatch):
    # The reference trainers have no chunking: their text pass, and its memory, grows with the label
    # set. mlgate's chunks (here every 4 prompts; 256 by default).
    from mlgate.bench import bench
    from mlgate.clip import PromptedCLIP

    passes = []
    chunked = PromptedCLIP._chunked

    def spy(self, encode, x, eot, args_for, chunk=None):
        passes.append((x.shape[0], chunk or self.text_chunk))
        return chunked(self, encode, x, eot, args_for, chunk)

    monkeypatch.setattr(PromptedCLIP, "_chunked", spy)
    monkeypatch.setattr(PromptedCLIP, "text_chunk", 4)
    bench(steps=1, warmup=1, rounds=1, batch=4, configs=("reference", "mlgate"))
    # Two steps each (warm-up and timed): the reference's 10 prompts unchunked, mlgate's chunked (its
    # CoOp prompts packed into one sequence, in chunks of max(1, 4 // 10) sequences).
    reference = [p for p in passes if p[1] == sys.maxsize]
    assert reference == [(10, sys.maxsize)] * 2 and len(passes) == 4
    assert all(chunk < 10 for _, chunk in set(passes) - set(reference))


def test_bench_without_the_logging_configuration_needs_no_mlflow():
    # The GPU check (scripts/device_check.sh) runs the bench where MLflow is not installed.
    import subprocess
    import sys

    code = ("import sys; from mlgate.bench import bench; "
            "r = bench(steps=2, warmup=1, rounds=1, batch=4, configs=('reference', 'mlgate', 'mlgate_diagnostics')); "
            "assert r['ratios']['logging_overhead'] is None and r['sender_cpu_ms_per_step'] is None, r; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'mlflow'], 'mlflow was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", ["coop", "cocoop", "maple", "adaptive_bimaple", "adapt"])
def test_trimmed_prompts_give_the_full_77_token_results(name):
    from mlgate.methods import build_method, method_class

    clip = load_backbone("mlgate-tiny", "mlgate")
    torch.manual_seed(0)
    method = build_method(method_class(name).Config(), clip, ["red circle", "a very long class name indeed", "x"])
    size = clip.image_norm.size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    inputs = images if method.prompts_vision else clip.encode_image(images)
    method.eval()
    trimmed = method(inputs, torch.arange(3))
    method.use_full_context()
    torch.testing.assert_close(method(inputs, torch.arange(3)), trimmed, atol=1e-5, rtol=1e-5)
    with stock_blocks():  # the bench's reference: open_clip's own blocks on all 77 tokens
        torch.testing.assert_close(method(inputs, torch.arange(3)), trimmed, atol=1e-5, rtol=1e-5)


def test_checkpointed_chunks_recompute_with_the_blocks_their_forward_used(monkeypatch):
    # On CUDA the backward, and so checkpointing's recomputation, runs in the autograd engine's own
    # thread, where stock_blocks' context variable is unset. A backward in another thread does the
    # same here: the recomputation must still take open_clip's blocks, or torch raises a
    # CheckpointError (the bench's reference failed so on a GPU, with more prompts than a chunk).
    import threading

    from mlgate.methods import build_method, method_class

    clip = load_backbone("mlgate-tiny", "mlgate")
    monkeypatch.setattr(clip, "text_chunk", 4)
    torch.manual_seed(0)
    method = build_method(method_class("coop").Config(), clip, [f"c{i}" for i in range(10)])
    method.use_full_context()
    features = torch.randn(3, clip.model.visual.output_dim)
    grads = []
    for stock in (False, True):
        with stock_blocks(stock):
            loss = method(features, torch.arange(10)).logsumexp(-1).sum()
            errors = []
            worker = threading.Thread(target=lambda: _capture(errors, loss.backward))
            worker.start()
            worker.join()
        assert errors == []
        grads.append(method.ctx.grad.clone())
        method.ctx.grad = None
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def _capture(errors: list, fn) -> None:
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - re-checked in the test's thread
        errors.append(error)


def test_cached_and_uncached_features_give_the_same_logits_and_gradients():
    from mlgate.methods import build_method, method_class

    clip = load_backbone("mlgate-tiny", "mlgate")
    split = load_dataset("shapes", 4, 1, clip.image_norm).val
    cached = FeatureCache(clip, torch.device("cpu"), "mlgate")(split)
    results = []
    for inputs in (cached.images, None):
        torch.manual_seed(0)
        method = build_method(method_class("coop").Config(), clip, [f"c{i}" for i in range(10)])
        features = inputs if inputs is not None else clip.encode_image(split.images)  # uncached: every step
        logits = method(features, torch.arange(10))
        torch.nn.functional.cross_entropy(logits, split.labels).backward()
        results.append((logits.detach(), method.ctx.grad.clone(), method.gates.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_lean_blocks_match_open_clips_own_forward():
    # run_block bypasses nn.MultiheadAttention; it must compute what open_clip's block computes,
    # values and gradients, for the causal text tower, the vision tower, and key/value prefixes.
    from mlgate.clip import run_block

    clip = load_backbone("mlgate-tiny", "mlgate")
    torch.manual_seed(0)
    text_block, vision_block = clip.text.transformer.resblocks[1], clip.model.visual.transformer.resblocks[1]
    for block, causal in ((text_block, True), (vision_block, False)):
        x = torch.randn(3, 9, block.attn.embed_dim, requires_grad=True)
        mask = torch.full((9, 9), float("-inf")).triu(1) if causal else None
        ours, = torch.autograd.grad(run_block(block, x, causal=causal).square().sum(), x)
        theirs, = torch.autograd.grad(block(x, attn_mask=mask).square().sum(), x)
        torch.testing.assert_close(run_block(block, x, causal=causal), block(x, attn_mask=mask), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    x = torch.randn(2, 5, 128)
    prefix = torch.randn(2, 3, 128, requires_grad=True)
    mask = torch.zeros(5, 8)
    mask[:, 1] = float("-inf")  # a pruned prefix token
    q = text_block.ln_1(x)
    kv = torch.cat([prefix, q], 1)
    expected = x + text_block.attention(q_x=q, k_x=kv, v_x=kv, attn_mask=mask)
    expected = expected + text_block.mlp(text_block.ln_2(expected))
    got = run_block(text_block, x, kv_prefix=prefix, mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    g_ours, = torch.autograd.grad(got.sum(), prefix)
    g_theirs, = torch.autograd.grad(expected.sum(), prefix)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-4, rtol=1e-4)
    assert g_ours[:, 1].abs().max() == 0  # the masked token takes no part


class _Dispatched(TorchDispatchMode):
    """What ran while the mode was on: every op's name, and the shapes of the tensors cast."""

    def __init__(self):
        super().__init__()
        self.names, self.cast_shapes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        if self.names[-1] == "_to_copy":
            self.cast_shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_quick_gelu_runs_as_one_silu_with_open_clips_values():
    # OpenAI CLIP's QuickGELU is three elementwise passes over the MLP's wide hidden state; run_block
    # folds its 1.702 into the frozen LayerNorm and biases and runs one SiLU, same values and gradients.
    from mlgate.clip import run_block

    clip = load_backbone("mlgate-tiny", "mlgate")
    block = clip.text.transformer.resblocks[0]
    assert type(block.mlp.gelu).__name__ == "QuickGELU"
    x = torch.randn(4, 7, 128, requires_grad=True)
    with _Dispatched() as ops:
        ours = run_block(block, x, causal=True)
        ours.square().sum().backward()
    assert "silu" in ops.names and "sigmoid" not in ops.names
    ours_grad, x.grad = x.grad, None
    theirs = block(x, attn_mask=torch.full((7, 7), float("-inf")).triu(1))
    theirs.square().sum().backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_grad, x.grad, atol=1e-4, rtol=1e-4)
    # The folded weights are kept between calls: a forward then scales nothing...
    with _Dispatched() as ops, torch.no_grad():
        run_block(block, x, causal=True)
    assert "silu" in ops.names and not {"mul", "div"} & set(ops.names)
    # ...and follow the block's weights when they change in place.
    with torch.no_grad():
        block.mlp.c_proj.bias.mul_(0.5)
        block.ln_2.bias.add_(0.1)
    torch.testing.assert_close(run_block(block, x, causal=True),
                               block(x, attn_mask=torch.full((7, 7), float("-inf")).triu(1)), atol=1e-5, rtol=1e-4)

    gelu = load_backbone("ViT-B-16", None).text.transformer.resblocks[0]  # nn.GELU: nothing to fold
    y = torch.randn(2, 5, gelu.attn.embed_dim)
    torch.testing.assert_close(run_block(gelu, y, causal=True),
                               gelu(y, attn_mask=torch.full((5, 5), float("-inf")).triu(1)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backbone", ["mlgate-tiny", "ViT-B-16"])  # QuickGELU (folded), and GELU
def test_under_autocast_a_blocks_frozen_weights_are_cast_once(monkeypatch, backbone):
    # Autocast recasts every fp32 weight at each use: a block's eight frozen matrices and biases kept
    # in bf16 between steps leave only the activations' casts, with the same values and gradients.
    import mlgate.clip
    from mlgate.clip import run_block

    block = load_backbone(backbone, "mlgate" if backbone == "mlgate-tiny" else None).text.transformer.resblocks[0]
    x = torch.randn(4, 7, block.attn.embed_dim)

    def forward_and_backward():
        y = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16), _Dispatched() as casts:
            out = run_block(block, y, causal=True)
            out.float().square().sum().backward()
        return out, y.grad, casts.cast_shapes

    forward_and_backward()  # the first call makes the bf16 copies
    out, grad, kept = forward_and_backward()
    monkeypatch.setattr(mlgate.clip, "_autocast_dtype", lambda device_type: None)  # autocast's own casts
    recast_out, recast_grad, recast = forward_and_backward()
    assert torch.equal(out, recast_out) and torch.equal(grad, recast_grad)
    weights = {tuple(p.shape) for p in block.parameters() if p.dim() == 2}
    assert weights <= set(recast) and not weights & set(kept)
    assert len(recast) - len(kept) == 8  # in_proj, out_proj, c_fc, c_proj: weights and biases


def test_under_autocast_the_towers_projections_are_cast_once():
    # The towers' output projections are frozen matrices too: kept in bf16, not recast every step.
    clip = load_backbone("mlgate-tiny", "mlgate")
    pooled = torch.randn(3, 1, clip.text_width), torch.randn(3, 5, clip.vision_width)
    projections = {tuple(clip.text.text_projection.shape), tuple(clip.model.visual.proj.shape)}
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16), _Dispatched() as casts:
            clip._text_output(pooled[0]), clip._image_output(pooled[1])
        assert (projections <= set(casts.cast_shapes)) if step == 0 else not projections & set(casts.cast_shapes)


def test_the_last_block_on_the_pooled_row_alone_changes_nothing():
    # The last block computes the pooled token's row only (queries, attention output, MLP): its
    # output and gradients must be those of that row in the full block, for every kind of block.
    from mlgate.clip import run_block

    clip = load_backbone("mlgate-tiny", "mlgate")
    torch.manual_seed(0)
    text_block, vision_block = clip.text.transformer.resblocks[-1], clip.model.visual.transformer.resblocks[-1]
    rows = torch.tensor([8, 2, 5])
    mask = torch.zeros(9, 12)
    mask[:, 1] = float("-inf")  # a pruned prefix token
    mask[:, 3:] = torch.full((9, 9), float("-inf")).triu(1)
    cases = [(text_block, dict(causal=True)), (vision_block, {}),
             (text_block, dict(kv_prefix=torch.randn(3, 3, 128), mask=mask))]
    for block, kwargs in cases:
        x = torch.randn(3, 9, 128, requires_grad=True)
        full = run_block(block, x, **kwargs)[torch.arange(3), rows]
        kept = run_block(block, x, rows=rows, **kwargs)
        assert kept.shape == (3, 1, 128)
        torch.testing.assert_close(kept[:, 0], full, atol=1e-5, rtol=1e-4)
        g_full, = torch.autograd.grad(full.square().sum(), x)
        g_kept, = torch.autograd.grad(kept.square().sum(), x)
        torch.testing.assert_close(g_kept, g_full, atol=1e-5, rtol=1e-4)
        if kwargs:  # causal: row 2 of sequence 1 sees nothing after it
            assert g_kept[1, :3].abs().sum() > 0 and g_kept[1, 3:].abs().max() == 0
    # Through a whole tower: the prompted image forward without prompts is open_clip's encode_image.
    images = torch.randn(4, 3, clip.image_norm.size, clip.image_norm.size)
    torch.testing.assert_close(clip.encode_image_prompted(images), clip.model.encode_image(images), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(clip.encode_image_kv(images, []), clip.model.encode_image(images), atol=1e-5, rtol=1e-4)


def test_a_shared_prefix_is_encoded_once_with_the_same_features_and_gradients(monkeypatch):
    # CoOp's prompts open with SOS + one shared context: computing that part once must change nothing,
    # whether the prompts are packed into one sequence or given the shared states as a key/value prefix.
    from mlgate.describe import method_config
    from mlgate.methods import build_method

    clip = load_backbone("mlgate-tiny", "mlgate")
    names = [f"class number {i} with a longer name" if i % 3 else f"c{i}" for i in range(12)]
    torch.manual_seed(0)
    coop = build_method(method_config("coop", ["method.n_ctx=6", "method.ctx_init=null"]), clip, names)
    ids = torch.arange(len(names))

    def features_and_grad(encode, parts=coop.tokens.assemble):
        out = encode(*parts(coop.context(), ids))
        grad, = torch.autograd.grad(out.square().sum(), coop.ctx)
        return out.detach(), grad

    taken = []
    for path in ("_encode_packed", "_encode_after_prefix"):
        original = getattr(clip, path)
        monkeypatch.setattr(clip, path, lambda *a, _f=original, _p=path, **k: taken.append(_p) or _f(*a, **k))

    plain, plain_grad = features_and_grad(clip.encode_text_embeddings)
    assert taken == []
    # Packed (the default for 12 prompts); then the key/value prefix in one pass, and in chunks of 5
    # under checkpointing.
    for packed_max_rows, chunk in ((256, 256), (0, 256), (0, 5)):
        monkeypatch.setattr(clip, "packed_max_rows", packed_max_rows)
        monkeypatch.setattr(clip, "shared_prefix_min_rows", 1)
        monkeypatch.setattr(clip, "text_chunk", chunk)
        shared, shared_grad = features_and_grad(clip.encode_text_shared_prefix, coop.tokens.assemble_shared)
        torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-4)
        # The gradient sums a dozen prompts' paths in another order; entries reach several hundred, so
        # float32 rounding is ~1e-3 (the plain pass itself is that far from a float64 one).
        torch.testing.assert_close(shared_grad, plain_grad, atol=1e-5 * plain_grad.abs().max(), rtol=1e-4)
    # 3 chunks, each run again in the backward (checkpointing recomputes).
    assert taken == ["_encode_packed", "_encode_after_prefix", *["_encode_after_prefix"] * 6]
    # CoOp takes the shared path itself, packed with the default settings.
    monkeypatch.undo()
    taken.clear()
    monkeypatch.setattr(clip, "_encode_packed", lambda *a, _f=clip._encode_packed, **k: taken.append(1) or _f(*a, **k))
    logits = coop(torch.randn(4, clip.model.visual.output_dim), ids)
    assert taken and logits.shape == (4, len(names))


def test_kept_class_tokens_follow_the_class_ids():
    # CoOp keeps its prompts' frozen parts (each class's tokens, positioned and packed, and the EOT
    # rows) from step to step, keyed on the class-id tensor: another tensor, the same one changed in
    # place, or a view of it must give the features of a fresh, unkept pass.
    from mlgate.describe import method_config
    from mlgate.methods import build_method

    clip = load_backbone("mlgate-tiny", "mlgate")
    names = [f"class number {i}" if i % 2 else f"c{i}" for i in range(6)]
    torch.manual_seed(0)
    coop = build_method(method_config("coop", ["method.ctx_init=null"]), clip, names)

    def fresh(ids):  # the prompts assembled whole, through the plain pass (nothing kept)
        return torch.nn.functional.normalize(clip.encode_text_embeddings(*coop.tokens.assemble(coop.context(), ids)), dim=-1)

    ids = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        first = coop.text_features(ids)
        torch.testing.assert_close(first, fresh(ids), atol=1e-5, rtol=1e-4)
        assert coop.text_features(ids).equal(first)  # kept: the same features again
        ids[:] = torch.tensor([5, 4, 3, 2])  # changed in place
        torch.testing.assert_close(coop.text_features(ids), fresh(ids), atol=1e-5, rtol=1e-4)
        for other in (ids[1:], torch.tensor([1, 0, 5]), torch.tensor([0, 1, 2, 3])):
            torch.testing.assert_close(coop.text_features(other), fresh(other), atol=1e-5, rtol=1e-4)


def test_the_packed_mask_reaches_attention_as_it_is_kept(monkeypatch):
    # The packed CoOp mask is built once, in the dtype attention sees (autocast's bf16 here, as on a
    # GPU) and with rows 16 elements apart (what CUDA's memory-efficient attention takes without
    # padding a copy): every packed layer gets that very tensor, with no cast on the way.
    import mlgate.clip as clip_module
    from mlgate.describe import method_config
    from mlgate.methods import build_method

    clip = load_backbone("mlgate-tiny", "mlgate")
    coop = build_method(method_config("coop", []), clip, [f"class {i}" for i in range(5)])
    seen = []
    original = clip_module._attention
    monkeypatch.setattr(clip_module, "_attention", lambda q, k, v, mask, causal: seen.append((q.dtype, mask)) or
                        original(q, k, v, mask, causal))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coop.text_features(torch.arange(5)).sum().backward()
    kept, = clip.__dict__["_packed_masks"].values()
    assert kept.dtype == torch.bfloat16 and kept.stride(0) % 16 == 0 and kept.shape[0] == kept.shape[1] > 16
    *packed_layers, last = seen
    assert len(packed_layers) == len(clip.text.transformer.resblocks) - 1
    assert all(dtype == torch.bfloat16 and mask is kept for dtype, mask in packed_layers)
    assert last[1].dtype == torch.bfloat16  # the pooled rows' slice of it
    assert coop.ctx.grad is not None and coop.ctx.grad.abs().sum() > 0


def test_cocoop_packs_each_images_prompts_with_the_same_logits_and_gradients(monkeypatch):
    # CoCoOp: every image's class prompts share SOS + that image's context; packed per image (in one
    # pass, and in chunks of images under checkpointing), nothing may change.
    import mlgate.clip as clip_module
    from mlgate.describe import method_config
    from mlgate.methods import build_method

    clip = load_backbone("mlgate-tiny", "mlgate")
    names = [f"class number {i}" if i % 2 else f"c{i}" for i in range(5)]
    torch.manual_seed(0)
    cocoop = build_method(method_config("cocoop", ["method.ctx_init=null"]), clip, names)
    features, ids = torch.randn(6, clip.model.visual.output_dim), torch.arange(len(names))
    packed, chunks = [], []
    original, checkpoint = clip._encode_packed, clip_module.checkpoint
    monkeypatch.setattr(clip, "_encode_packed", lambda *a, **k: packed.append(1) or original(*a, **k))
    monkeypatch.setattr(clip_module, "checkpoint", lambda *a, **k: chunks.append(len(a[1])) or checkpoint(*a, **k))

    def logits_and_grads():
        logits = cocoop(features, ids)
        grads = torch.autograd.grad(logits.square().sum(), [cocoop.ctx, *cocoop.meta_net.parameters()])
        return logits.detach(), grads

    monkeypatch.setattr(clip, "packed_max_rows", 0)
    plain, plain_grads = logits_and_grads()
    assert not packed
    # 6 images × 5 prompts: one pass; then chunks of the plain pass's rows (10 prompts of 10 rows
    # each: SOS, 4 context tokens and the longest name's 5) hold 100 // 30 = 3 images, packed in
    # 5 + 5 × 5 rows each: two checkpointed passes.
    for chunk in (256, 10):
        monkeypatch.setattr(clip, "packed_max_rows", 256)
        monkeypatch.setattr(clip, "text_chunk", chunk)
        logits, grads = logits_and_grads()
        torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)
        for got, want in zip(grads, plain_grads):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert len(packed) == 2 and chunks == [3, 3]


def test_a_compiled_step_leaves_nothing_on_the_model():
    # With CUDA graphs (train.compile: reduce-overhead) the tensors a compiled step makes live in the
    # graphs' memory, which the next replay overwrites: anything kept from step to step (a mask, a kept
    # copy) must be made outside the compiled step, or inside it at every step. The packed mask, kept
    # on the model when first built inside one, failed the first GPU run. On the CPU (no CUDA graphs)
    # the same mistake shows as state the compiled step leaves on the model's objects.
    from torch import nn

    from mlgate.describe import method_config
    from mlgate.methods import build_method
    from mlgate.training import classification_loss

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

    from mlgate.describe import method_config
    from mlgate.methods import build_method
    from mlgate.training import classification_loss

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
    import mlgate.clip as clip_module
    from torch._dynamo.utils import counters

    sections = {"method": {"name": method},
                "train": {"steps": 8, "eval_interval": 8, "gates": {"temperature": {"start": 2.0, "end": 0.5}}}}
    if method == "adapt":
        sections["method"].update({"n_k": 2, "r_p": 2, "t_target": 88})  # pruning at steps 2, 4, 6 and 8
    keys = ["loss/total", "grad/prompt_norm"] + {"coop": ["grad/gap_log10", "gate/drift", "gate/entropy"],
                                                 "adapt": ["mask/active_tokens"]}.get(method, [])
    series = {}
    checkpoint = clip_module.checkpoint
    if method == "cocoop":
        monkeypatch.setattr(clip_module.PromptedCLIP, "text_chunk", 20)  # a few images' prompts per chunk
    for compiled in (False, mode):
        counters.clear()
        chunks = []
        if method == "cocoop" and not compiled:  # (counted in eager only: a side effect would break the graph)
            monkeypatch.setattr(clip_module, "checkpoint", lambda *a, **k: chunks.append(1) or checkpoint(*a, **k))
        spec = StudySpec.model_validate(deep_update(TINY, deep_update(sections, {"train": {"compile": compiled}})))
        outcome = train(spec)
        if method == "cocoop" and not compiled:
            assert len(chunks) > 8  # several chunks per training step
            monkeypatch.setattr(clip_module, "checkpoint", checkpoint)
        series[bool(compiled)] = {key: list(outcome.history[key]) for key in keys}
        assert counters["stats"]["unique_graphs"] == (1 if compiled else 0)  # whatever the step
        assert not counters["graph_break"]  # a break splits the step, and its CUDA graphs, in pieces
    if method == "adapt":
        assert series[True]["mask/active_tokens"][-1] < series[True]["mask/active_tokens"][0]  # it pruned
    for key in keys:
        assert len(series[True][key]) == len(series[False][key]) >= 8
        assert series[True][key] == pytest.approx(series[False][key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("method", ["coop", "cocoop", "maple", "bimaple", "adaptive_bimaple", "adapt"])
def test_attention_inputs_start_on_16_byte_boundaries(method, monkeypatch):
    # CUDA's attention kernels (cuDNN's, the memory-efficient one) read their inputs in 16-byte words
    # and do not all check where a view starts: a mask or a q/k/v that begins inside a word faulted on
    # the H200 (CUBLAS_STATUS_EXECUTION_FAILED at the next matmul; ADAPT, whose per-layer masks were
    # views into one (layers, ...) tensor). Every tensor handed to attention, in training, evaluation
    # and the bench's reference-style pass (open_clip's own blocks), starts on a 16-byte boundary.
    import torch.nn.functional as F

    attention = F.scaled_dot_product_attention
    misaligned: list[str] = []

    def watched(query, key, value, attn_mask=None, *args, **kwargs):
        for name, t in (("query", query), ("key", key), ("value", value), ("attn_mask", attn_mask)):
            if t is not None and t.data_ptr() % 16:
                misaligned.append(f"{name} {tuple(t.shape)} at +{t.data_ptr() % 16}")
        return attention(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", watched)
    sections = {"method": {"name": method}, "train": {"steps": 6, "eval_interval": 6}}
    if method == "adapt":
        sections["method"].update({"t_target": 30, "max_len": 7})
    spec = StudySpec.model_validate(deep_update(TINY, sections))
    outcome = train(spec)
    assert math.isfinite(outcome.final["loss/total"])

    from mlgate.methods import build_method

    clip = load_backbone("mlgate-tiny", "mlgate")
    model = build_method(spec.method, clip, [f"class {i}" for i in range(3)]).train()
    images = torch.randn(2, 3, clip.image_norm.size, clip.image_norm.size)
    with stock_blocks():
        model(images if model.prompts_vision else clip.encode_image(images), torch.arange(3)).sum().backward()
    assert misaligned == []
