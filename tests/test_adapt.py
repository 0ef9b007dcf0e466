"""ADAPT: KV-only prompts, masks, saliency pruning to exactly T_target, compaction, and a real run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mlgate.cli import main
from mlgate.bench.reference import ReferenceCLIP
from mlgate.model import load_backbone
from mlgate.errors import MlgateError
from mlgate.methods import build_method
from mlgate.methods.adapt import AdaptConfig, PruningSchedule
from mlgate.config.pruning import backbone_layers, plan_pruning, training_images, trial_problem
from mlgate.config.spec import StudySpec
from mlgate.config import list_studies, load_spec
from mlgate.config.loading import schedule_configs
from mlgate.training import load_data, preflight, train
from mlgate.model.zeroshot import evaluate_zero_shot
from tests.conftest import TINY, deep_update
from tests.test_studies_in_mlflow import runs_of

CLASSES = ["zero", "one", "two", "three"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_backbone("mlgate-tiny", None)


def _images(clip, n=2):
    return torch.randn(n, 3, clip.image_norm.size, clip.image_norm.size, generator=torch.Generator().manual_seed(1))


def test_masked_kv_prompts_equal_attention_without_those_tokens(clip):
    layers = len(clip.model.visual.transformer.resblocks)
    prompts = [torch.randn(5, clip.vision_width) for _ in range(layers)]
    active = [torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]) for _ in range(layers)]
    images = _images(clip)
    masked = clip.encode_image_kv(images, prompts, active)
    without = clip.encode_image_kv(images, [p[a.bool()] for p, a in zip(prompts, active)])
    torch.testing.assert_close(masked, without, atol=1e-5, rtol=1e-5)
    zeroed = clip.encode_image_kv(images, [p * a[:, None] for p, a in zip(prompts, active)])
    assert not torch.allclose(masked, zeroed, atol=1e-4)  # masked is not the same as zeroed
    # Text: the causal part stays; the query length (and so the EOT position) does not change.
    tokens = clip.tokenize(["a photo of a cat.", "a dog."])
    eot = clip.eot_index(tokens)
    x = clip.embed_tokens(tokens[:, : int(eot.max()) + 1])
    text_prompts = [torch.randn(5, clip.text_width) for _ in range(layers)]
    torch.testing.assert_close(clip.encode_text_kv(x, eot, text_prompts, active),
                               clip.encode_text_kv(x, eot, [p[a.bool()] for p, a in zip(text_prompts, active)]),
                               atol=1e-5, rtol=1e-5)
    assert clip.encode_text_kv(x, eot, []).shape == (2, clip.model.text_projection.shape[1])
    # open_clip's own blocks on the full context (the bench's reference) take the same masks: the same features.
    reference = ReferenceCLIP.of(clip)
    torch.testing.assert_close(reference.encode_image_kv(images, prompts, active), masked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference.encode_text_kv(x, eot, text_prompts, active),
                               clip.encode_text_kv(x, eot, [p[a.bool()] for p, a in zip(text_prompts, active)]),
                               atol=1e-5, rtol=1e-5)
    # One (K, P) tensor for the first K layers' prompts (how ADAPT trains: its masks built for all
    # layers at once): the features of the same rows given layer by layer.
    k = layers - 1
    stacked = (torch.rand(k, 5, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    for encode, inputs, tower_prompts in ((clip.encode_image_kv, (images,), prompts), (clip.encode_text_kv, (x, eot), text_prompts)):
        torch.testing.assert_close(encode(*inputs, tower_prompts[:k], stacked),
                                   encode(*inputs, tower_prompts[:k], list(stacked)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prompt tokens at layers"):
        clip.encode_image_kv(images, [prompts[0][:4], *prompts[1:k]], stacked)


def _reference_block(block, x, prompt, active, causal):
    # KV-prompted attention written out: queries from ln_1(x), keys and values from ln_1([prompt, x]);
    # inactive prompt tokens and (text) later positions get no weight; then open_clip's MLP residual.
    n, length, width = x.shape
    heads = block.attn.num_heads
    h = block.ln_1(x)
    kv = torch.cat([block.ln_1(prompt).expand(n, -1, -1), h], 1)
    w_q, w_k, w_v = block.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = block.attn.in_proj_bias.chunk(3)
    split = lambda t: t.view(n, t.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(h @ w_q.T + b_q), split(kv @ w_k.T + b_k), split(kv @ w_v.T + b_v)
    scores = q @ k.transpose(-1, -2) / (width // heads) ** 0.5
    visible = torch.ones(length, prompt.shape[0] + length, dtype=torch.bool)
    visible[:, : prompt.shape[0]] = active.bool()
    if causal:
        visible[:, prompt.shape[0]:] = torch.ones(length, length, dtype=torch.bool).tril()
    out = (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(n, length, width)
    x = x + out @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    return x + block.mlp(block.ln_2(x))


def _reference_text(clip, embeds, eot, prompts, active):
    x = embeds + clip.text.positional_embedding[: embeds.shape[1]]
    for block, prompt, act in zip(clip.text.transformer.resblocks, prompts, active):
        x = _reference_block(block, x, prompt, act, causal=True)
    return clip.text.ln_final(x[torch.arange(len(x)), eot]) @ clip.text.text_projection


def _reference_image(clip, images, prompts, active):
    visual = clip.model.visual
    x = visual._embeds(images)
    for block, prompt, act in zip(visual.transformer.resblocks, prompts, active):
        x = _reference_block(block, x, prompt, act, causal=False)
    return visual.ln_post(x[:, 0]) @ visual.proj


def test_kv_prompts_match_a_plain_reference_in_values_and_gradients(clip):
    # mlgate's key/value path (its fused blocks, the stacked masks ADAPT trains with, the last block
    # on the pooled rows only) against attention written out by hand, with some tokens masked.
    layers, n_prompt = len(clip.text.transformer.resblocks), 5
    active = (torch.rand(layers, n_prompt, generator=torch.Generator().manual_seed(3)) > 0.4).float()
    active[:, 0] = 1.0
    tokens = clip.tokenize(["a photo of a cat.", "a dog.", "a photo of a big red circle."])
    eot = clip.eot_index(tokens)
    embeds = clip.embed_tokens(tokens[:, : int(eot.max()) + 1])
    images = _images(clip, 3)
    towers = [(clip.text_width, lambda p: clip.encode_text_kv(embeds, eot, list(p), active),
               lambda p: _reference_text(clip, embeds, eot, list(p), active)),
              (clip.vision_width, lambda p: clip.encode_image_kv(images, list(p), active),
               lambda p: _reference_image(clip, images, list(p), active))]
    for width, encode, reference in towers:
        base = torch.randn(layers, n_prompt, width, generator=torch.Generator().manual_seed(4))
        results = []
        for forward in (encode, reference):
            prompts = base.clone().requires_grad_(True)
            features = forward(prompts)
            (features * torch.linspace(-1, 1, features.numel()).view_as(features)).sum().backward()
            results.append((features.detach(), prompts.grad))
        (ours, our_grad), (ref, ref_grad) = results
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(our_grad, ref_grad, atol=1e-5, rtol=1e-4)
        assert our_grad[active == 0].abs().max() == 0 and our_grad[active == 1].abs().min() > 0


def test_mean_init_leaves_the_frozen_model_nearly_as_it_was():
    # Random tokens through ln_1 become full-norm keys and values that take much of the attention of
    # the few query tokens: the features move. Started at their layer's mean token state, they hardly do.
    from mlgate.data import load_dataset

    torch.manual_seed(0)
    clip = load_backbone("mlgate-tiny", "mlgate")
    data = load_dataset("shapes", 16, 1, clip.image_norm)
    images = data.train.images[::8]
    unprompted = None
    similarity = {}
    for init in ("random", "mean"):
        method = build_method(AdaptConfig(init=init), clip, data.classnames)
        method.init_from_data(images)
        with torch.no_grad():
            features = (method.clip.encode_text_kv(method.text_embeds, method.eot, list(method.text_prompts)),
                        method.clip.encode_image_kv(images, list(method.vision_prompts)))
            unprompted = unprompted or (method.clip.encode_text_kv(method.text_embeds, method.eot, []),
                                        method.clip.encode_image_kv(images, []))
        similarity[init] = [torch.nn.functional.cosine_similarity(f, u).mean().item()
                            for f, u in zip(features, unprompted)]
    assert min(similarity["mean"]) > 0.97, similarity
    assert similarity["random"][1] < 0.8, similarity  # the image features of random prompts


def test_snip_grad_norm_and_l2_scores_by_hand(clip):
    method = build_method(AdaptConfig(depth=1, max_len=2), clip, CLASSES)
    with torch.no_grad():
        method.text_prompts.zero_()
        method.text_prompts[0, 0, :3] = torch.tensor([1.0, -2.0, 3.0])
        method.vision_prompts.zero_()
    method.text_prompts.grad = torch.zeros_like(method.text_prompts)
    method.text_prompts.grad[0, 0, :3] = torch.tensor([0.5, 0.5, -1.0])
    method.vision_prompts.grad = torch.zeros_like(method.vision_prompts)
    text, vision = method.token_scores()
    assert text[0, 0].item() == pytest.approx(0.5 + 1.0 + 3.0)  # Σ|g ⊙ p|
    assert text[0, 1].item() == 0.0 and vision.abs().sum() == 0
    method.cfg = method.cfg.model_copy(update={"score": "grad_norm"})
    assert method.token_scores()[0][0, 0].item() == pytest.approx((0.25 + 0.25 + 1.0) ** 0.5)
    method.cfg = method.cfg.model_copy(update={"score": "l2"})
    assert method.token_scores()[0][0, 0].item() == pytest.approx(14 ** 0.5)


def test_pruning_reaches_exactly_the_target_and_never_twice(clip):
    method = build_method(AdaptConfig(max_len=8, t_target=29, r_p=4, n_k=2, warmup_steps=1), clip, CLASSES)
    total = method.active_tokens()
    assert total == 2 * method.depth * 8
    for step in range(1, 200):
        method.text_scores.uniform_()
        method.vision_scores.uniform_()
        method.on_step(step, 200)
    assert method.active_tokens() == 29  # exactly, although 29 is not total - k·r_p
    positions = [(p["branch"], p["depth"], p["slot"]) for p in method.pruned]
    assert len(positions) == len(set(positions)) == total - 29
    assert all(p["step"] > 1 for p in method.pruned)  # nothing during the warmup
    assert {p["step"] % 2 for p in method.pruned} == {(1 + 2) % 2}  # every n_k-th step after it


def test_lowest_scores_go_first(clip):
    method = build_method(AdaptConfig(depth=1, max_len=4, t_target=0, r_p=2, n_k=1), clip, CLASSES)
    method.text_scores.copy_(torch.tensor([[5.0, 1.0, 7.0, 8.0]]))
    method.vision_scores.copy_(torch.tensor([[0.5, 9.0, 9.0, 9.0]]))
    method.on_step(1, 10)
    assert method.text_mask.tolist() == [[1.0, 0.0, 1.0, 1.0]]
    assert method.vision_mask.tolist() == [[0.0, 1.0, 1.0, 1.0]]


def test_derived_schedule_finishes_within_the_budget():
    for steps, warmup, target in [(40, 5, 32), (20, 0, 0), (400, 50, 128)]:
        cfg = AdaptConfig(t_target=target, warmup_steps=warmup)
        schedule = PruningSchedule(3, cfg, steps)  # 2 × 3 layers × 16 tokens: 96
        events = [s for s in range(1, steps + 1) if schedule.is_prune_step(s)]
        assert len(events) * schedule.r_p >= 96 - target
        assert events[-1] <= steps


def test_compacted_model_gives_the_masked_logits(clip):
    method = build_method(AdaptConfig(max_len=6, t_target=10, r_p=3, n_k=1), clip, CLASSES)
    for step in range(1, 20):
        method.text_scores.uniform_()
        method.vision_scores.uniform_()
        method.on_step(step, 20)
    method.eval()
    images, classes = _images(clip, 3), torch.arange(4)
    with torch.no_grad():
        masked = method(images, classes)
        final = method.finalize()
        compact = method(images, classes)
    torch.testing.assert_close(compact, masked, atol=1e-5, rtol=1e-5)
    assert final["params/trainable"] == sum(p.numel() for group in method.compact for p in group)
    assert final["mask/active_tokens"] == 10


def test_distillation_is_in_the_loss(clip):
    method = build_method(AdaptConfig(distill_weight=1.0), clip, CLASSES)
    method.train()
    method(_images(clip), torch.arange(4))
    distill = method.regularizers()["distill"]
    assert distill.item() > 0 and distill.requires_grad


def test_each_epochs_mask_snapshot_is_its_own(clip, tmp_path):
    # Snapshots stay on the device until the artifacts are written (a host copy each epoch would
    # sync with the GPU), each a copy of the masks as they were, not a view of the masks that prune on.
    method = build_method(AdaptConfig(depth=2, max_len=4), clip, CLASSES)
    method.on_epoch_end(3)
    method.prune(5, 4)
    method.on_epoch_end(6)
    method.save_artifacts(tmp_path)
    active = [int(np.load(tmp_path / "masks" / f"step_{step:06d}_text.npy").sum()
                  + np.load(tmp_path / "masks" / f"step_{step:06d}_vision.npy").sum()) for step in (3, 6)]
    assert active == [16, 11]


def test_short_real_run_prunes_to_heterogeneous_lengths():
    spec = StudySpec.model_validate(deep_update(TINY, {
        "method": {"name": "adapt", "t_target": 30, "warmup_steps": 2, "max_len": 8},
        "train": {"steps": 12, "eval_interval": 6}, "search": {}}))
    outcome = train(spec)
    assert outcome.verdict == "pruned"
    assert outcome.history["mask/active_tokens"][0] == 48 and outcome.final["mask/active_tokens"] == 30
    per_depth = [outcome.final[f"mask/active_tokens/d{k}"] for k in range(3)]
    branches = [outcome.final[f"mask/active_tokens/{b}/d{k}"] for b in ("text", "vision") for k in range(3)]
    assert sum(per_depth) == 30 and len(set(branches)) > 1  # heterogeneous context lengths
    assert outcome.final["params/trainable"] < outcome.history["params/trainable"][0]


def test_adapt_study_lands_masks_and_the_pruned_verdict(workdir, write_spec, capsys):
    write_spec("adapt_tiny", experiment="adapt", study={"n_trials": 1},
               method={"name": "adapt", "t_target": 40, "max_len": 8, "warmup_steps": 1}, search={})
    assert main(["run", "adapt_tiny"]) == 0
    client, _, [trial] = runs_of("adapt")
    assert trial.data.tags["mlgate.verdict"] == "pruned" and trial.data.params["method.t_target"] == "40"
    masks = {a.path for a in client.list_artifacts(trial.info.run_id, "masks")}
    assert {"masks/step_000006_text.npy", "masks/step_000006_vision.npy", "masks/step_000006.png"} <= masks
    schedule = json.load(open(client.download_artifacts(trial.info.run_id, "adapt/pruning_schedule.json")))
    assert len(schedule["pruned"]) == 48 - 40 and {"step", "branch", "depth", "slot", "score"} <= set(schedule["pruned"][0])
    assert "flops/gflops_per_image" in trial.data.metrics
    plots = {a.path for a in client.list_artifacts(trial.info.run_id, "plots")}
    assert "plots/depth_lengths.png" in plots
    # The masks as step-aware images: the UI's slider walks through training.
    images = {a.path for a in client.list_artifacts(trial.info.run_id, "images")}
    assert any("adapt_masks" in p for p in images)
    from mlgate.compare import main as compare

    capsys.readouterr()
    assert compare(["--experiment", "adapt", "--format", "json", "--no-log"]) == 0
    [run] = json.loads(capsys.readouterr().out)["runs"]
    assert run["verdict"] == "pruned" and run["active_tokens"] == 40


def test_describe_adapt_reports_unpruned_and_pruned_sizes(capsys):
    assert main(["describe", "adapt", "--set", "method.t_target=32", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prompt_tokens_unpruned"] == 2 * 3 * 16 and info["prompt_tokens_pruned"] == 32
    assert info["trainable_params"] == 3 * 16 * (128 + 128)
    assert info["pruned_params_range"] == [32 * 128, 32 * 128]


def test_the_adapt_recipe_ends_above_zero_shot_on_base_classes():
    # The adapt study's recipe (its search left out: T_target 32 of 96, Snip), 40 steps.
    spec = load_spec("adapt")
    clip = load_backbone(spec.backbone.name, spec.backbone.pretrained)
    zero_shot = evaluate_zero_shot(clip, load_data(spec, clip))
    outcome = train(spec)
    assert outcome.final["mask/active_tokens"] == spec.method.t_target
    assert outcome.final["acc/base"] > zero_shot["acc_base"], (outcome.final, zero_shot)


# ---- the pruning schedule reaches T_target, or the spec is refused -----------------------------------


@pytest.mark.parametrize(("n_k", "r_p", "warmup", "steps"), [(2, 4, 1, 40), (3, 4, 10, 60), (None, 4, 5, 40),
                                                            (None, 4, 0, 7), (5, 2, 3, 30), (1, 1, 0, 3)])
def test_the_plan_counts_the_events_the_schedule_prunes_at(n_k, r_p, warmup, steps):
    cfg = AdaptConfig(t_target=32, n_k=n_k, r_p=r_p, warmup_steps=warmup)
    schedule = PruningSchedule(3, cfg, steps)
    events = [s for s in range(1, steps + 1) if schedule.is_prune_step(s)]
    assert len(events) == schedule.plan.events_available
    assert schedule.plan.reaches == (len(events) * schedule.r_p >= 96 - 32)


def test_a_schedule_that_cannot_finish_does_not_start(clip):
    method = build_method(AdaptConfig(max_len=8, t_target=8, n_k=5), clip, CLASSES)
    with pytest.raises(MlgateError, match="cannot reach method.t_target 8"):
        method.on_train_start(20, 5)


def _adapt_spec(write_spec, **method):
    return write_spec("adapt_bad", method={"name": "adapt", "max_len": 8, "warmup_steps": 1, **method}, search={})


def test_validate_and_run_refuse_a_schedule_that_cannot_reach_its_target(write_spec, capsys):
    # 48 tokens (2 × 3 layers × 8) down to 8: 40 to prune at r_p 4 take 10 events; 6 steps after a
    # 1-step warmup hold 2 at n_k 2.
    path = _adapt_spec(write_spec, t_target=8, n_k=2)
    for command in (["validate", str(path)], ["run", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "cannot reach method.t_target 8: 40 of its 48 prompt tokens are to be pruned, 4 per pruning " \
               "event, which takes 10 events, but 6 steps after a 1-step warmup give 2 at n_k 2" in err
        assert "r_p 8 at n_k 1 would" in err and "method.n_k: null" in err and "Traceback" not in err
    assert not (path.parent.parent / "mlruns").exists() and "adapt_bad" not in capsys.readouterr().out
    # Steps from epochs: 40 training images (4 shots × 10 base classes) at batch 8 are 5 steps an epoch.
    path = _adapt_spec(write_spec, t_target=40, n_k=3, warmup_steps=0, warmup_epochs=1.0)
    path.write_text(path.read_text().replace("steps: 6", "epochs: 2"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "10 steps after a 5-step warmup give 1 at n_k 3. An n_k of 2 or less finishes" in err
    assert "(shapes: 40 training images, 5 steps an epoch at batch 8.)" in err
    # The same spec with n_k derived from the budget is valid.
    path.write_text(path.read_text().replace("n_k: 3", "n_k: null"))
    assert main(["validate", str(path)]) == 0


def test_a_target_at_or_above_the_prompt_tokens_is_refused(write_spec, capsys):
    for target in (48, 60):
        assert main(["validate", str(_adapt_spec(write_spec, t_target=target))]) == 2
        assert f"method.t_target {target} prunes nothing: the prompts hold 48 tokens (2 towers x 3 layers x " \
               "max_len 8)" in capsys.readouterr().err
    assert main(["validate", str(_adapt_spec(write_spec, t_target=47))]) == 0


def test_every_trial_config_of_a_search_is_checked(write_spec, capsys):
    path = write_spec("adapt_search", method={"name": "adapt", "max_len": 8, "n_k": 1},
                      search={"method.t_target": {"type": "int", "low": 24, "high": 50, "step": 4},
                              "method.score": {"type": "categorical", "choices": ["snip", "l2"]}})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "search (method.score=snip, method.t_target=48): method.t_target 48 prunes nothing" in err  # (keys as written)
    assert "method.t_target=24" not in err  # 24 tokens in 6 events of the 6 steps at n_k 1: reached
    path = write_spec("adapt_search", method={"name": "adapt", "max_len": 8, "n_k": 1},
                      search={"method.t_target": {"type": "int", "low": 20, "high": 44}})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "search (method.t_target=20): ADAPT cannot reach method.t_target 20: 28 of its 48" in err
    assert "6 steps give 6 at n_k 1. No n_k finishes at r_p 4: r_p 5 at n_k 1 would, as would more steps (" in err


def test_the_preflight_checks_with_the_real_backbone_and_data():
    # Not validated (as a spec of a dataset without a known class count would pass validation).
    spec = StudySpec.model_validate(deep_update(TINY, {
        "method": {"name": "adapt", "max_len": 8, "t_target": 8, "n_k": 4}, "search": {}}))
    with pytest.raises(MlgateError) as caught:
        preflight(spec)
    assert "40 of its 48 prompt tokens" in str(caught.value) and "6 steps give 1 at n_k 4" in str(caught.value)


def test_every_shipped_adapt_study_reaches_its_target_in_every_trial_config():
    checked = 0
    for path in list_studies():
        spec = load_spec(path)  # (validation refuses a config that does not)
        for _, config in schedule_configs(spec):
            if config.method.name != "adapt":
                continue
            layers, images = backbone_layers(config.backbone.name), training_images(config.data)
            assert layers is not None and images is not None, (path, config.data.name)
            assert trial_problem(config, layers, images) is None
            per_epoch = -(-images // config.train.batch_size)
            steps = config.train.steps or -(-int(config.train.epochs * per_epoch))
            m = config.method
            plan = plan_pruning(m.depth or layers, m.max_len, m.t_target, m.r_p, m.n_k, m.warmup_steps,
                                m.warmup_epochs, steps, per_epoch)
            assert plan.excess > 0 and plan.reaches, (path, config.data.name, m.t_target)
            checked += 1
    assert checked >= 6 + 8 + 5 + 2 * 11 + 5 * 11 + 3 * 11  # adapt, adapt_schedule, adapt_target; the paper tables
