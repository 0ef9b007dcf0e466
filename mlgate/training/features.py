"""Frozen image features for methods that do not prompt the vision tower (CoOp, CoCoOp): computed
once per backbone × preprocessed pixels and kept on disk, so every epoch, trial and worker reuses them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from mlgate.config.spec import StudySpec
from mlgate.data import FewShotData, Split, cache_root
from mlgate.data.images import ImageSet
from mlgate.model import PromptedCLIP
from mlgate.training.batches import read_ahead


def cache_dir() -> Path:
    """Where frozen image features are kept between trials and workers ($MLGATE_CACHE_DIR)."""
    return cache_root() / "features"


class FeatureCache:
    """Frozen image features for methods that do not prompt the vision tower, computed once per
    backbone × images (the preprocessed pixels are part of the key) and kept on disk, so every epoch,
    every trial of a study and every worker on the machine reuse them."""

    def __init__(self, clip: PromptedCLIP, device: torch.device, weights: str | None, batch: int = 256) -> None:
        self.clip, self.device, self.batch = clip, device, batch
        self.key = f"{clip.name}|{weights}"

    def path(self, split: Split) -> Path:
        digest = hashlib.sha1(self.key.encode())
        if isinstance(split.images, torch.Tensor):
            digest.update(split.images.detach().cpu().contiguous().numpy().tobytes())
        else:  # files read on demand: their identity and the preprocessing
            digest.update(split.images.fingerprint().encode())
        return cache_dir() / f"{digest.hexdigest()}.pt"

    @torch.no_grad()
    def __call__(self, split: Split) -> Split:
        path = self.path(split)
        if path.is_file():
            features = torch.load(path, map_location=self.device, weights_only=True)
            return Split(features, split.labels.to(self.device))
        chunks = (slice(i, i + self.batch) for i in range(0, len(split), self.batch))
        feats = [self.clip.encode_image(images.to(self.device)).float()  # (files: the next chunk loads meanwhile)
                 for images in read_ahead(split.images, chunks, ahead=self.device.type == "cuda")]
        features = torch.cat(feats) if feats else torch.empty(0, self.clip.model.visual.output_dim, device=self.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(features.cpu(), tmp)
        os.replace(tmp, path)  # atomic: a concurrent worker sees the whole file or none
        return Split(features, split.labels.to(self.device))


def frozen_features(clip: PromptedCLIP, data: FewShotData, spec: StudySpec, device: torch.device) -> dict[str, Split]:
    """The splits as cached frozen image features. With augmentation on image files, training gets
    ``data.augment_views`` views of every image (each cached on its own), laid out view after view:
    a batch drawn from them picks an (image, view) pair, as an augmenting data loader would."""
    cache = FeatureCache(clip, device, spec.backbone.pretrained)
    splits = {"val": cache(data.val), "test_base": cache(data.test_base), "test_novel": cache(data.test_novel)}
    if augments(spec, data.train):
        views = [cache(Split(data.train.images.augmented(seed=v), data.train.labels))
                 for v in range(spec.data.augment_views)]
        splits["train"] = Split(torch.cat([v.images for v in views]), torch.cat([v.labels for v in views]))
    else:
        splits["train"] = cache(data.train)
    return splits


def augments(spec: StudySpec, split: Split) -> bool:
    return spec.data.augment and isinstance(split.images, ImageSet)
