"""Pretrain the embedded backbone ``mlgate-tiny`` contrastively on procedural shapes (``mlgate.shapes``).

    python -m mlgate.model.pretrain --steps 4000 --out mlgate/model/weights/mlgate-tiny.pt

Deterministic by seed; a few minutes on 2 CPU cores. The weights are stored in fp16 and compactly: only
the token-embedding rows of words the captions use (the rest of the 49,408-token table is never
trained and is zero at load time), which keeps the file at a few MB.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from mlgate.model import EMBEDDED_BACKBONE, PromptedCLIP
from mlgate.model.backbone import WEIGHTS_DIR, save_compact
from mlgate.data.shapes import BASE_CLASSES, CLASSNAMES, COLORS, POSITIONS, SHAPES, SIZES, sample_pairs

WEIGHTS = WEIGHTS_DIR / f"{EMBEDDED_BACKBONE}.pt"
PROMPT = "a photo of a {}."


def to_model_images(images: np.ndarray, clip: PromptedCLIP) -> torch.Tensor:
    """(N, 32, 32, 3) floats in [0, 1] → normalized (N, 3, S, S) for the backbone."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2)
    if x.shape[-1] != clip.image_norm.size:
        x = F.interpolate(x, size=clip.image_norm.size, mode="bilinear", align_corners=False)
    mean = torch.tensor(clip.image_norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.image_norm.std).view(1, 3, 1, 1)
    return (x - mean) / std


def vocabulary_token_ids(clip: PromptedCLIP) -> torch.Tensor:
    """Every token id the captions and class prompts can use (the rows worth storing)."""
    words = [*COLORS, *SHAPES, *SIZES, *POSITIONS, "a photo of a the is on ."]
    texts = words + [PROMPT.format(c) for c in CLASSNAMES] + ["X X X X", "X X"]
    return torch.unique(clip.tokenize(texts))


@torch.no_grad()
def zero_shot(clip: PromptedCLIP, images: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> float:
    """Zero-shot accuracy (%) with "a photo of a {class}." among ``classes``."""
    text = clip.encode_class_texts([PROMPT.format(CLASSNAMES[c]) for c in classes])
    keep = torch.isin(labels, torch.tensor(classes))
    feats = F.normalize(clip.encode_image(images[keep]), dim=-1)
    pred = torch.tensor(classes)[(feats @ text.t()).argmax(-1)]
    return 100.0 * (pred == labels[keep]).float().mean().item()


def pretrain(steps: int = 4000, batch: int = 256, lr: float = 2e-3, seed: int = 0, out: Path = WEIGHTS,
             log_every: int = 200) -> dict:
    """Contrastive (CLIP) pretraining of ``mlgate-tiny`` on procedural shapes; writes ``out`` and a
    ``.json`` beside it with the checksum and zero-shot figures."""
    torch.manual_seed(seed)
    model = open_clip.create_model(EMBEDDED_BACKBONE, pretrained=None)
    clip = PromptedCLIP(model, open_clip.get_tokenizer(EMBEDDED_BACKBONE), EMBEDDED_BACKBONE)
    model.requires_grad_(True)  # PromptedCLIP freezes the backbone; here it is what we train
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    from mlgate.data.shapes import task_images

    # Progress is judged in the pretraining domain (clean renderings); `mlgate eval` gives the downstream task.
    eval_images, eval_labels = task_images(20, seed=seed + 10_000, noise=0.04, contrast=1.0)
    eval_x, eval_y = to_model_images(eval_images, clip), torch.as_tensor(eval_labels)
    base, novel = list(range(len(BASE_CLASSES))), list(range(len(BASE_CLASSES), len(CLASSNAMES)))
    start = time.time()
    for step in range(steps):
        factor = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        images, captions = sample_pairs(batch, seed=seed * 1_000_003 + step)
        tokens = clip.tokenize(captions)
        eot = clip.eot_index(tokens)
        tokens = tokens[:, : int(eot.max()) + 1]
        image_features = F.normalize(clip.encode_image(to_model_images(images, clip)), dim=-1)
        text_features = F.normalize(clip.encode_text_embeddings(clip.embed_tokens(tokens), eot), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image_features @ text_features.t()
        # Captions repeat in a batch: every pair with the same caption is a positive.
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} loss {loss.item():.3f} zero-shot base "
                  f"{zero_shot(clip, eval_x, eval_y, base):.1f}% novel {zero_shot(clip, eval_x, eval_y, novel):.1f}% "
                  f"({time.time() - start:.0f}s)", flush=True)
    sha = save_compact(model, vocabulary_token_ids(clip), out)
    info = {"sha256": sha, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "pretraining_domain_zero_shot_base": zero_shot(clip, eval_x, eval_y, base),
            "pretraining_domain_zero_shot_novel": zero_shot(clip, eval_x, eval_y, novel),
            "seconds": round(time.time() - start)}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlgate.model.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(json.dumps(pretrain(args.steps, args.batch, args.lr, args.seed, args.out), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
