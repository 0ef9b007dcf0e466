"""Frozen open_clip backbones and the one prompted forward pass every method shares.

Backbones are created through open_clip's own factory (``open_clip.create_model``), so any open_clip
model name works, with a pretrained tag, a local checkpoint path, or random init. mlgate's embedded
backbone is registered as an ordinary open_clip model config (``mlgate-tiny``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlgate.errors import MlgateError

EMBEDDED_BACKBONE = "mlgate-tiny"
EMBEDDED_WEIGHTS = "mlgate"  # the pretrained tag of the weights shipped in mlgate/weights/
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_WEIGHTS_DIR = Path(__file__).parent / "weights"
open_clip.add_model_config(_CONFIG_DIR)


@dataclass(frozen=True)
class ImageNorm:
    """What images must look like for a backbone: size and normalization."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class PromptedCLIP(nn.Module):
    """A frozen open_clip CLIP whose text tower takes token *embeddings*, so methods can insert prompts.

    The text tower is driven block by block (open_clip ≥2.26 is batch-first), which is what deep
    prompts need; sequences are trimmed to the longest prompt in use instead of the full 77 tokens,
    with the causal mask and positional embeddings cut to match.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str) -> None:
        super().__init__()
        text = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower in .text
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask"):
            if getattr(text, attr, None) is None:
                raise MlgateError(
                    f"backbone {name!r}: its text tower has no {attr!r}; mlgate prompts open_clip "
                    "models with a CLIP-style text transformer (not HF text towers)."
                )
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.text = text
        self.tokenizer = tokenizer
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", model.visual.image_size)
        self.image_norm = ImageNorm(
            size=int(size[0] if isinstance(size, (tuple, list)) else size),
            mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        )

    def train(self, mode: bool = True) -> PromptedCLIP:
        # The backbone stays in eval mode (no dropout, frozen statistics) whatever the method does.
        return self

    @property
    def text_width(self) -> int:
        return self.text.token_embedding.embedding_dim

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (N, context_length) on the backbone's device."""
        return self.tokenizer(texts).to(self.text.token_embedding.weight.device)

    @staticmethod
    def eot_index(tokens: torch.Tensor) -> torch.Tensor:
        """Position of the end-of-text token (the highest id in CLIP's vocabulary) per sequence."""
        return tokens.argmax(dim=-1)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings (N, L, D) of token ids."""
        return self.text.token_embedding(tokens)

    #: Prompts encoded per chunk when training on many classes: with gradient checkpointing, memory
    #: grows with the chunk, not with the label set (CoOp on ImageNet-1k's 1000 class prompts).
    text_chunk: int = 256
    # The key/value-prefix pass costs a few extra kernels per layer; measured, it pays from about a
    # hundred token rows saved ((N - 1) × shared length), and halves a 100-class ViT-B/16 CoOp step.
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
        if n < 2 or not all([_lean(b) for b in blocks]):  # (a list: dynamo traces it more simply than a generator)
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

        own_packed, eot = kept(self, "_packed_own", (own, eot_index, self.text.positional_embedding), pack_own)
        packed = torch.cat([shared, own_packed.expand(groups, -1, -1)], 1)
        # The mask in the dtype attention will see (autocast's), so no layer casts it.
        mask = self._packed_mask(n, n_own, n_shared, shared.device, _autocast_dtype(shared.device.type) or cast)
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
            return _aligned_zeros(length, length, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))

        if torch.compiler.is_compiling():
            # Traced into the compiled step instead (a few fused kernels): a tensor made by a CUDA graph
            # and kept outside it is overwritten by the graph's next replay, and torch 2.11's dynamo
            # breaks the graph at the dict below.
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
        # Compiled (train.compile), the recomputation is part of the traced backward, so it needs no
        # context (and torch.compile takes none but dispatch modes there).
        extra = {} if torch.compiler.is_compiling() else {"context_fn": _recompute_with_the_same_blocks}
        out = []
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            out.append(checkpoint(encode, x[part], eot[part], *args_for(part), use_reentrant=False, **extra))
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
                prompt = _per_sample(prompt, x.shape[0]).to(cast)
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
        return proj(x) if isinstance(proj, nn.Linear) else x @ _frozen_operands(self.text, "proj", (proj,), x)[0]

    def _causal_mask(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        base = self.text.attn_mask
        if length <= base.shape[0]:
            return base[:length, :length]
        return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)

    @property
    def num_layers(self) -> int:
        """Layers that both towers have (the deepest a per-layer prompt can go)."""
        return min(len(self.text.transformer.resblocks), len(self.model.visual.transformer.resblocks))

    @property
    def vision_width(self) -> int:
        return self.model.visual.conv1.out_channels

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
            shallow = _per_sample(shallow, x.shape[0]).to(x.dtype)
            x = torch.cat([x, shallow], dim=1)
            n_prompt = shallow.shape[1]
        x = visual.ln_pre(x)
        for i, block in enumerate(visual.transformer.resblocks):
            prompt = deep[i] if 0 < i < len(deep) else None
            if prompt is not None:
                prompt = _per_sample(prompt, x.shape[0]).to(x.dtype)
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
        return pooled @ _frozen_operands(visual, "proj", (visual.proj,), x)[0] if visual.proj is not None else pooled

    # ---- ADAPT-style prompts: extra keys and values only -------------------------------------------

    @staticmethod
    def _kv_block(block: nn.Module, x: torch.Tensor, prompt: torch.Tensor | None,
                  mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        # Prompts join the keys and values of self-attention only: the query length, and everything
        # after attention, stay as they are. open_clip's block.forward would drop k_x/v_x here.
        prefix = None if prompt is None else block.ln_1(_per_sample(prompt, x.shape[0]).to(x.dtype))
        return run_block(block, x, kv_prefix=prefix, mask=mask, rows=rows)

    @staticmethod
    def _kv_mask(base: torch.Tensor | None, length: int, n_prompt: int, active: torch.Tensor | None,
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        # Additive mask over [the P prompt tokens, the L positions]: a masked prompt token is -inf for
        # every query (no part in attention): (L, P + L), or None when every token takes part and there
        # is no base. Without a base (the image tower) it is one row, built once and expanded to every
        # query (three kernels a layer fewer than building the full mask, at every layer and step).
        # ``active`` (K, P) gives K layers' masks at once, (K, L, P + L), each starting on a 16-byte
        # boundary (_aligned_zeros): a layer's mask starting inside a 16-byte word, as views into one
        # (K, ...) tensor do unpadded, faulted in the H200's attention kernels (cuDNN, torch 2.11).
        if n_prompt == 0 or (active is None and base is None):
            return base
        lead = () if active is None else active.shape[:-1]
        keys = n_prompt + length
        mask = _aligned_zeros(*lead, 1 if base is None else length, keys, device=device, dtype=dtype)
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
        (k, p), dtype = active.shape, _autocast_dtype(device.type) or dtype
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

    @torch.no_grad()
    def text_layer_inputs(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """The token states (N, L, D) at the input of each text block in turn, for embedded prompts
        (N, L, D); a block runs when the next state is asked for."""
        x, _ = self._text_input(x)
        for block in self.text.transformer.resblocks:
            yield x
            x = run_block(block, x, causal=True)

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

    @torch.no_grad()
    def encode_class_texts(self, texts: list[str]) -> torch.Tensor:
        """Normalized features of plain text prompts (zero-shot classifier weights)."""
        tokens = self.tokenize(texts)
        eot = self.eot_index(tokens)
        tokens = tokens[:, : int(eot.max()) + 1]
        return F.normalize(self.encode_text_embeddings(self.embed_tokens(tokens), eot), dim=-1)


@contextlib.contextmanager
def _quiet_random_init():
    # Random init is asked for explicitly (pretrained=None); open_clip's warning about it is noise.
    def drop(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


@contextlib.contextmanager
def _quiet_download_errors():
    # open_clip and huggingface_hub log each failed download attempt; the error mlgate raises says it once.
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def embedded_weights_info() -> dict:
    """Checksum, training settings and zero-shot figures recorded with the shipped weights."""
    import json

    return json.loads((_WEIGHTS_DIR / f"{EMBEDDED_BACKBONE}.json").read_text())


def _load_embedded(name: str, device: torch.device | str) -> PromptedCLIP:
    # The shipped, pretrained mlgate-tiny (see mlgate.pretrain): checked against its recorded sha256.
    import hashlib

    from mlgate.pretrain import load_compact

    if name != EMBEDDED_BACKBONE:
        raise MlgateError(f"backbone.pretrained: {EMBEDDED_WEIGHTS!r} weights exist for {EMBEDDED_BACKBONE!r} "
                          f"only, not {name!r}; give an open_clip tag or a checkpoint path for {name!r}.")
    path = _WEIGHTS_DIR / f"{EMBEDDED_BACKBONE}.pt"
    if not path.is_file():
        raise MlgateError(f"backbone: the embedded weights {path} are missing from this install; reinstall "
                          "mlgate or rebuild them with `python -m mlgate.pretrain`.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = embedded_weights_info()["sha256"]
    if digest != expected:
        raise MlgateError(f"backbone: {path} does not match its checksum (sha256 {digest[:12]}…, expected "
                          f"{expected[:12]}…); reinstall mlgate or rebuild with `python -m mlgate.pretrain`.")
    with _quiet_random_init():  # random init is immediately overwritten by the shipped weights
        model = open_clip.create_model(EMBEDDED_BACKBONE, pretrained=None)
    load_compact(model, path)
    return PromptedCLIP(model.to(device), open_clip.get_tokenizer(EMBEDDED_BACKBONE), EMBEDDED_BACKBONE)


_STOCK_BLOCKS = contextvars.ContextVar("stock_blocks", default=False)


@contextlib.contextmanager
def stock_blocks(enabled: bool = True):
    """Inside the block, :func:`run_block` runs open_clip's own block forward on every row, as the
    reference trainers' CLIP does (``mlgate bench``'s reference configuration); tests compare too.
    Eager passes only: a step under ``torch.compile`` always takes mlgate's blocks."""
    token = _STOCK_BLOCKS.set(enabled)
    try:
        yield
    finally:
        _STOCK_BLOCKS.reset(token)


