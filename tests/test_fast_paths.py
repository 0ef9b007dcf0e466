"""Each fast path of the prompted forward computes what the plain one does, values and gradients: lean
blocks against open_clip's own, QuickGELU as one SiLU, frozen weights cast once under autocast, the
last block on the pooled rows, shared prefixes (packed or as key/value prefix), kept class tokens."""

from __future__ import annotations


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlgate.model import load_backbone


def test_lean_blocks_match_open_clips_own_forward():
    # run_block bypasses nn.MultiheadAttention; it must compute what open_clip's block computes,
    # values and gradients, for the causal text tower, the vision tower, and key/value prefixes.
    from mlgate.model.blocks import run_block

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
    from mlgate.model.blocks import run_block

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
    import mlgate.model.blocks as blocks
    from mlgate.model.blocks import run_block

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
    monkeypatch.setattr(blocks, "autocast_dtype", lambda device_type: None)  # autocast's own casts
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
    from mlgate.model.blocks import run_block

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
    from mlgate.methods.describe import method_config
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
    from mlgate.methods.describe import method_config
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
    import mlgate.model.blocks as clip_module
    from mlgate.methods.describe import method_config
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
    import mlgate.model.text as text_module
    from mlgate.methods.describe import method_config
    from mlgate.methods import build_method

    clip = load_backbone("mlgate-tiny", "mlgate")
    names = [f"class number {i}" if i % 2 else f"c{i}" for i in range(5)]
    torch.manual_seed(0)
    cocoop = build_method(method_config("cocoop", ["method.ctx_init=null"]), clip, names)
    features, ids = torch.randn(6, clip.model.visual.output_dim), torch.arange(len(names))
    packed, chunks = [], []
    original, checkpoint = clip._encode_packed, text_module.checkpoint
    monkeypatch.setattr(clip, "_encode_packed", lambda *a, **k: packed.append(1) or original(*a, **k))
    monkeypatch.setattr(text_module, "checkpoint", lambda *a, **k: chunks.append(len(a[1])) or checkpoint(*a, **k))

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
