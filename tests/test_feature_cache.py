"""The frozen-feature cache: computed once per backbone and pixels, shared by trials and workers, and
equal to encoding the images every step."""

from __future__ import annotations


import torch

from mlgate.data import load_dataset
from mlgate.model import load_backbone
from mlgate.training.features import FeatureCache, cache_dir


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
