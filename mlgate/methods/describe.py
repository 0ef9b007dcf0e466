"""``mlgate describe``: a method's trainable parameters by group and its inference cost per image.

FLOPs are counted with PyTorch's ``FlopCounterMode`` on real inference forwards (eval mode, so gated
methods are measured with their thresholded, shorter prompts). Running a batch of one image and of two
separates what each image costs from what is paid once (encoding static class prompts).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

from mlgate.model import EMBEDDED_BACKBONE, load_backbone
from mlgate.errors import SpecError
from mlgate.methods import build_method, method_class, method_names
from mlgate.config import readable_problems
from mlgate.config.dotted import parse_assignment, set_dotted


def method_config(name: str, overrides: list[str]):
    """The method's config with ``method.KEY=VALUE`` overrides, validated like a spec."""
    try:
        cls = method_class(name).Config
    except KeyError:
        raise SpecError(f"METHOD: unknown method {name!r}; valid: {', '.join(method_names())}.") from None
    data: dict[str, Any] = {"name": name}
    for text in overrides:
        key, value = parse_assignment(text)
        if not key.startswith("method."):
            raise SpecError(f"--set {text!r}: describe takes method settings only (method.KEY=VALUE).")
        set_dotted(data, key.removeprefix("method."), value)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"method {name!r}: invalid settings.",
                        [f"method.{p}" for p in readable_problems(exc)]) from None


def _flops(fn) -> int:
    # nn.MultiheadAttention's fused inference fast path hides its matmuls from the counter: turn it off.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()


def describe(name: str, backbone: str = EMBEDDED_BACKBONE, overrides: list[str] | None = None,
             n_classes: int = 10) -> dict[str, Any]:
    """Trainable parameters (total and by group) and inference GFLOPs of ``name`` on ``backbone``."""
    cfg = method_config(name, overrides or [])
    clip = load_backbone(backbone, None, "cpu")
    method = build_method(cfg, clip, [f"class {i}" for i in range(n_classes)])
    groups = {g: sum(p.numel() for p in ps) for g, ps in method.param_groups().items()}
    method.eval().requires_grad_(False)  # counted above; inference needs no autograd
    per_image, once = inference_gflops(method, clip, n_classes)
    info = {
        "method": name,
        "backbone": backbone,
        "settings": cfg.model_dump(mode="json"),
        "trainable_params": sum(groups.values()),
        "params_by_group": groups,
        "classes": n_classes,
        "gflops_per_image": per_image,
        "gflops_once": once,  # class prompts encoded once and reused for every image
    }
    t_target = getattr(cfg, "t_target", None)
    if t_target is not None:  # ADAPT: what pruning to t_target leaves (the split between branches varies)
        widths = (clip.text_width, clip.vision_width)
        info["prompt_tokens_unpruned"] = sum(groups.values()) // sum(widths) * 2
        info["prompt_tokens_pruned"] = min(t_target, info["prompt_tokens_unpruned"])
        info["pruned_params_range"] = [info["prompt_tokens_pruned"] * min(widths),
                                       info["prompt_tokens_pruned"] * max(widths)]
    return info


def inference_gflops(method, clip, n_classes: int) -> tuple[float, float]:
    """GFLOPs per image and GFLOPs paid once (static class prompts) of ``method`` in its current mode."""
    size = clip.image_norm.size
    device = next(iter(clip.model.parameters())).device
    classes = torch.arange(n_classes, device=device)

    def forward(n_images: int) -> int:
        images = torch.randn(n_images, 3, size, size, device=device)
        if method.prompts_vision:
            return _flops(lambda: method(images, classes))
        features = clip.encode_image(images)
        return _flops(lambda: clip.encode_image(images)) + _flops(lambda: method(features, classes))

    trainable = [p for p in method.parameters() if p.requires_grad]
    for p in trainable:  # inference needs no autograd (and the counter's module tracker trips on it)
        p.requires_grad_(False)
    try:
        one, two = forward(1), forward(2)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return (two - one) / 1e9, (2 * one - two) / 1e9
