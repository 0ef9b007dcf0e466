"""The frozen parts of class prompts (CoOp's token prefix and suffix) and learned context vectors."""

from __future__ import annotations

import torch
from torch import nn

from mlgate.model.frozen import derive_once


def init_context(clip, n_ctx: int, phrase: str | None, shape_prefix: tuple[int, ...] = ()) -> torch.Tensor:
    """Context vectors (*shape_prefix, n_ctx, D): the token embeddings of ``phrase`` (whose word count
    must be ``n_ctx``), or N(0, 0.02) when ``phrase`` is None."""
    if phrase:
        tokens = clip.tokenize([phrase])
        n_words = int(clip.eot_index(tokens)[0]) - 1
        if n_words != n_ctx:
            raise ValueError(f"method.ctx_init {phrase!r} has {n_words} tokens but n_ctx is {n_ctx}")
        with torch.no_grad():
            ctx = clip.embed_tokens(tokens)[0, 1 : 1 + n_ctx].clone().float()
        return ctx.expand(*shape_prefix, -1, -1).clone() if shape_prefix else ctx
    device = clip.text.token_embedding.weight.device
    return torch.randn(*shape_prefix, n_ctx, clip.text_width, device=device) * 0.02


class ClassTokens(nn.Module):
    """Frozen embeddings of ``[SOS] X…X <classname>. [EOS]`` for every class, split around the
    n_ctx placeholder slots, so learned context can be dropped in (CoOp's token prefix/suffix).
    Sequences are trimmed to the longest class prompt instead of the full 77 tokens."""

    def __init__(self, clip, classnames: list[str], n_ctx: int) -> None:
        super().__init__()
        placeholder = " ".join(["X"] * n_ctx)
        tokens = clip.tokenize([f"{placeholder} {name}." if n_ctx else f"{name}." for name in classnames])
        eot = clip.eot_index(tokens)
        tokens = tokens[:, : int(eot.max()) + 1]
        with torch.no_grad():
            embedded = clip.embed_tokens(tokens)
        self.n_ctx = n_ctx
        self.classnames = list(classnames)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        # Class-name token count (everything between the context and '.'), for front/middle positions.
        self.register_buffer("name_len", eot - 2 - n_ctx, persistent=False)

    def assemble(self, ctx: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (C, L, D) and EOT positions (C,) for ``class_ids`` with context ``ctx``: (n, D)
        shared, or (C, n, D) one per prompt (class-specific or per image)."""
        prefix, suffix = self.prefix[class_ids], self.suffix[class_ids]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(len(class_ids), -1, -1)
        return torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1), self.eot[class_ids]

    def assemble_shared(self, ctx: torch.Tensor, class_ids: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`assemble`'s prompts in the two parts :meth:`PromptedCLIP.encode_text_shared_prefix`
        takes: what they open with, SOS + context, (G, 1 + n, D) for a context (n, D) shared by all
        (G = 1) or one per group (G, n, D); each class's own frozen tokens (C, L − 1 − n, D); and the
        EOT positions (C,)."""
        ctx = ctx.unsqueeze(0) if ctx.dim() == 2 else ctx
        sos = self.prefix[:1].expand(ctx.shape[0], -1, -1)  # every class prompt opens with the same SOS
        # The frozen parts are kept from step to step (the same object each time: what is derived from
        # them downstream is kept too).
        own, eot = derive_once(self, "_own", (class_ids, self.suffix, self.eot),
                        lambda: (self.suffix[class_ids], self.eot[class_ids]))
        return torch.cat([sos, ctx.to(sos.dtype)], 1), own, eot

    def assemble_positioned(self, ctx: torch.Tensor, class_ids: torch.Tensor, position: str
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`assemble`, with the class name at the ``front`` or in the ``middle`` of the context."""
        if position == "end":
            return self.assemble(ctx, class_ids)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(len(class_ids), -1, -1)
        rows = []
        half = self.n_ctx // 2
        for row, c in enumerate(class_ids.tolist()):
            n = int(self.name_len[c])
            name, rest = self.suffix[c, :n], self.suffix[c, n:]
            parts = ([name, ctx[row]] if position == "front" else [ctx[row, :half], name, ctx[row, half:]])
            rows.append(torch.cat([self.prefix[c], *[p.to(self.prefix.dtype) for p in parts], rest]))
        return torch.stack(rows), self.eot[class_ids]
