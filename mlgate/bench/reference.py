"""The reference configuration of ``mlgate bench``: mlgate's methods on a backbone that works the way
the reference trainers' CLIP does, built from open_clip's own pieces.

Every text sequence runs at the full context length (77 tokens: a prompt padded as the tokenizer pads
it), through open_clip's own block forward with its causal mask; no prompt shares work with another
(no shared prefix, no packing, no chunks); the vision tower runs its own blocks on every row. The
methods are unchanged: they call the same encoder methods, here written out plainly. The values and
gradients equal mlgate's (tests/test_reference.py), so the bench compares the same model computed two ways.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mlgate.model import PromptedCLIP
from mlgate.model.masks import per_sample


class ReferenceCLIP(PromptedCLIP):
    """:class:`PromptedCLIP`'s encoders written the reference trainers' way, on the same frozen model."""

    @classmethod
    def of(cls, clip: PromptedCLIP) -> ReferenceCLIP:
        """A reference view of ``clip`` (the same open_clip model and tokenizer)."""
        return cls(clip.model, clip.tokenizer, clip.name)

    # ---- text ------------------------------------------------------------------------------------

    def _full_context(self, x: torch.Tensor) -> torch.Tensor:
        # Token embeddings (N, L, D) padded to the context length with the padding token's embedding.
        context = self.text.positional_embedding.shape[0]
        if x.shape[1] >= context:
            return x
        pad = self.text.token_embedding.weight[0].to(x.dtype).expand(x.shape[0], context - x.shape[1], -1)
        return torch.cat([x, pad], 1)

    def _causal(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)

    def _pool_text(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        x = self.text.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])
        proj = self.text.text_projection
        return x if proj is None else proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text_embeddings(self, x: torch.Tensor, eot_index: torch.Tensor, n_prompt: int = 0,
                               deep: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        cast = self.text.transformer.get_cast_dtype()
        x = self._full_context(x.to(cast))
        x = x + self.text.positional_embedding[: x.shape[1]].to(cast)
        eot = eot_index
        for i, block in enumerate(self.text.transformer.resblocks):
            prompt = deep[i] if 0 < i < len(deep) else None
            if prompt is not None:  # MaPLe: replace the prompt tokens after SOS
                prompt = per_sample(prompt, x.shape[0]).to(cast)
                x = torch.cat([x[:, :1], prompt, x[:, 1 + n_prompt:]], dim=1)
                eot, n_prompt = eot + prompt.shape[1] - n_prompt, prompt.shape[1]
            x = block(x, attn_mask=self._causal(x.shape[1], x.device, x.dtype))
        return self._pool_text(x, eot)

    def encode_text_shared_prefix(self, shared: torch.Tensor, own: torch.Tensor,
                                  eot_index: torch.Tensor) -> torch.Tensor:
        groups, n = shared.shape[0], own.shape[0]
        prompts = torch.cat([shared.unsqueeze(1).expand(-1, n, -1, -1),
                             own.to(shared.dtype).unsqueeze(0).expand(groups, -1, -1, -1)], 2)
        return self.encode_text_embeddings(prompts.flatten(0, 1), eot_index.repeat(groups))

    # ---- vision ----------------------------------------------------------------------------------

    def _image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)

    def _pool_image(self, x: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

    def encode_image_prompted(self, images: torch.Tensor, shallow: torch.Tensor | None = None,
                              deep: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        visual = self.model.visual
        x = self._image_tokens(images)
        n_prompt = 0
        if shallow is not None:
            shallow = per_sample(shallow, x.shape[0]).to(x.dtype)
            x, n_prompt = torch.cat([x, shallow], dim=1), shallow.shape[1]
        x = visual.ln_pre(x)
        for i, block in enumerate(visual.transformer.resblocks):
            prompt = deep[i] if 0 < i < len(deep) else None
            if prompt is not None:  # MaPLe: replace the prompt tokens at the end
                prompt = per_sample(prompt, x.shape[0]).to(x.dtype)
                x, n_prompt = torch.cat([x[:, : x.shape[1] - n_prompt], prompt], dim=1), prompt.shape[1]
            x = block(x)
        return self._pool_image(x)

    # ---- key/value prompts (ADAPT) --------------------------------------------------------------

    @staticmethod
    def _kv_block(block: nn.Module, x: torch.Tensor, prompt: torch.Tensor | None, mask: torch.Tensor | None,
                  active: torch.Tensor | None) -> torch.Tensor:
        # open_clip's own attention and MLP with the prompt's tokens among the keys and values only.
        q = block.ln_1(x)
        if prompt is None:
            return block(x, attn_mask=mask)
        kv = torch.cat([block.ln_1(per_sample(prompt, x.shape[0]).to(x.dtype)), q], 1)
        columns = torch.zeros(prompt.shape[-2], device=x.device, dtype=x.dtype)
        if active is not None:
            columns = columns.masked_fill(active == 0, float("-inf"))
        base = torch.zeros(x.shape[1], x.shape[1], device=x.device, dtype=x.dtype) if mask is None else mask
        full = torch.cat([columns.expand(x.shape[1], -1), base], 1)
        x = x + block.ls_1(block.attention(q_x=q, k_x=kv, v_x=kv, attn_mask=full))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def encode_text_kv(self, x: torch.Tensor, eot_index: torch.Tensor, prompts: Sequence[torch.Tensor | None],
                       active: Sequence[torch.Tensor | None] | torch.Tensor | None = None) -> torch.Tensor:
        cast = self.text.transformer.get_cast_dtype()
        x = self._full_context(x.to(cast))
        x = x + self.text.positional_embedding[: x.shape[1]].to(cast)
        mask = self._causal(x.shape[1], x.device, x.dtype)
        for i, block in enumerate(self.text.transformer.resblocks):
            prompt = prompts[i] if i < len(prompts) else None
            x = self._kv_block(block, x, prompt, mask, None if active is None or i >= len(active) else active[i])
        return self._pool_text(x, eot_index)

    def encode_image_kv(self, images: torch.Tensor, prompts: Sequence[torch.Tensor | None],
                        active: Sequence[torch.Tensor | None] | torch.Tensor | None = None) -> torch.Tensor:
        visual = self.model.visual
        x = visual.ln_pre(self._image_tokens(images))
        for i, block in enumerate(visual.transformer.resblocks):
            prompt = prompts[i] if i < len(prompts) else None
            x = self._kv_block(block, x, prompt, None, None if active is None or i >= len(active) else active[i])
        return self._pool_image(x)
