"""Key/value-only prompts (ADAPT): prompt tokens join the keys and values of self-attention at each
layer, under a mask of the tokens that take part, while the queries and everything after attention
keep the sequence's own length."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mlgate.model.blocks import autocast_dtype, run_block
from mlgate.model.masks import aligned_zeros, per_sample


class KeyValuePrompts:
    """Key/value-prompt methods of :class:`~mlgate.model.clip.PromptedCLIP`."""

    @staticmethod
    def _kv_block(block: nn.Module, x: torch.Tensor, prompt: torch.Tensor | None,
                  mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        # Prompts join the keys and values of self-attention only: the query length, and everything
        # after attention, stay as they are. open_clip's block.forward would drop k_x/v_x here.
        prefix = None if prompt is None else block.ln_1(per_sample(prompt, x.shape[0]).to(x.dtype))
        return run_block(block, x, kv_prefix=prefix, mask=mask, rows=rows)

    @staticmethod
    def _kv_mask(base: torch.Tensor | None, length: int, n_prompt: int, active: torch.Tensor | None,
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        # Additive mask over [the P prompt tokens, the L positions]: a masked prompt token is -inf for
        # every query (no part in attention): (L, P + L), or None when every token takes part and there
        # is no base. Without a base (the image tower) it is one row, built once and expanded to every
        # query (fewer kernels than building the full mask, at every layer and step). ``active`` (K, P)
        # gives K layers' masks at once, (K, L, P + L), each starting on a 16-byte boundary
        # (aligned_zeros): CUDA's attention kernels read masks in 16-byte words and fault on one that
        # starts inside a word, as unpadded views into one (K, ...) tensor do.
        if n_prompt == 0 or (active is None and base is None):
            return base
        lead = () if active is None else active.shape[:-1]
        keys = n_prompt + length
        mask = aligned_zeros(*lead, 1 if base is None else length, keys, device=device, dtype=dtype)
        if base is not None:
            mask[..., n_prompt:] = base
        if active is not None:
            mask[..., :n_prompt].masked_fill_((active == 0).unsqueeze(-2), float("-inf"))
        return mask.expand(*lead, length, -1)

    def _kv_masks(self, base: torch.Tensor | None, length: int, prompts: Sequence[torch.Tensor | None],
                  active: Sequence[torch.Tensor | None] | torch.Tensor | None, layers: int,
                  device: torch.device, dtype: torch.dtype) -> list[torch.Tensor | None]:
        # Every layer's _kv_mask. With ``active`` a (K, P) tensor (ADAPT while it trains: prompts of P
        # tokens at layers 0..K-1), the K masks are built as one, in the dtype attention sees
        # (autocast's), so no layer casts its mask.
        sizes = [0 if i >= len(prompts) or prompts[i] is None else prompts[i].shape[-2] for i in range(layers)]
        if not isinstance(active, torch.Tensor):
            return [self._kv_mask(base, length, n, active[i] if active and i < len(active) else None, device, dtype)
                    for i, n in enumerate(sizes)]
        (k, p), dtype = active.shape, autocast_dtype(device.type) or dtype
        if sizes[:k] != [p] * k:
            raise ValueError(f"an active mask of {k} × {p} tokens needs P = {p} prompt tokens at layers 0..{k - 1}, "
                             f"not {sizes[:k]}")
        return [*self._kv_mask(base, length, p, active, device, dtype),
                *(self._kv_mask(base, length, n, None, device, dtype) for n in sizes[k:])]

    def encode_text_kv(self, x: torch.Tensor, eot_index: torch.Tensor, prompts: Sequence[torch.Tensor | None],
                       active: Sequence[torch.Tensor | None] | torch.Tensor | None = None) -> torch.Tensor:
        """Text features (N, E) with KV-only prompts: ``prompts[i]`` ((P, D) or None) at layer i,
        ``active[i]`` a (P,) 0/1 mask of the tokens that take part (None: all); ``active`` may be one
        (K, P) tensor for prompts of P tokens at layers 0..K-1."""
        x, cast = self._text_input(x)
        blocks = self.text.transformer.resblocks
        masks = self._kv_masks(self._causal_mask(x.shape[1], x.device, cast), x.shape[1], prompts, active,
                               len(blocks), x.device, cast)
        for i, (block, mask) in enumerate(zip(blocks, masks)):
            prompt = prompts[i] if i < len(prompts) else None
            x = self._kv_block(block, x, prompt, mask, eot_index if i == len(blocks) - 1 else None)
        return self._text_output(x)

    def encode_image_kv(self, images: torch.Tensor, prompts: Sequence[torch.Tensor | None],
                        active: Sequence[torch.Tensor | None] | torch.Tensor | None = None) -> torch.Tensor:
        """Image features (N, E) with KV-only prompts per layer (see :meth:`encode_text_kv`)."""
        visual = self.model.visual
        x = visual._embeds(images.to(visual.conv1.weight.dtype))
        blocks = visual.transformer.resblocks
        masks = self._kv_masks(None, x.shape[1], prompts, active, len(blocks), x.device, x.dtype)
        for i, (block, mask) in enumerate(zip(blocks, masks)):
            prompt = prompts[i] if i < len(prompts) else None
            x = self._kv_block(block, x, prompt, mask, self._pooled_rows(x) if i == len(blocks) - 1 else None)
        return self._image_output(x)
