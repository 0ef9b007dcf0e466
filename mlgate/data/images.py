"""Images as a backbone wants them: :class:`ImageNorm`, and image files read on demand, in parallel
threads, with test-time preprocessing or the references' training augmentation (:class:`ImageSet`)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlgate.errors import MlgateError


@dataclass(frozen=True)
class ImageNorm:
    """What images must look like for a backbone: size and normalization."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_LOADERS: ThreadPoolExecutor | None = None


def _loaders() -> ThreadPoolExecutor:
    # Threads, not processes: PIL decodes and resizes with the GIL released, so a batch's files load
    # in parallel with no pickling, and no forked copy of a process that holds a CUDA context.
    global _LOADERS
    if _LOADERS is None:
        _LOADERS = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="mlgate-images")
    return _LOADERS


class PendingBatch:
    """A batch of image files loading in the background (:meth:`ImageSet.fetch`), each file decoded
    straight into its row of one host buffer (pinned for a GPU)."""

    def __init__(self, batch: torch.Tensor, loads: list[Future], device: torch.device) -> None:
        self._batch, self._loads, self._device = batch, loads, device

    def result(self) -> torch.Tensor:
        """The normalized batch on the set's device (the copy to a GPU does not wait for it)."""
        for load in self._loads:
            load.result()  # (raises what a load raised)
        return self._batch.to(self._device, non_blocking=True)


class ImageSet:
    """Image files read on demand: ``images[idx]`` (a slice, or an index tensor) is a normalized batch,
    its files loaded in parallel; :meth:`fetch` starts the loading and returns before it is done.

    Test-time preprocessing: short-side resize and centre crop. With ``augment`` (training), the
    references' augmentation instead: a random resized crop (scale 0.08–1, aspect 3/4–4/3) and a random
    horizontal flip, each image drawn from a generator seeded by ``seed`` and the number of the draw
    (images drawn from this set so far), so the crops do not depend on which thread loads what.
    """

    def __init__(self, paths: list[Path], norm: ImageNorm, device: torch.device | str = "cpu",
                 augment: bool = False, seed: int = 0) -> None:
        self.paths, self.norm, self.device = list(paths), norm, torch.device(device)
        self.augment, self.seed = augment, seed
        self._draws = 0

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """Identifies the pixels: the files (path, size, mtime) and the preprocessing (for augmented
        views, the seed of their crops and flips: a fresh set's first pass over its files)."""
        view = ("augment", self.seed, "per-draw") if self.augment else ("center",)
        h = hashlib.sha1(repr((self.norm.size, self.norm.mean, self.norm.std, view)).encode())
        for p in self.paths:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.paths, self.norm, device, self.augment, self.seed)

    def subset(self, keep: torch.Tensor) -> ImageSet:
        return ImageSet([p for p, k in zip(self.paths, keep.tolist()) if k], self.norm, self.device,
                        self.augment, self.seed)

    def augmented(self, seed: int) -> ImageSet:
        """The same files with training augmentation."""
        return ImageSet(self.paths, self.norm, self.device, True, seed)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        return self.fetch(idx).result()

    def fetch(self, idx: Any) -> PendingBatch:
        """Start loading ``self[idx]`` (a slice, or host indices) in the background."""
        if isinstance(idx, slice):
            chosen = self.paths[idx]
        else:
            chosen = [self.paths[i] for i in torch.as_tensor(idx).reshape(-1).tolist()]
        first, self._draws = self._draws, self._draws + len(chosen)
        size = self.norm.size
        batch = torch.empty(len(chosen), 3, size, size, pin_memory=self.device.type == "cuda")
        loads = [_loaders().submit(self._load_into, batch[i], path, first + i) for i, path in enumerate(chosen)]
        return PendingBatch(batch, loads, self.device)

    def _load_into(self, row: torch.Tensor, path: Path, draw: int) -> None:
        row.copy_(self._load(path, draw))

    def _center(self, im):
        from PIL import Image

        w, h = im.size
        scale = self.norm.size / min(w, h)
        im = im.resize((max(self.norm.size, round(w * scale)), max(self.norm.size, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - self.norm.size) // 2, (h - self.norm.size) // 2
        return im.crop((left, top, left + self.norm.size, top + self.norm.size))

    def _random_resized_crop(self, im, rng: np.random.Generator):
        from PIL import Image

        box = _crop_box(*im.size, rng)
        if box is None:
            return self._center(im)
        return im.crop(box).resize((self.norm.size, self.norm.size), Image.BICUBIC)

    def _load(self, path: Path, draw: int) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(path) as im:
                if self.augment:
                    rng = np.random.default_rng((self.seed, draw))
                    im = self._random_resized_crop(im.convert("RGB"), rng)
                    if rng.random() < 0.5:
                        im = im.transpose(Image.FLIP_LEFT_RIGHT)
                else:
                    im = self._center(im.convert("RGB"))
                x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        except OSError as exc:
            raise MlgateError(f"data: cannot read image {path} ({exc}).") from None
        mean = torch.tensor(self.norm.mean).view(3, 1, 1)
        std = torch.tensor(self.norm.std).view(3, 1, 1)
        return (x - mean) / std


def _crop_box(w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    # A random area (8%–100%) and aspect ratio (3/4–4/3) that fits the image; None after 10 misses.
    for _ in range(10):
        area = w * h * rng.uniform(0.08, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    return None
