"""Small tensor helpers for attention: masks laid out as CUDA's kernels read them, and prompts per sequence."""

from __future__ import annotations

import torch


def aligned_zeros(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Zeros for an attention mask, their rows 16 elements apart (the last dimension padded, the padding
    # sliced off): each row, and each mask of a stack, starts on a 16-byte boundary. CUDA's attention
    # kernels read masks in 16-byte words (not all check where a view starts), and the memory-efficient
    # one pads (copies) any other mask at every call.
    return torch.zeros(*shape[:-1], -(-shape[-1] // 16) * 16, device=device, dtype=dtype)[..., : shape[-1]]


def causal_mask_like(x: torch.Tensor) -> torch.Tensor:
    # Additive causal mask for a sequence of length x.shape[-2] (tokens (N, L, D) or scores (..., L, L)).
    length = x.shape[-2]
    return torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)


def per_sample(prompt: torch.Tensor, n: int) -> torch.Tensor:
    # (k, D) shared prompt → (n, k, D); (n, k, D) stays.
    return prompt.unsqueeze(0).expand(n, -1, -1) if prompt.dim() == 2 else prompt
