"""mlgate's prompted forward against the bench's reference (open_clip's own blocks on the full 77-token
context, every prompt in its own sequence): the same logits and gradients, for every method."""

from __future__ import annotations

import threading

import pytest
import torch

from mlgate.bench.reference import ReferenceCLIP
from mlgate.config.methods import METHOD_CONFIGS
from mlgate.methods import build_method
from mlgate.model import load_backbone

CLASSES = ["red circle", "a very long class name indeed", "x"]


@pytest.fixture(scope="module")
def clip():
    return load_backbone("mlgate-tiny", "mlgate")


def _logits_and_grads(clip, name: str, train: bool):
    torch.manual_seed(0)
    method = build_method(METHOD_CONFIGS[name](), clip, CLASSES).train(train)
    images = torch.randn(2, 3, clip.image_norm.size, clip.image_norm.size, generator=torch.Generator().manual_seed(0))
    inputs = images if method.prompts_vision else clip.encode_image(images)
    logits = method(inputs, torch.arange(len(CLASSES)))
    params = [p for p in method.parameters() if p.requires_grad]
    grads = torch.autograd.grad(logits.logsumexp(-1).sum(), params, allow_unused=True)
    return logits.detach(), [g for g in grads if g is not None]


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
@pytest.mark.parametrize("train", [True, False], ids=["training", "inference"])
def test_every_method_gives_the_references_logits_and_gradients(clip, name, train):
    ours, our_grads = _logits_and_grads(clip, name, train)
    theirs, their_grads = _logits_and_grads(ReferenceCLIP.of(clip), name, train)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert len(our_grads) == len(their_grads) > 0
    for got, want in zip(our_grads, their_grads):
        torch.testing.assert_close(got, want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=1e-4)


def test_chunked_text_passes_backpropagate_from_another_thread(clip, monkeypatch):
    # On CUDA the backward, and so checkpointing's recomputation of the chunked text pass, runs in the
    # autograd engine's own thread; a backward from another thread must give the same gradient.
    monkeypatch.setattr(clip, "text_chunk", 4)
    torch.manual_seed(0)
    method = build_method(METHOD_CONFIGS["coop"](), clip, [f"c{i}" for i in range(10)])
    features = torch.randn(3, clip.model.visual.output_dim)
    method(features, torch.arange(10)).logsumexp(-1).sum().backward()
    here, method.ctx.grad = method.ctx.grad.clone(), None
    loss = method(features, torch.arange(10)).logsumexp(-1).sum()
    errors: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(errors, loss.backward))
    worker.start()
    worker.join()
    assert errors == []
    torch.testing.assert_close(method.ctx.grad, here)


def _capture(errors: list, fn) -> None:
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - re-checked in the test's thread
        errors.append(error)
