"""Every tensor handed to attention starts on a 16-byte boundary (what CUDA's attention kernels read)."""

from __future__ import annotations

import math

import pytest
import torch

from mlgate.config.spec import StudySpec
from mlgate.model import load_backbone
from mlgate.training import train
from tests.conftest import TINY, deep_update


@pytest.mark.parametrize("method", ["coop", "cocoop", "maple", "bimaple", "adaptive_bimaple", "adapt"])
def test_attention_inputs_start_on_16_byte_boundaries(method, monkeypatch):
    # CUDA's attention kernels (cuDNN's, the memory-efficient one) read their inputs in 16-byte words
    # and do not all check where a view starts: a mask or a q/k/v that begins inside a word can fault
    # (views into one (layers, ...) tensor of masks, say). Every tensor handed to attention, in
    # training, evaluation and the bench's reference pass, starts on a 16-byte boundary.
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

    from mlgate.bench.reference import ReferenceCLIP
    from mlgate.methods import build_method

    clip = ReferenceCLIP.of(load_backbone("mlgate-tiny", "mlgate"))
    model = build_method(spec.method, clip, [f"class {i}" for i in range(3)]).train()
    images = torch.randn(2, 3, clip.image_norm.size, clip.image_norm.size)
    model(images if model.prompts_vision else clip.encode_image(images), torch.arange(3)).sum().backward()
    assert misaligned == []