def _recompute_with_the_same_blocks() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    # Checkpoint's (forward, recomputation) contexts. On CUDA the recomputation runs in the autograd
    # engine's device thread, where this thread's context variables are unset: without this it would
    # take the other block path and save other tensors (torch's CheckpointError).
    return contextlib.nullcontext(), stock_blocks(_STOCK_BLOCKS.get())


def _lean(block: nn.Module) -> bool:
    # open_clip's standard pre-norm block around nn.MultiheadAttention (what every CLIP ViT uses).
    # (stock_blocks is for eager passes: torch 2.11's dynamo cannot read a context variable and broke
    # a compiled step at every block, which left CUDA graphs a fraction of the step to capture.)
    if not torch.compiler.is_compiling() and _STOCK_BLOCKS.get():
        return False
    return isinstance(getattr(block, "attn", None), nn.MultiheadAttention) and block.attn.batch_first \
        and block.attn.in_proj_weight is not None and not hasattr(block, "ln_1_kv")


def run_block(block: nn.Module, x: torch.Tensor, causal: bool = False, kv_prefix: torch.Tensor | None = None,
              mask: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """One residual attention block of a frozen tower, (N, L, D) → (N, L, D).

    Same maths as open_clip's ``block(x, attn_mask=...)``, but attention goes straight to
    ``scaled_dot_product_attention`` (``is_causal`` instead of a mask tensor for the text tower):
    ``nn.MultiheadAttention`` leaves its fused path whenever autograd records (always, when prompts
    learn) and falls back to a long chain of small ops, which dominates a small model's step.
    ``kv_prefix`` ((N, P, D), already normed) joins the keys and values only (ADAPT); ``mask`` is an
    additive (L, P + L) mask. Blocks of another shape, and every block under :func:`stock_blocks`,
    run open_clip's own forward.

    ``rows`` ((N,) positions, or (N, R)) keeps those output rows of each sequence, (N, 1, D) or
    (N, R, D): the pooled tokens, when this is the last block. Every position still gives keys and
    values, but the query, the attention output and the MLP run for those rows alone, which is most
    of the last block's work.
    """
    if not _lean(block):
        if kv_prefix is None:
            x = block(x, attn_mask=mask if mask is not None else (_causal(x) if causal else None))
        else:
            q = block.ln_1(x)
            kv = torch.cat([kv_prefix, q], 1)
            x = x + block.ls_1(block.attention(q_x=q, k_x=kv, v_x=kv, attn_mask=mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x if rows is None else _take_rows(x, rows)
    attn = block.attn
    n, length, width = x.shape
    heads = attn.num_heads
    head_width = width // heads
    in_weight, in_bias, out_weight, out_bias = _frozen_operands(
        block, "attn", (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias), x)
    h = block.ln_1(x)
    # The matmuls take flat (rows, D) inputs: F.linear on a 3-D input wraps its addmm in reshapes, each
    # with a node in the backward. (q, k, v are unbound along their own axis, whose backward stacks the
    # gradients straight into the matmul's layout; a permute first would cost a copy there.)
    if kv_prefix is None and rows is None:
        q, k, v = F.linear(h.reshape(-1, width), in_weight, in_bias).view(n, length, 3, heads, head_width).unbind(2)
    else:
        w_q, w_kv = in_weight.split([width, 2 * width])
        b_q, b_kv = in_bias.split([width, 2 * width])
        kv_input = h if kv_prefix is None else torch.cat([kv_prefix, h], 1)
        if rows is not None:
            x, h = _take_rows(x, rows), _take_rows(h, rows)
            mask = _row_mask(mask, causal, rows, length, kv_input.shape[1], x.dtype)
            causal = False
        q = F.linear(h.reshape(-1, width), w_q, b_q).view(n, -1, heads, head_width)
        k, v = F.linear(kv_input.reshape(-1, width), w_kv, b_kv).view(n, -1, 2, heads, head_width).unbind(2)
    if mask is not None and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    out = _attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, causal and mask is None)
    out = F.linear(out.transpose(1, 2).reshape(-1, width), out_weight, out_bias)
    rows_out = x.shape[1]
    x = x.reshape(-1, width) + (out if isinstance(block.ls_1, nn.Identity) else block.ls_1(out))
    return _mlp_residual(block, x).view(n, rows_out, width)


_QUICK_GELU = 1.702  # QuickGELU(a) = a · sigmoid(1.702 a) = SiLU(1.702 a) / 1.702


def _mlp_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # x + mlp(ln_2(x)) for open_clip's MLP (c_fc, activation, c_proj), with its frozen matrices as
    # _frozen_operands keeps them. With QuickGELU (OpenAI CLIP's activation), its three elementwise
    # passes over the 4x-wide hidden state (and four more in the backward) become one SiLU: the 1.702
    # moves into the LayerNorm's affine and the biases (small vectors, frozen), the 1/1.702 into the
    # residual add. Other activations (GELU: open_clip's LAION models) run as they are.
    mlp = block.mlp
    if not (list(mlp._modules) == ["c_fc", "gelu", "c_proj"] and isinstance(block.ls_2, nn.Identity)):
        return x + block.ls_2(block.mlp(block.ln_2(x)))
    folded = _quick_gelu_folded(block)
    if folded is None:
        h, activation, scale = block.ln_2(x), mlp.gelu, 1.0
        fc_bias, proj_bias = mlp.c_fc.bias, mlp.c_proj.bias
    else:
        ln_weight, ln_bias, fc_bias, proj_bias = folded
        h = F.layer_norm(x, block.ln_2.normalized_shape, ln_weight, ln_bias, block.ln_2.eps)
        activation, scale = F.silu, 1 / _QUICK_GELU
    fc_weight, fc_bias, proj_weight, proj_bias = _frozen_operands(
        block, "mlp", (mlp.c_fc.weight, fc_bias, mlp.c_proj.weight, proj_bias), x)
    if h.dtype != x.dtype:  # a half-precision tower under autocast, whose layer norm gives float32
        h = h.to(x.dtype)
    h = activation(F.linear(h, fc_weight, fc_bias))
    return torch.add(x, F.linear(h, proj_weight, proj_bias), alpha=scale)


def _quick_gelu_folded(block: nn.Module) -> tuple[torch.Tensor | None, ...] | None:
    # ln_2's weight and bias and the MLP's biases, × 1.702, or None for another activation or norm, or
    # a missing bias (the MLP's shape is _mlp_residual's to check). Kept on the block between steps
    # (recomputed when a weight is replaced or changed in place), so a step runs no kernels for them;
    # computed afresh while compiling (inductor folds them into its kernels) or if they learn. (Not
    # c_proj's weight / 1.702 instead of the scaled add: a copy of every block's largest matrix,
    # 160 MB for ViT-B/16, to save one elementwise pass in the backward.)
    mlp, ln = block.mlp, block.ln_2
    if not (type(ln) in (nn.LayerNorm, open_clip.transformer.LayerNorm)
            and type(mlp.gelu) is open_clip.transformer.QuickGELU and ln.weight is not None
            and ln.bias is not None and mlp.c_fc.bias is not None and mlp.c_proj.bias is not None):
        return None
    sources = (ln.weight, ln.bias, mlp.c_fc.bias, mlp.c_proj.bias)
    return kept(block, "_mlgate_quick_gelu", sources, lambda: tuple(p * _QUICK_GELU for p in sources))


def _frozen_operands(block: nn.Module, part: str, tensors: tuple[torch.Tensor, ...],
                     x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # A block's (or a tower's projection's) frozen matrices and biases as its matmuls take them: under
    # autocast, copies in the autocast dtype kept on the module, for autocast recasts a weight at every
    # use unless it learns (a sixth of an eager CoOp step's ops on a GPU: ViT-B/16 copies are 75 MB for
    # the text tower, 170 MB for the image tower, in bf16). Outside autocast, the tensors themselves.
    dtype = _autocast_dtype(x.device.type)
    if dtype is None or any(t is None for t in tensors) or all(t.dtype == dtype for t in tensors):
        return tensors
    # (A slot name without dots: dynamo takes it for an attribute path.)
    slot = f"_mlgate_{part}_{str(dtype).removeprefix('torch.')}"
    return kept(block, slot, tensors, lambda: tuple(t.to(dtype) for t in tensors),
                static=True)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    # The dtype autocast gives matmuls on this device now, or None when it is off.
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type: leave the recasting to autocast
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def kept(owner: object, slot: str, sources: tuple[torch.Tensor, ...],
         make: Callable[[], tuple[torch.Tensor, ...]], static: bool = False) -> tuple[torch.Tensor, ...]:
    """``make()``'s tensors, derived from the frozen ``sources`` alone, kept on ``owner`` between steps
    and made again when a source is another tensor or was changed in place (keyed on memory, shape
    and version; the sources are held with them, so their memory is not reused by another tensor).
    Made afresh while compiling (inductor folds them into its kernels) or when a source learns.

    ``static``: the sources are a module's frozen weights, which a trial never changes. Compiled code
    then takes the tensors an eager pass kept (the trainer's first step is eager) as static inputs of
    its graphs, as it takes parameters, instead of making them inside the graphs, where CUDA graphs
    would make them again at every replay. (Without the static mark they would be copied into the
    graphs' memory at every replay instead.)"""
    if torch.compiler.is_compiling():
        cached = owner.__dict__.get(slot) if static else None
        return make() if cached is None else cached[2]
    if any(t.requires_grad for t in sources):
        return make()
    key = tuple((t.data_ptr(), t._version, t.shape, t.stride()) for t in sources)
    cached = owner.__dict__.get(slot)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            made = make()
        if static:
            for t in made:
                torch._dynamo.mark_static_address(t)
        cached = owner.__dict__[slot] = (key, sources, made)
    return cached[2]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool) -> torch.Tensor:
    # (N, H, Lq, d) queries over (N, H, Lk, d) keys and values; ``mask`` additive, broadcastable.
    if q.device.type == "cpu" and torch.compiler.is_compiling():
        # Compiled on the CPU (train.compile), the explicit softmax fuses into inductor's own kernels;
        # the CPU flash-attention kernel stays a separate call, slower on prompt-length sequences.
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if causal:
            mask = _causal(scores)
        return (scores if mask is None else scores + mask).softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # (N, L, D) → (N, R, D): rows[i] of sequence i, where rows is (N, R), or (N,) for one row each.
    rows = rows if rows.dim() == 2 else rows.unsqueeze(1)
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), rows]


