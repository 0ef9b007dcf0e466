"""Zero-shot CLIP on the few-shot protocol's test splits: the papers' "ZS CLIP" row (``mlgate eval``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlgate.model import PromptedCLIP
from mlgate.data import FewShotData, Split

DEFAULT_TEMPLATE = "a photo of a {}."


@torch.no_grad()
def zero_shot_accuracy(clip: PromptedCLIP, split: Split, classnames: list[str], classes: list[int],
                       template: str = DEFAULT_TEMPLATE, batch: int = 256) -> float:
    """Top-1 accuracy (%) of hand-crafted prompts among ``classes`` on ``split``."""
    if len(split) == 0:
        return float("nan")
    device = next(iter(clip.model.parameters())).device
    weights = clip.encode_class_texts([template.format(classnames[c]) for c in classes])
    class_ids = torch.tensor(classes, device=device)
    correct = 0
    for i in range(0, len(split), batch):
        feats = F.normalize(clip.encode_image(split.images[i : i + batch].to(device)), dim=-1)
        pred = class_ids[(feats @ weights.t()).argmax(-1)]
        correct += int((pred == split.labels[i : i + batch].to(device)).sum())
    return 100.0 * correct / len(split)


def evaluate_zero_shot(clip: PromptedCLIP, data: FewShotData, template: str = DEFAULT_TEMPLATE) -> dict[str, float]:
    """``acc_base``, ``acc_novel`` and their harmonic mean ``acc_hm`` (percent)."""
    base = zero_shot_accuracy(clip, data.test_base, data.classnames, data.base, template)
    if not data.novel:
        return {"acc_base": base, "acc_novel": None, "acc_hm": base}
    novel = zero_shot_accuracy(clip, data.test_novel, data.classnames, data.novel, template)
    hm = 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
    return {"acc_base": base, "acc_novel": novel, "acc_hm": hm}
