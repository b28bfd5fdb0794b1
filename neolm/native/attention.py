"""Prompt attention on neolm's AVX-512 kernels (attention.cpp), for CPU inference.

`attach(model)` gives every block's attention `prompt_attention` as its `attend` hook; the model calls it
for products of more than one query (prompts, prefill) and falls back to F.scaled_dot_product_attention
wherever it declines: gradients wanted, another device or dtype, masks of another shape, head dims past 256.
It computes what SDPA computes, in fp32 (bf16 inputs widened, the output rounded to bf16), about 2-4x faster
than torch's fused CPU kernel on these shapes (bench/PROFILE.md).
"""

from __future__ import annotations

import ctypes

import torch

from neolm import native

MAX_HEAD_DIM = 256  # attention.cpp's value kernel: 64 dims a pass, any number of passes; kept to
# the head sizes of GPT-Neo and Pythia (64-256)


def _strides(t: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor | None:
    """softmax(scale q k^T, masked) v for q (B, H, T, D) and k, v (B, H, S, D), as (B, T, H, D); mask is
    "causal" (the queries are the last T of the S slots, each sees itself and the slots before) or a bool
    tensor (T, S) or (B, 1, T, S), True where a query sees a key. None: not a call this kernel takes."""
    B, H, T, D = q.shape
    S = k.shape[2]
    dtype = q.dtype
    if (
        T < 2
        or dtype not in (torch.float32, torch.bfloat16)
        or k.dtype != dtype
        or v.dtype != dtype
        or q.device.type != "cpu"
        or D > MAX_HEAD_DIM
        or k.shape != (B, H, S, D)
        or v.shape != (B, H, S, D)
        or any(t.stride(-1) != 1 for t in (q, k, v))
        or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    ):
        return None
    if isinstance(mask, str):
        if mask != "causal":
            return None
        pointer, mb, mt = None, 0, 0
    elif isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape[-2:] == (T, S):
        if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[0] in (1, B):
            rows = mask[:, 0]  # (B or 1, T, S)
        elif mask.dim() == 2:
            rows = mask[None]
        else:
            return None
        rows = rows if rows.stride(-1) == 1 else rows.contiguous()
        pointer, mb, mt = rows.data_ptr(), rows.stride(0) if rows.shape[0] > 1 else 0, rows.stride(1)
    else:
        return None
    y = torch.empty(B, T, H, D, dtype=dtype)
    native._library()[0].neolm_attention(
        q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v), y.data_ptr(),
        int(dtype == torch.bfloat16), B, H, T, S, D, pointer, mb, mt, scale,
    )  # fmt: skip
    return y


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The rotary embedding of q and k, x (2, B, H, T, D), in place, with neolm.model.apply_rotary's numbers (each
    product rounded to x's dtype, then their sum), cos, sin (B, 1, T, dims); False: not a call this kernel takes
    (gradients, another device or dtype, other shapes)."""
    n, B, H, T, D = x.shape
    dims = cos.shape[-1]
    if (
        x.dtype not in (torch.float32, torch.bfloat16)
        or x.device.type != "cpu"
        or x.stride(-1) != 1
        or (torch.is_grad_enabled() and x.requires_grad)
        or dims % 2
        or dims > D
        or any(t.dtype != x.dtype or t.shape != (B, 1, T, dims) for t in (cos, sin))
    ):
        return False
    cos, sin = cos.contiguous(), sin.contiguous()
    native._library()[0].neolm_rotary(
        x.data_ptr(), (ctypes.c_int64 * 4)(*x.stride()[:4]), int(x.dtype == torch.bfloat16), n, B, H, T, dims,
        cos.data_ptr(), sin.data_ptr(),
    )  # fmt: skip
    return True


def attach(model) -> str:
    """Set every block's `attn.attend` to `prompt_attention` and `attn.rotate` to `rotate` where this machine has
    the kernels (else None); returns "" or why not."""
    have, why = native.available()
    for block in model.blocks:
        block.attn.attend = prompt_attention if have else None
        block.attn.rotate = rotate if have else None
    return why if not have else ""