def _row_mask(mask: torch.Tensor | None, causal: bool, rows: torch.Tensor, length: int, keys: int,
              dtype: torch.dtype) -> torch.Tensor | None:
    # The additive mask of the kept query rows ((N, R) or (N,)), (N, 1, R, keys): the rows of an
    # (L, keys) mask, or the causal rule (a row sees positions up to its own) over the last ``length`` keys.
    rows = rows if rows.dim() == 2 else rows.unsqueeze(1)
    if mask is not None:
        return mask[rows].unsqueeze(1)
    if not causal:
        return None
    later = torch.arange(length, device=rows.device) > rows.unsqueeze(-1)
    later = F.pad(later, (keys - length, 0))  # a key/value prefix is visible to every row
    return torch.zeros(later.shape, dtype=dtype, device=rows.device).masked_fill(later, float("-inf")).unsqueeze(1)


def _aligned_zeros(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Zeros for an attention mask, their rows 16 elements apart (the last dimension padded, the padding
    # sliced off): each row, and each mask of a stack, starts on a 16-byte boundary. CUDA's attention
    # kernels read masks in 16-byte words (not all check where a view starts), and the memory-efficient
    # one pads (copies) any other mask at every call.
    return torch.zeros(*shape[:-1], -(-shape[-1] // 16) * 16, device=device, dtype=dtype)[..., : shape[-1]]


def _causal(x: torch.Tensor) -> torch.Tensor:
    # Additive causal mask for a sequence of length x.shape[-2] (tokens (N, L, D) or scores (..., L, L)).
    length = x.shape[-2]
    return torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)


def _per_sample(prompt: torch.Tensor, n: int) -> torch.Tensor:
    # (k, D) shared prompt → (n, k, D); (n, k, D) stays.
    return prompt.unsqueeze(0).expand(n, -1, -1) if prompt.dim() == 2 else prompt


def load_backbone(name: str, pretrained: str | None, device: torch.device | str = "cpu") -> PromptedCLIP:
    """Create a frozen :class:`PromptedCLIP` from an open_clip model name.

    ``pretrained`` is an open_clip pretrained tag (``openai``), a local checkpoint path, or None for
    random init. Loading problems become :class:`MlgateError` naming the weights.
    """
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower().split("-")[0] in m.lower()][:8]
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise MlgateError(
            f"backbone.name: unknown open_clip model {name!r}.{hint} The embedded default is "
            f"{EMBEDDED_BACKBONE!r}; `python -c 'import open_clip; print(open_clip.list_models())'` lists all."
        )
    if pretrained == EMBEDDED_WEIGHTS:
        return _load_embedded(name, device)
    try:
        with _quiet_random_init(), _quiet_download_errors():
            model = open_clip.create_model(
                name, pretrained=pretrained, device=device, require_pretrained=pretrained is not None
            )
    except Exception as exc:  # download / file / state-dict errors: say which weights and how to provide them
        raise MlgateError(
            f"backbone.pretrained: could not load weights {pretrained!r} for {name!r} ({exc}). Give an "
            "open_clip pretrained tag whose weights are cached or downloadable, or a local checkpoint "
            "path (backbone.pretrained=/path/to/model.pt); set backbone.pretrained=null for random init."
        ) from None
    return PromptedCLIP(model, open_clip.get_tokenizer(name), name)
