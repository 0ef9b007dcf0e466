"""Procedural shapes: reproducible image–caption data for the embedded CLIP, and its downstream task.

Images are 32×32 RGB renderings of one coloured shape (size, position, jitter and noise vary);
captions describe it compositionally ("a large red circle on the left"). Some colour–shape
combinations are held out of pretraining: they are the novel classes of the bundled ``shapes`` task,
unseen as classes but describable in words, as novel classes are for real CLIP.
"""

from __future__ import annotations

import numpy as np

COLORS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.15, 0.25, 0.95), "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.1, 0.8), "orange": (1.0, 0.5, 0.0), "white": (0.95, 0.95, 0.95), "cyan": (0.1, 0.85, 0.9),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring")
SIZES = {"small": 5.0, "large": 10.0}
POSITIONS = {"left": (16, 9), "right": (16, 23), "top": (9, 16), "bottom": (23, 16), "center": (16, 16)}
IMAGE_SIZE = 32

# The downstream task's classes: base combinations are seen in pretraining, novel ones never are.
BASE_CLASSES = [("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "cross"),
                ("purple", "ring"), ("orange", "circle"), ("white", "square"), ("cyan", "triangle"),
                ("red", "cross"), ("green", "ring")]
NOVEL_CLASSES = [("blue", "circle"), ("yellow", "square"), ("purple", "triangle"), ("orange", "cross"),
                 ("white", "ring"), ("cyan", "circle"), ("red", "square"), ("green", "triangle"),
                 ("blue", "cross"), ("yellow", "ring")]
HELD_OUT = set(NOVEL_CLASSES)
CLASSNAMES = [f"{c} {s}" for c, s in BASE_CLASSES + NOVEL_CLASSES]

_yy, _xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


def shape_mask(shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean 32×32 mask of a shape centred at (cy, cx) with half-size r."""
    dy, dx = _yy - cy, _xx - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "cross":
        w = max(1.0, r * 0.35)
        return ((np.abs(dy) <= w) & (np.abs(dx) <= r)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))
    if shape == "ring":
        d = np.sqrt(dy**2 + dx**2)
        return (d <= r) & (d >= r * 0.55)
    raise ValueError(f"unknown shape {shape!r}")


def render(color: str, shape: str, size: str, position: str, rng: np.random.Generator) -> np.ndarray:
    """One (32, 32, 3) float image in [0, 1]."""
    background = rng.uniform(0.0, 0.35) * np.ones(3) + rng.normal(0, 0.03, 3)
    image = np.broadcast_to(background, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    cy, cx = POSITIONS[position]
    cy, cx = cy + rng.uniform(-2, 2), cx + rng.uniform(-2, 2)
    r = SIZES[size] * rng.uniform(0.85, 1.15)
    tint = np.clip(np.asarray(COLORS[color]) + rng.normal(0, 0.05, 3), 0, 1)
    image[shape_mask(shape, cy, cx, r)] = tint
    image += rng.normal(0, 0.04, image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


_TEMPLATES = ("a {size} {color} {shape} on the {position}.", "a photo of a {color} {shape}.",
              "a {color} {shape}.", "a {size} {color} {shape}.", "a {color} {shape} on the {position}.",
              "the {shape} is {color}.", "a photo of a {size} {color} {shape}.")


def sample_pairs(n: int, seed: int, exclude: set[tuple[str, str]] = HELD_OUT) -> tuple[np.ndarray, list[str]]:
    """``n`` pretraining images (n, 32, 32, 3) and captions; ``exclude`` combinations never appear."""
    rng = np.random.default_rng(seed)
    combos = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in exclude]
    images, captions = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32), []
    for i in range(n):
        color, shape = combos[rng.integers(len(combos))]
        size, position = rng.choice(list(SIZES)), rng.choice(list(POSITIONS))
        images[i] = render(color, shape, size, position, rng)
        template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        captions.append(template.format(size=size, color=color, shape=shape, position=position))
    return images, captions


# The downstream domain is shifted from pretraining (noisier, lower contrast), as real downstream
# datasets are from CLIP's web data: zero-shot transfer works, but not perfectly.
TASK_NOISE, TASK_CONTRAST = 0.3, 0.6


def task_images(per_class: int, seed: int, noise: float = TASK_NOISE, contrast: float = TASK_CONTRAST
                ) -> tuple[np.ndarray, np.ndarray]:
    """The downstream task: ``per_class`` images of each class in :data:`CLASSNAMES` and their labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, (color, shape) in enumerate(BASE_CLASSES + NOVEL_CLASSES):
        for _ in range(per_class):
            image = render(color, shape, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)), rng)
            image = contrast * image + (1 - contrast) * image.mean((0, 1), keepdims=True)
            images.append(np.clip(image + rng.normal(0, noise, image.shape), 0, 1).astype(np.float32))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)
