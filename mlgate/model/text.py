"""The text tower of :class:`~mlgate.model.clip.PromptedCLIP`, driven block by block on token embeddings.

Paths, chosen by :meth:`TextTower.encode_text_shared_prefix` for prompts that share an opening (SOS and a
context): packed into one sequence with a block mask (few prompts), the shared part as a key/value
prefix (many prompts), or assembled and encoded one sequence each. Long label sets are encoded in
chunks under activation checkpointing, so memory follows the chunk, not the number of classes.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlgate.model.blocks import autocast_dtype, frozen_operands, lean, run_block
from mlgate.model.frozen import derive_once
from mlgate.model.masks import aligned_zeros, per_sample


class TextTower:
    """Text-tower methods of :class:`~mlgate.model.clip.PromptedCLIP` (``self.text`` is open_clip's
    text tower)."""

    #: Prompts encoded per chunk when training on many classes: with gradient checkpointing, memory
    #: grows with the chunk, not with the label set (CoOp on ImageNet-1k's 1000 class prompts).
    text_chunk: int = 256
    # The key/value-prefix pass costs a few extra kernels per layer: it pays from about a hundred
    # token rows saved ((N - 1) × shared length).
    shared_prefix_min_rows: int = 100
    # Up to this many rows, the prompts are packed into one sequence instead (see _encode_packed): as
    # few kernels as the plain pass, the shared part computed once; its attention grows with the
    # square of the packed length, so long label sets take the key/value-prefix pass.
    packed_max_rows: int = 256

    def encode_text_embeddings(self, x: torch.Tensor, eot_index: torch.Tensor, n_prompt: int = 0,
                               deep: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        """Text features (N, E) of embedded prompts; see :meth:`_encode_text`. Above ``text_chunk``
        sequences, and when gradients are needed, chunks are encoded under activation checkpointing."""
        return self._chunked(self._encode_text, x, eot_index, lambda part: (
            n_prompt, [d[part] if d is not None and d.dim() == 3 else d for d in deep]))

    def encode_text_shared_prefix(self, shared: torch.Tensor, own: torch.Tensor,
                                  eot_index: torch.Tensor) -> torch.Tensor:
        """Text features (G × N, E) of G groups of N prompts: prompt (g, n) is ``shared[g]`` (S
        embeddings the group's prompts all open with: SOS and a context) followed by ``own[n]``
        (prompt n's own L − S embeddings: class name, '.', EOT, frozen). ``eot_index`` (N,) is each
        prompt's EOT position. CoOp has one group; CoCoOp one per image. Same features as
        :meth:`encode_text_embeddings` on the assembled (G × N, L, D) prompts, group-major, without
        building them or paying for the shared part once per prompt: under causal attention the shared
        positions' states are the same in all of a group's prompts, so they are computed once.

        Few prompts per group are packed into one sequence (:meth:`_encode_packed`); more, and (with
        one group) the shared states are computed on their own and given to every sequence as a
        key/value prefix."""
        blocks = self.text.transformer.resblocks
        groups, n_shared = shared.shape[:2]
        n, n_own = own.shape[:2]
        if n < 2 or not all([lean(b) for b in blocks]):  # (a list: dynamo traces it more simply than a generator)
            return self._encode_assembled(shared, own, eot_index)
        if n_shared + n * n_own <= self.packed_max_rows:
            return self._encode_packed(shared, own, eot_index)
        if groups > 1 or (n - 1) * n_shared < self.shared_prefix_min_rows:
            return self._encode_assembled(shared, own, eot_index)
        x, _ = self._text_input(shared)
        states = []
        for block in blocks:
            states.append(x)
            x = run_block(block, x, causal=True)
        states_by_layer = torch.cat(states)
        own, _ = self._text_input(own, start=n_shared)
        return self._chunked(self._encode_after_prefix, own, eot_index - n_shared, lambda part: (states_by_layer,))

    def _encode_assembled(self, shared: torch.Tensor, own: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        # The prompts of encode_text_shared_prefix assembled, (G × N, L, D), through the plain pass.
        groups, n = shared.shape[0], own.shape[0]
        prompts = torch.cat([shared.unsqueeze(1).expand(-1, n, -1, -1),
                             own.to(shared.dtype).unsqueeze(0).expand(groups, -1, -1, -1)], 2)
        return self.encode_text_embeddings(prompts.flatten(0, 1), eot_index.repeat(groups))

    def _encode_packed(self, shared: torch.Tensor, own: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        # Each group's prompts as one sequence: the shared part once, then each prompt's own tokens in
        # turn. A block mask lets each prompt's tokens see the shared part and, causally, their own
        # tokens only, so every token attends to exactly what it would in its own sequence. Positions
        # are added before packing (CLIP's are absolute, added once), so every token keeps its own.
        # The own tokens are frozen: positioned and packed without autograd, the same for every group.
        shared, cast = self._text_input(shared)
        (groups, n_shared, width), (n, n_own) = shared.shape, own.shape[:2]

        def pack_own() -> tuple[torch.Tensor, torch.Tensor]:  # frozen: kept from step to step
            positioned, _ = self._text_input(own, start=n_shared)
            return positioned.reshape(1, n * n_own, width), eot_index + n_own * torch.arange(n, device=own.device)

        own_packed, eot = derive_once(self, "_packed_own", (own, eot_index, self.text.positional_embedding), pack_own)
        packed = torch.cat([shared, own_packed.expand(groups, -1, -1)], 1)
        # The mask in the dtype attention will see (autocast's), so no layer casts it.
        mask = self._packed_mask(n, n_own, n_shared, shared.device, autocast_dtype(shared.device.type) or cast)
        eot = eot.expand(groups, -1)  # each prompt's EOT row in its group's packed sequence
        # Groups per chunk: as many token rows as a chunk of the plain pass (text_chunk prompts of
        # n_shared + n_own rows each), which is what its memory follows. (Counted in prompts, a group
        # of n prompts packed in n_shared + n × n_own rows took a chunk of its own at a third of that:
        # CoCoOp at 32 images × 10 classes went through checkpointing and recomputed its text pass.)
        rows = self.text_chunk * (n_shared + n_own)
        return self._chunked(self._packed_blocks, packed, eot, lambda part: (mask,),
                             chunk=max(1, rows // packed.shape[1]))

    def _packed_blocks(self, packed: torch.Tensor, eot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # (G, T, D) packed sequences → (G × N, E) features at their (G, N) EOT rows.
        blocks = self.text.transformer.resblocks
        for i, block in enumerate(blocks):
            packed = run_block(block, packed, mask=mask, rows=eot if i == len(blocks) - 1 else None)
        return self._text_output(packed.reshape(-1, 1, packed.shape[-1]))

    def _packed_mask(self, n: int, own: int, n_shared: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # The additive (T, T) mask of _encode_packed, built once per shape (a trial asks for one), its
        # rows 16 elements apart (_aligned_zeros).
        def build() -> torch.Tensor:
            position = torch.arange(n_shared + n * own, device=device)
            prompt = torch.cat([torch.full((n_shared,), -1, device=device),
                                torch.arange(n, device=device).repeat_interleave(own)])  # -1: shared
            visible = (position[None] <= position[:, None]) & ((prompt[None] == -1) | (prompt[None] == prompt[:, None]))
            length = len(position)
            return aligned_zeros(length, length, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))

        if torch.compiler.is_compiling():
            # Traced into the compiled step instead (a few fused kernels): a tensor made by a CUDA graph
            # and kept outside it is overwritten by the graph's next replay, and dynamo breaks the graph
            # at the dict below.
            return build()
        key = (n, own, n_shared, device, dtype)
        # Created here, not in __init__: a dict attribute set there makes torch.compile guard on its
        # contents and compile the step a second time once the mask is in it.
        masks = self.__dict__.setdefault("_packed_masks", {})
        if key not in masks:
            masks[key] = build()
        return masks[key]

    def _encode_after_prefix(self, x: torch.Tensor, eot: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        # x: (N, S, D) positioned embeddings after the shared prefix; states[i]: the prefix at layer i's input.
        n, length = x.shape[:2]
        causal = self._causal_mask(length, x.device, x.dtype)
        mask = self._kv_mask(causal, length, states.shape[1], None, x.device, x.dtype)  # all of the prefix
        blocks = self.text.transformer.resblocks
        for i, (block, prefix) in enumerate(zip(blocks, states)):
            x = run_block(block, x, kv_prefix=block.ln_1(prefix).expand(n, -1, -1), mask=mask,
                          rows=eot if i == len(blocks) - 1 else None)
        return self._text_output(x)

    def _chunked(self, encode: Callable[..., torch.Tensor], x: torch.Tensor, eot: torch.Tensor,
                 args_for: Callable[[slice], tuple], chunk: int | None = None) -> torch.Tensor:
        # encode(x, eot, *args_for(rows)) over every row; above ``chunk`` rows (default text_chunk),
        # when gradients are needed, chunk by chunk under activation checkpointing (memory follows the
        # chunk, not N).
        n, chunk = x.shape[0], chunk or self.text_chunk
        if n <= chunk or not torch.is_grad_enabled():
            return encode(x, eot, *args_for(slice(None)))
        out = []
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            out.append(checkpoint(encode, x[part], eot[part], *args_for(part), use_reentrant=False))
        return torch.cat(out)

    def _encode_text(self, x: torch.Tensor, eot_index: torch.Tensor, n_prompt: int = 0,
                     deep: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        """Text features (N, E) of embedded prompts (N, L, D) pooled at ``eot_index``.

        The prompt occupies positions ``1 : 1 + n_prompt`` (after SOS). ``deep[i]`` (for layers 1...)
        replaces the prompt tokens at the input of layer ``i``: a tensor (n, D) shared by all sequences
        or (N, n, D), or None to carry the previous layer's tokens. ``n`` may differ from layer to
        layer (heterogeneous lengths); the EOT position and the causal mask follow. L may be shorter
        than the model's context length.
        """
        x, cast = self._text_input(x)
        eot = eot_index
        last = len(self.text.transformer.resblocks) - 1
        for i, block in enumerate(self.text.transformer.resblocks):
            prompt = deep[i] if 0 < i < len(deep) else None
            if prompt is not None:
                prompt = per_sample(prompt, x.shape[0]).to(cast)
                x = torch.cat([x[:, :1], prompt, x[:, 1 + n_prompt :]], dim=1)
                eot = eot + (prompt.shape[1] - n_prompt)
                n_prompt = prompt.shape[1]
            x = run_block(block, x, causal=True, rows=eot if i == last else None)
        return self._text_output(x)

    def _text_input(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.dtype]:
        # Token embeddings (..., L, D) at positions start... + their positions, in the tower's compute dtype.
        cast = self.text.transformer.get_cast_dtype()
        return x.to(cast) + self.text.positional_embedding[start : start + x.shape[-2]].to(cast), cast

    def _text_output(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, 1, D), the EOT token's state after the last block. Final norm, projection.
        x = self.text.ln_final(x[:, 0])
        proj = self.text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ frozen_operands(self.text, "proj", (proj,), x)[0]

    def _causal_mask(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        base = self.text.attn_mask
        if length <= base.shape[0]:
            return base[:length, :length]
        return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)

    @torch.no_grad()
    def text_layer_inputs(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """The token states (N, L, D) at the input of each text block in turn, for embedded prompts
        (N, L, D); a block runs when the next state is asked for."""
        x, _ = self._text_input(x)
        for block in self.text.transformer.resblocks:
            yield x
            x = run_block(block, x, causal=True)
