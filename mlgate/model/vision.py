"""The vision tower of :class:`~mlgate.model.clip.PromptedCLIP`: plain, or with MaPLe-style prompt
tokens appended to the ViT sequence."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from mlgate.model.blocks import frozen_operands, run_block
from mlgate.model.masks import per_sample


class VisionTower:
    """Vision-tower methods of :class:`~mlgate.model.clip.PromptedCLIP` (``self.model.visual`` is
    open_clip's vision transformer)."""

    def encode_image_prompted(self, images: torch.Tensor, shallow: torch.Tensor | None = None,
                              deep: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        """Image features (N, E) with prompt tokens appended to the ViT sequence (MaPLe-style).

        ``shallow`` ((n, Dv) or (N, n, Dv)) is appended before ``ln_pre``; ``deep[i]`` replaces the
        prompt tokens (the last ones) at the input of layer ``i``, or None to carry them on. Pooling
        is on the CLS token, so prompts need no mask.
        """
        visual = self.model.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        n_prompt = 0
        if shallow is not None:
            shallow = per_sample(shallow, x.shape[0]).to(x.dtype)
            x = torch.cat([x, shallow], dim=1)
            n_prompt = shallow.shape[1]
        x = visual.ln_pre(x)
        for i, block in enumerate(visual.transformer.resblocks):
            prompt = deep[i] if 0 < i < len(deep) else None
            if prompt is not None:
                prompt = per_sample(prompt, x.shape[0]).to(x.dtype)
                x = torch.cat([x[:, : x.shape[1] - n_prompt], prompt], dim=1)
                n_prompt = prompt.shape[1]
            x = run_block(block, x, rows=self._pooled_rows(x) if i == len(visual.transformer.resblocks) - 1 else None)
        return self._image_output(x)

    def _pooled_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        # The CLS row, when the vision tower pools on it alone (CLIP's ViTs): the last block needs no other.
        visual = self.model.visual
        if visual.attn_pool is not None or getattr(visual, "pool_type", None) != "tok":
            return None
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def _image_output(self, x: torch.Tensor) -> torch.Tensor:
        # Pooling (on CLS) and projection into the joint space.
        visual = self.model.visual
        pooled, _ = visual._pool(x)
        return pooled @ frozen_operands(visual, "proj", (visual.proj,), x)[0] if visual.proj is not None else pooled

    # ---- ADAPT-style prompts: extra keys and values only -------------------------------------------

    @torch.no_grad()
    def image_layer_inputs(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """The token states (N, L, D) at the input of each vision block in turn, for images (N, 3, H, W)."""
        visual = self.model.visual
        x = visual._embeds(images.to(visual.conv1.weight.dtype))
        for block in visual.transformer.resblocks:
            yield x
            x = run_block(block, x)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image features (N, E) from the frozen vision tower."""
        return self.model.encode_image(images)
