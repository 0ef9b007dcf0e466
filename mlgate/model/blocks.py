"""One residual attention block of a frozen open_clip tower, run lean: attention straight into
``scaled_dot_product_attention``, flat matmuls, frozen weights kept in autocast's dtype, QuickGELU as
one SiLU, and the last block on the pooled rows only. Same maths as open_clip's own block forward
(tested against it); blocks of another shape run open_clip's forward."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from mlgate.model.frozen import derive_once
from mlgate.model.masks import causal_mask_like


def lean(block: nn.Module) -> bool:
    # open_clip's standard pre-norm block around nn.MultiheadAttention (what every CLIP ViT uses).
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
    additive (L, P + L) mask. Blocks of another shape run open_clip's own forward.

    ``rows`` ((N,) positions, or (N, R)) keeps those output rows of each sequence, (N, 1, D) or
    (N, R, D): the pooled tokens, when this is the last block. Every position still gives keys and
    values, but the query, the attention output and the MLP run for those rows alone, which is most
    of the last block's work.
    """
    if not lean(block):
        if kv_prefix is None:
            x = block(x, attn_mask=mask if mask is not None else (causal_mask_like(x) if causal else None))
        else:
            q = block.ln_1(x)
            kv = torch.cat([kv_prefix, q], 1)
            x = x + block.ls_1(block.attention(q_x=q, k_x=kv, v_x=kv, attn_mask=mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x if rows is None else take_rows(x, rows)
    attn = block.attn
    n, length, width = x.shape
    heads = attn.num_heads
    head_width = width // heads
    in_weight, in_bias, out_weight, out_bias = frozen_operands(
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
            x, h = take_rows(x, rows), take_rows(h, rows)
            mask = row_mask(mask, causal, rows, length, kv_input.shape[1], x.dtype)
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
    fc_weight, fc_bias, proj_weight, proj_bias = frozen_operands(
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
    # c_proj's weight / 1.702 instead of the scaled add: a copy of every block's largest matrix to
    # save one elementwise pass in the backward.)
    mlp, ln = block.mlp, block.ln_2
    if not (type(ln) in (nn.LayerNorm, open_clip.transformer.LayerNorm)
            and type(mlp.gelu) is open_clip.transformer.QuickGELU and ln.weight is not None
            and ln.bias is not None and mlp.c_fc.bias is not None and mlp.c_proj.bias is not None):
        return None
    sources = (ln.weight, ln.bias, mlp.c_fc.bias, mlp.c_proj.bias)
    return derive_once(block, "_mlgate_quick_gelu", sources, lambda: tuple(p * _QUICK_GELU for p in sources))


def frozen_operands(block: nn.Module, part: str, tensors: tuple[torch.Tensor, ...],
                     x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # A block's (or a tower's projection's) frozen matrices and biases as its matmuls take them: under
    # autocast, copies in the autocast dtype kept on the module, for autocast recasts a weight at every
    # use unless it learns. Outside autocast, the tensors themselves.
    dtype = autocast_dtype(x.device.type)
    if dtype is None or any(t is None for t in tensors) or all(t.dtype == dtype for t in tensors):
        return tensors
    # (A slot name without dots: dynamo takes it for an attribute path.)
    slot = f"_mlgate_{part}_{str(dtype).removeprefix('torch.')}"
    return derive_once(block, slot, tensors, lambda: tuple(t.to(dtype) for t in tensors),
                static=True)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    # The dtype autocast gives matmuls on this device now, or None when it is off.
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type: leave the recasting to autocast
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool) -> torch.Tensor:
    # (N, H, Lq, d) queries over (N, H, Lk, d) keys and values; ``mask`` additive, broadcastable.
    if q.device.type == "cpu" and torch.compiler.is_compiling():
        # Compiled on the CPU (train.compile), the explicit softmax fuses into inductor's own kernels;
        # the CPU flash-attention kernel stays a separate call, slower on prompt-length sequences.
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if causal:
            mask = causal_mask_like(scores)
        return (scores if mask is None else scores + mask).softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # (N, L, D) → (N, R, D): rows[i] of sequence i, where rows is (N, R), or (N,) for one row each.
    rows = rows if rows.dim() == 2 else rows.unsqueeze(1)
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), rows]


def row_mask(mask: torch.Tensor | None, causal: bool, rows: torch.Tensor, length: int, keys: int,
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
