"""Tensors derived from frozen ones (a block's weights cast for autocast, the class prompts' frozen
parts), computed once and kept between steps instead of at every step."""

from __future__ import annotations

from typing import Callable

import torch


def derive_once(owner: object, slot: str, sources: tuple[torch.Tensor, ...],
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
