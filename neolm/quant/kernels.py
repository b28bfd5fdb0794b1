"""Packed weight-only matmul kernels (PyTorch's own ops) and the int4 code layouts they read.

Shapes: M activation rows, K in-features, N out-features, G group size.

CPU
  int8: aten._weight_int8pack_mm(x (M, K), q int8 (N, K), scale (N,)) -> (M, N)
  int4: aten._weight_int4pack_mm_for_cpu(x (M, K), packed uint8 (N, K/2), G, scales_and_zeros (K/G, N, 2))
  Both are vectorised for bfloat16 activations only (their float32/float16 paths are scalar loops, 10-20x
  slower than a float32 matmul), so on CPU the activations are cast to bfloat16 for the matmul (float32
  accumulation inside the op) and the result back to the caller's dtype: what bitsandbytes' CPU kernels do.
CUDA
  int8: aten._weight_int8pack_mm; int4: aten._weight_int4pack_mm on aten._convert_weight_to_int4pack's
  tensor-core layout (bfloat16, compute capability 8.0+).

int4 dequantization, for every kernel: w = (q - 8) * scale + zero, q in [0, 15].

Every layer's kernel is checked once, when the layer is prepared, against F.linear on its dequantized
weight; where an op is missing, refuses the shape or disagrees, the layer dequantizes on each call instead
(same numbers, slower) and says so in the log.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CPU_BLOCK_N = 64  # rows per block of aten's CPU int4 layout
CHECK_TOLERANCE = 2e-2  # relative to the largest output: bf16 activations and outputs, fp32 accumulation


# ---- int4 code layouts --------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Canonical (saved) layout: codes (N, K) in [0, 15] -> (N, K/2) uint8, column 2j in the high nibble."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 canonical layout -> codes (N, K) uint8."""
    N, half = packed.shape
    return torch.stack((packed >> 4, packed & 15), dim=-1).view(N, 2 * half)


def pack_int4_cpu(codes: torch.Tensor) -> torch.Tensor:
    """aten's CPU layout for N % 64 == 0: blocks of 64 rows, (N/64, K, 32) bytes; byte j of column k holds
    row j in its low nibble and row j + 32 in its high nibble. Returned as (N, K/2)."""
    N, K = codes.shape
    c = codes.to(torch.uint8).view(N // CPU_BLOCK_N, 2, CPU_BLOCK_N // 2, K)  # (N/64, 2, 32, K)
    return (c[:, 0] | (c[:, 1] << 4)).transpose(1, 2).contiguous().view(N, K // 2)


def unpack_int4_cpu(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4_cpu: (N, K/2) -> codes (N, K)."""
    N, half = packed.shape
    b = packed.view(N // CPU_BLOCK_N, 2 * half, CPU_BLOCK_N // 2).transpose(1, 2)  # (N/64, 32, K)
    return torch.stack((b & 15, b >> 4), dim=1).reshape(N, 2 * half)


@functools.cache
def cpu_int4_layout_known() -> bool:
    """True when this PyTorch packs int4 for CPU as pack_int4_cpu does (checked on one random matrix)."""
    op = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if op is None:
        return False
    codes = torch.randint(0, 16, (2 * CPU_BLOCK_N, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        return torch.equal(op(codes, 2), pack_int4_cpu(codes))
    except RuntimeError:
        return False


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K/G) scales and zeros -> the ops' (K/G, N, 2) tensor."""
    return torch.stack((scale.t(), zero.t()), dim=-1).to(dtype).contiguous()


# ---- the matmuls ----------------------------------------------------------------------------
def kernel_dtype(device: torch.device, x_dtype: torch.dtype) -> torch.dtype:
    """The activation dtype the packed kernels run in on this device."""
    if device.type == "cpu":
        return torch.bfloat16
    return x_dtype if x_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (q * scale[:, None]).T -> (M, N), in x's dtype."""
    kd = kernel_dtype(x.device, x.dtype)
    return torch.ops.aten._weight_int8pack_mm(x.to(kd), q, scale.to(kd)).to(x.dtype)


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One row x (1, K) @ (q * scale[:, None]).T (+ bias) -> (1, N), written for torch.compile: inductor
    turns it into one fused, vectorised pass over the int8 codes (fp32 activations and accumulation),
    faster at one row than the packed op (neolm.ops.compile_gemv)."""
    y = (x[:, None, :].float() * q.float()).sum(-1) * scale.float()  # (1, N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ dequantized.T -> (M, N); packed in the device's kernel layout, sz (K/G, N, 2)."""
    xk = x.to(kernel_dtype(x.device, x.dtype))
    if x.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, packed, group_size, sz)
    else:
        y = torch.ops.aten._weight_int4pack_mm(xk, packed, group_size, sz)
    return y.to(x.dtype)


def check_rows(n: int, device=None) -> torch.Tensor:
    """The output rows `agrees` compares: up to 512 spread over the n (both ends included)."""
    return torch.linspace(0, n - 1, min(n, 512), device=device).round().long().unique()


def agrees(kernel, weight: torch.Tensor, name: str, rows: torch.Tensor | None = None) -> bool:
    """Whether `kernel(x)` matches F.linear(x, weight) on a few random rows of x (any error means no);
    weight holds only the output rows `rows` (check_rows) where given, so that a 50k-row head's check does not
    dequantize the whole matrix in fp32."""
    K = weight.shape[1]
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(0)).to(weight.device)
    try:
        got = kernel(x.to(kernel_dtype(x.device, torch.float32))).float()
        if rows is not None:
            got = got[:, rows]
    except Exception as e:  # noqa: BLE001 (an optional op: missing, or refusing this shape, dtype or device)
        log.info("%s: packed kernel unavailable (%s); dequantizing on each call", name, str(e).splitlines()[0][:120])
        return False
    want = F.linear(x.to(kernel_dtype(x.device, torch.float32)).float(), weight.float())
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
    if not err <= CHECK_TOLERANCE:
        log.warning("%s: packed kernel disagrees with the dequantized weight (relative error %.3g); "
                    "dequantizing on each call instead", name, err)  # fmt: skip
        return False
    return True
