"""Hand-written AVX-512 kernels for CPU decoding, compiled on first use.

- gemv.cpp: one-row matmuls (fp32, bf16, int8, int4 weights). `neolm.ops.compile_gemv` offers them to each
  layer next to the inductor-generated GEMV and the layer's own kernel, and keeps whichever is fastest for
  that layer shape. They stream weights at one activation row without torch's per-op dispatch, and (int4,
  int8) without a packed layout made for many rows (bench/PROFILE.md has the numbers).
- gemm.cpp: few-row matmuls (a decode step of a batch: every weight read once for all the rows).
- int8a8.cpp: int8 weights against rows of x quantized on the fly (AVX-512 VNNI, any number of rows): to 16
  bits, the weight-only int8 of CPUs whose bf16 instructions are slow; or to 8 (W8A8, an option).
- int8f.cpp: int8 weights in fp32 arithmetic, for CPUs whose bf16 instructions are slow and that lack VNNI.
- int4.cpp: int4 weights in a layout of their own: one- and few-row matmuls, and the conversion to bf16
  weights for prompts.
- int4h.cpp: int4 weights in fp16 arithmetic, for CPUs with AVX512-FP16 whose bf16 instructions are slow (any
  number of rows).
- decode.cpp (driven by neolm/native/decode.py): a whole decode step of one sequence or a batch through
  every block in one call, on those matmuls.
- attention.cpp (driven by neolm/native/attention.py): the attention of prompts (prefill), 2-4x faster than
  torch's fused CPU kernel.

The sources are compiled once per machine with the C++ compiler torch.compile uses (`$CXX`, else `g++`)
into `$XDG_CACHE_HOME/neolm/native` (default `~/.cache/neolm/native`), keyed by the sources, the compiler
and the CPU's flags; the library is called through ctypes. Without a compiler, or on a CPU without
AVX-512, `available()` says which kernels exist (none) and why, and nothing else changes."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from neolm.memory import weight_empty

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("gemv.cpp", "gemm.cpp", "int4.cpp", "int4h.cpp", "int8f.cpp",
                                                        "int8a8.cpp", "int4a8.cpp", "decode.cpp", "attention.cpp")]  # fmt: skip
HEADERS = [Path(__file__).with_name("gemv.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
FEATURES = {"f32": 1, "bf16": 2, "int8": 4, "int4": 8, "int8a8": 16, "int4a8": 32, "int8f": 64, "int4h": 128, "int8a16": 256}
INT4_ROWS, INT4_BAND = 16, 4  # int4 layout (int4.cpp): out-features per block, blocks per band (side by side)
# Products of up to this many rows go to the native kernels (gemm.cpp past one row) in layers that use them,
# and batches of up to this many sequences to the native decode step: beyond, oneDNN's GEMM catches up
# (between 12 and 24 rows on an AVX-512 EPYC, depending on its memory's phase: bench/PROFILE.md).
FEW_ROWS = 12

_p, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "neolm_gemv_f32": [_p, _p, _p, _int, _p, _int, _i64, _i64],
    "neolm_gemv_bf16": [_p, _p, _p, _int, _p, _int, _i64, _i64],
    "neolm_gemv_int8": [_p, _p, _p, _p, _int, _p, _int, _i64, _i64],
    "neolm_gemv_int4": [_p, _p, _p, _p, _int, _p, _int, _i64, _i64, _i64],
    "neolm_int4_to_bf16": [_p, _p, _p, _i64, _i64, _i64, _i64],
    "neolm_int4_pack": [_p, _p, _i64, _i64],
    "neolm_int8_to_bf16": [_p, _p, _i64],
    "neolm_argmax": [_p, _i64, _i64, _p],
    "neolm_gemm_f32": [_p, _i64, _p, _p, _int, _p, _int, _i64, _i64],
    "neolm_gemm_bf16": [_p, _i64, _p, _p, _int, _p, _int, _i64, _i64],
    "neolm_gemm_int8": [_p, _i64, _p, _p, _p, _int, _p, _int, _i64, _i64],
    "neolm_gemm_int8f": [_p, _i64, _p, _p, _p, _int, _p, _int, _i64, _i64],
    "neolm_int8f_repack": [_p, _p, _i64, _i64, _int],
    "neolm_gemm_int8a8": [_p, _i64, _p, _p, _p, _int, _p, _int, _i64, _i64, _p],
    "neolm_gemm_int4a8": [_p, _i64, _p, _p, _p, _int, _p, _int, _i64, _i64, _i64, _p],
    "neolm_a8_work_bytes": [_i64, _i64],
    "neolm_gemm_int8a16": [_p, _i64, _p, _p, _p, _int, _p, _int, _i64, _i64, _p],
    "neolm_int8a8_repack": [_p, _p, _i64, _i64, _int],
    "neolm_a16_work_bytes": [_i64, _i64],
    "neolm_gemm_int4": [_p, _i64, _p, _p, _p, _int, _p, _int, _i64, _i64, _i64],
    "neolm_gemm_int4h": [_p, _i64, _p, _p, _int, _p, _int, _i64, _i64, _i64, _p],
    "neolm_int4h_repack": [_p, _p, _p, _p, _i64, _i64, _i64, _int],
    "neolm_int4h_panel_bytes": [_i64, _i64, _i64],
    "neolm_int4h_work_bytes": [_i64, _i64, _i64],
    "neolm_decode_step": [_p, _i64, _p, _i64, _p, _p, _p, _p, _i64, _p, _p, _p, _p, _int, _i64, _p, _p],  # decode.py
    "neolm_decode_scratch_bytes": [_p, _i64],
    "neolm_attention": [_p, _p, _p, _p, _p, _p, _p, _int, _i64, _i64, _i64, _i64, _i64, _p, _i64, _i64, ctypes.c_float],
    "neolm_rotary": [_p, _p, _int, _i64, _i64, _i64, _i64, _i64, _p, _p],
}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neolm" / "native"


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the compiled library, "") or (None, why not)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"no kernels for {platform.machine()}"
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None, f"no C++ compiler ({os.environ.get('CXX', 'g++')}) found"
    code = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(code + cxx.encode() + " ".join(FLAGS).encode() + _cpu_flags().encode())
    path = _cache_dir() / f"gemv-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # compile aside, then one atomic rename
                out = Path(tmp) / path.name
                command = [cxx, *FLAGS, *map(str, SOURCES), "-o", str(out)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    return None, f"compiling {', '.join(p.name for p in SOURCES)} failed: {done.stderr.strip()[-300:]}"
                os.replace(out, path)
            log.info("compiled neolm's CPU kernels into %s", path)
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # an unwritable cache folder, a library the loader refuses, ...
        return None, f"cannot build or load {path}: {e}"
    lib.neolm_features.restype = ctypes.c_int
    for name, argtypes in _SIGNATURES.items():
        if hasattr(lib, name):
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int64 if name.endswith("_bytes") else None
    return lib, ""


def available() -> tuple[set[str], str]:
    """The kernels this machine has ({"f32", "bf16", "int8", "int4"} with AVX-512 and bf16), and why none."""
    lib, why = _library()
    if lib is None:
        return set(), why
    have = {name for name, bit in FEATURES.items() if lib.neolm_features() & bit}
    return have, "" if have else "this CPU has no AVX-512"


def _bias(bias: torch.Tensor | None) -> tuple[int | None, int]:
    if bias is None:
        return None, 0
    assert bias.dtype in (torch.float32, torch.bfloat16) and bias.is_contiguous()
    return bias.data_ptr(), int(bias.dtype == torch.bfloat16)


def _out(x: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """The output (M, N) of a product of x, in x's dtype, and whether it is bf16 (the kernels write fp32 or bf16)."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"neolm's native kernels take float32 or bfloat16 inputs, not {x.dtype}")
    return torch.empty(x.shape[0], n, dtype=x.dtype), int(x.dtype == torch.bfloat16)


@dataclass
class Weights:
    """A linear layer's tensors in one of the native kernels' formats (gemv.cpp), as decode.cpp's `Lin`."""

    kind: str  # f32, bf16, int8, int4, int8a8, int4a8, int8f, int4h, int8a16 (FEATURES)
    w: torch.Tensor  # f32/bf16 (N, K); int8 codes (N, K); int4 codes in pack_int4_gemv's layout; int8a8 and int8a16:
    # int8a8_pack's; int8f: int8f_pack's; int4h: Int4Panels' (codes, scales and zeros)
    s: torch.Tensor | None = None  # int8: bf16 scales (N,); int4: bf16 scales and zeros (N/64, K/G, 2, 64)
    bias: torch.Tensor | None = None
    n: int = 0
    k: int = 0
    g: int = 0  # int4 group size
    # LoRA adapters held unmerged beside the layer (neolm.multilora): A's rows (R, K) and B's columns as rows
    # (R, N) in the activations' dtype, and the adapter each row belongs to (R,) int64; None: none
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # each row's adapter for a step of n rows, as a (n,) int64 tensor, or None when no row uses one
    lora_rows: Callable[[int], torch.Tensor | None] | None = None


# The kernels: x (M, K) contiguous -> (M, N) in x's dtype; one row goes to gemv.cpp, more to gemm.cpp (made
# for a handful of rows: a decode step of a batch). Weights, scales and biases are read in place (no copies;
# callers pass them at each call, so a layer whose tensors change stays correct).
def float_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """weight (N, K) fp32 or bf16, contiguous, x of the same dtype; bias (N,) fp32/bf16 or None."""
    n, k = weight.shape
    assert x.dtype == weight.dtype and weight.is_contiguous() and x.is_contiguous()
    lib, bf16 = _library()[0], weight.dtype == torch.bfloat16
    y, y_bf16 = _out(x, n)
    if x.shape[0] == 1:
        fn = lib.neolm_gemv_bf16 if bf16 else lib.neolm_gemv_f32
        fn(x.data_ptr(), weight.data_ptr(), *_bias(bias), y.data_ptr(), y_bf16, n, k)
    else:
        fn = lib.neolm_gemm_bf16 if bf16 else lib.neolm_gemm_f32
        fn(x.data_ptr(), x.shape[0], weight.data_ptr(), *_bias(bias), y.data_ptr(), y_bf16, n, k)
    return y


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """qweight (N, K) int8, scale (N,) bf16: y = (x @ qweight.T) * scale (+ bias), activations rounded to bf16
    (as for torch's int8 kernel), fp32 accumulation."""
    n, k = qweight.shape
    assert qweight.dtype == torch.int8 and scale.dtype == torch.bfloat16 and qweight.is_contiguous()
    xf = (x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)).contiguous()
    y, y_bf16 = _out(x, n)
    lib, pointers = _library()[0], (qweight.data_ptr(), scale.data_ptr(), *_bias(bias), y.data_ptr(), y_bf16, n, k)
    if x.shape[0] == 1:
        lib.neolm_gemv_int8(xf.data_ptr(), *pointers)
    else:
        lib.neolm_gemm_int8(xf.data_ptr(), x.shape[0], *pointers)
    return y


F8_PANEL = 48  # int8f.cpp's layout: out-features per panel (the last one may be 16 or 32)


def int8f_pack(q: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K) -> int8f.cpp's layout, int8 (round_up(N, 16) * K,): panels of 48 out-features (the last
    one 16 or 32 wide where N needs it), each in-feature by in-feature: W[48 p + f, j] at 48 p K + j width + f."""
    n, k = q.shape
    assert q.device.type == "cpu" and q.dtype == torch.int8
    q = q.contiguous()
    out = weight_empty((-(-n // 16) * 16 * k,), torch.int8)
    _library()[0].neolm_int8f_repack(q.data_ptr(), out.data_ptr(), n, k, 1)
    return out


def int8f_rows(packed: torch.Tensor, n: int, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """int8f_pack's inverse: the codes (N, K), on packed's device (a layer moved off CPU unpacks them there); or
    only those of the output rows `rows` (len(rows), K), gathered from their panels."""
    if rows is not None:
        panel = rows // F8_PANEL
        width = (-(-n // 16) * 16 - panel * F8_PANEL).clamp(max=F8_PANEL)  # (the last panel's may be 16 or 32)
        start = panel * F8_PANEL * k + rows % F8_PANEL  # W[r, j] at start + j * width
        return packed[start[:, None] + torch.arange(k, device=packed.device) * width[:, None]]
    host, out = packed.cpu(), torch.empty(n, k, dtype=torch.int8)
    _library()[0].neolm_int8f_repack(out.data_ptr(), host.data_ptr(), n, k, 0)
    return out.to(packed.device)


def int8f_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 n: int, k: int) -> torch.Tensor:
    """packed: int8 codes (N, K) in int8f_pack's layout, scale (N,) bf16: y = (x @ codes.T) * scale (+ bias),
    x in fp32 as it is, fp32 products and sums (int8f.cpp); any number of rows."""
    assert packed.dtype == torch.int8 and packed.is_contiguous() and scale.dtype == torch.bfloat16
    assert packed.numel() == -(-n // 16) * 16 * k and x.shape[-1] == k
    xf = x.float().contiguous()
    y, y_bf16 = _out(x, n)
    _library()[0].neolm_gemm_int8f(xf.data_ptr(), x.shape[0], packed.data_ptr(), scale.data_ptr(), *_bias(bias),
                                   y.data_ptr(), y_bf16, n, k)  # fmt: skip
    return y


A8_PANEL = 32  # int8a8.cpp's layout: out-features per panel, in-features per quad
A8_QUAD = 4


def int8a8_pack(q: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K) -> int8a8.cpp's layout, uint8 (N/32 panels, K/4 quads, 32, 4) (rounded up, padded
    with zero codes): code + 128 for feature 32 p + f, in-feature 4 j + b at [p, j, f, b]."""
    n, k = q.shape
    assert q.device.type == "cpu" and q.dtype == torch.int8
    q = q.contiguous()
    out = weight_empty((-(-n // A8_PANEL), -(-k // A8_QUAD), A8_PANEL, A8_QUAD), torch.uint8)
    _library()[0].neolm_int8a8_repack(q.data_ptr(), out.data_ptr(), n, k, 1)
    return out


def int8a8_unpack(packed: torch.Tensor, n: int, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """int8a8_pack's inverse: the int8 codes (N, K), on packed's device; or only those of the output rows `rows`
    (len(rows), K)."""
    if rows is not None:
        picked = packed[rows // A8_PANEL, :, rows % A8_PANEL, :]  # (len(rows), K/4 quads, 4)
        return (picked.reshape(len(rows), -1)[:, :k] ^ 128).contiguous().view(torch.int8)
    host, out = packed.cpu().contiguous(), torch.empty(n, k, dtype=torch.int8)
    _library()[0].neolm_int8a8_repack(out.data_ptr(), host.data_ptr(), n, k, 0)
    return out.to(packed.device)


def int8a8_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  n: int, k: int, bits: int = 8) -> torch.Tensor:
    """packed: int8 codes (N, K) in int8a8_pack's layout, scale (N,) bf16: y = (x_q @ codes.T) * s_x * scale
    (+ bias), each row of x quantized first with its own scale (int8a8.cpp): to int8 (`bits` 8, s_x = max |x| /
    127) or to 16 bits (`bits` 16, s_x = max |x| / 32639, the weight-only int8 of CPUs with VNNI); int32 sums;
    any number of rows."""
    assert packed.dtype == torch.uint8 and packed.is_contiguous() and scale.dtype == torch.bfloat16
    assert packed.shape == (-(-n // A8_PANEL), -(-k // A8_QUAD), A8_PANEL, A8_QUAD) and x.shape[-1] == k
    assert bits in (8, 16)
    xf = x.float().contiguous()
    y, y_bf16 = _out(x, n)
    lib = _library()[0]
    work_bytes, gemm = ((lib.neolm_a8_work_bytes, lib.neolm_gemm_int8a8) if bits == 8 else
                        (lib.neolm_a16_work_bytes, lib.neolm_gemm_int8a16))  # fmt: skip
    work = torch.empty(work_bytes(x.shape[0], k), dtype=torch.uint8)
    gemm(xf.data_ptr(), x.shape[0], packed.data_ptr(), scale.data_ptr(), *_bias(bias), y.data_ptr(), y_bf16, n, k,
         work.data_ptr())  # fmt: skip
    return y


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x (rows, n) fp32, contiguous -> (rows,) int64: torch.argmax(x, -1) (first of equal maxima, first NaN),
    ~15x faster on a 50k-token vocabulary ("f32" kernels)."""
    assert x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous() and x.shape[1] < 2**31
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _library()[0].neolm_argmax(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


def int8_to_bf16(q: torch.Tensor) -> torch.Tensor:
    """int8 codes (contiguous) as bf16 numbers (exact), in one vectorised pass (torch's .to() is ~5x slower)."""
    assert q.dtype == torch.int8 and q.is_contiguous()
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    _library()[0].neolm_int8_to_bf16(q.data_ptr(), out.data_ptr(), q.numel())
    return out


def pack_int4_gemv(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) in [0, 15] -> (ceil(N/64)*64, K/2) uint8, int4.cpp's layout: blocks of 16 rows in bands of 4
    (zero rows pad the last band); a band holds K/8 chunk groups, chunk group j the 64-byte chunks j of its 4
    blocks in turn, chunk j holding in-features 8j..8j+7; byte 16 L + i of a chunk holds row 4 L + (i % 8) / 2
    of its block and in-feature f = 8 j + 2 (i / 8) + i % 2 in its low nibble, f + 4 in its high one."""
    n, k = codes.shape
    pad = -n % (INT4_ROWS * INT4_BAND)
    c = F.pad(codes.to(torch.uint8), (0, 0, 0, pad))
    # (band, block, lane L, row in lane, chunk, nibble, i / 8, i % 2)
    #   -> (band, chunk, block, L, i / 8, row in lane, i % 2, nibble)
    t = c.view(-1, INT4_BAND, 4, 4, k // 8, 2, 2, 2).permute(0, 4, 1, 2, 6, 3, 7, 5)
    return (t[..., 0] | (t[..., 1] << 4)).contiguous().view(n + pad, k // 2)


def unpack_int4_gemv(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_int4_gemv: (ceil(N/64)*64, K/2) -> codes (N, K) uint8."""
    rows, half = packed.shape
    k = 2 * half
    # (band, chunk, block, L, i / 8, row in lane, i % 2)
    b = packed.view(rows // (INT4_ROWS * INT4_BAND), k // 8, INT4_BAND, 4, 2, 4, 2)
    t = torch.stack([b & 15, b >> 4], dim=-1)  # (..., nibble)
    return t.permute(0, 2, 3, 5, 1, 7, 4, 6).reshape(rows, k)[:n]


def int4_supported(in_features: int, group_size: int) -> bool:
    return group_size % 8 == 0 and in_features % group_size == 0


class Int4Gemv:
    """int4 codes (N, K), scales and zeros (N, K/G) with w = (q - 8) * scale + zero, repacked for the kernel
    (int4.cpp's layout, as pack_int4_gemv computes it; a copy of half a byte per weight). Activations are
    rounded to bf16, as for torch's int4 kernel. Call with x (M, K) and the layer's bias."""

    def __init__(self, canonical: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
        """From the codes' canonical packing (N, K/2) (neolm.quant.kernels.pack_int4, as saved), repacked in one
        native pass; `from_codes` takes the codes."""
        assert canonical.dtype == torch.uint8 and canonical.is_contiguous()
        self.n, self.k = canonical.shape[0], 2 * canonical.shape[1]
        self.group_size = group_size
        pad = -self.n % (INT4_ROWS * INT4_BAND)
        self.q = weight_empty((self.n + pad, self.k // 2), torch.uint8)
        _library()[0].neolm_int4_pack(canonical.data_ptr(), self.q.data_ptr(), self.n, self.k)
        # int4.cpp's table: (N/64, K/G, 2, 64), a band's 64 scales of a group side by side, then its 64 zeros
        bands = (self.n + pad) // (INT4_BAND * INT4_ROWS)
        s, z = (F.pad(t.to(torch.bfloat16), (0, 0, 0, pad)).view(bands, INT4_BAND * INT4_ROWS, -1)
                for t in (scale, zero))  # fmt: skip
        self.sz = torch.stack((s, z), dim=1).permute(0, 3, 1, 2).contiguous()

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> Int4Gemv:
        """From the codes (N, K) in [0, 15]."""
        from neolm.quant.kernels import pack_int4  # (neolm.quant imports this module)

        return cls(pack_int4(codes), scale, zero, group_size)

    def weights(self, bias: torch.Tensor | None, a8: bool = False):
        """These tensors as `Weights` (for neolm.native.decode); a8: for int4a8.cpp (activations to int8)."""
        return Weights("int4a8" if a8 else "int4", self.q, self.sz, bias, self.n, self.k, self.group_size)

    def a8(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (M, K) @ W^T (+ bias), each row of x quantized to int8 first with its own scale s_x = max |x| / 127
        (int4a8.cpp); any number of rows."""
        xf = x.float().contiguous()
        y, y_bf16 = _out(x, self.n)
        lib = _library()[0]
        work = torch.empty(lib.neolm_a8_work_bytes(x.shape[0], self.k), dtype=torch.uint8)
        lib.neolm_gemm_int4a8(xf.data_ptr(), x.shape[0], self.q.data_ptr(), self.sz.data_ptr(), *_bias(bias),
                              y.data_ptr(), y_bf16, self.n, self.k, self.group_size, work.data_ptr())  # fmt: skip
        return y

    def codes(self) -> torch.Tensor:
        """The codes (N, K) this copy holds."""
        return unpack_int4_gemv(self.q, self.n)

    def canonical(self) -> torch.Tensor:
        """The codes in their canonical (saved) packing, (N, K/2)."""
        from neolm.quant.kernels import pack_int4  # (neolm.quant imports this module)

        return pack_int4(self.codes())

    def to_bf16(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of the weight matrix in bf16, (end - start, K); start a multiple of INT4_ROWS."""
        assert start % INT4_ROWS == 0 and 0 <= start <= end <= self.n
        out = torch.empty(end - start, self.k, dtype=torch.bfloat16)
        _library()[0].neolm_int4_to_bf16(self.q.data_ptr(), self.sz.data_ptr(), out.data_ptr(), start, end, self.k,
                                         self.group_size)  # fmt: skip
        return out

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        xb = (x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)).contiguous()
        y, y_bf16 = _out(x, self.n)
        lib = _library()[0]
        pointers = (self.q.data_ptr(), self.sz.data_ptr(), *_bias(bias), y.data_ptr(), y_bf16,
                    self.n, self.k, self.group_size)  # fmt: skip
        if x.shape[0] == 1:
            lib.neolm_gemv_int4(xb.data_ptr(), *pointers)
        else:
            lib.neolm_gemm_int4(xb.data_ptr(), x.shape[0], *pointers)
        return y


H_PANEL = 64  # int4h.cpp's layout: out-features per panel


def int4h_supported(in_features: int, group_size: int) -> bool:
    """Whether int4h.cpp takes this shape: groups of 32 in-features or a multiple of 64 (its fp16 sums run over
    blocks of up to 64), dividing the in-features."""
    return group_size % 32 == 0 and (group_size <= 64 or group_size % 64 == 0) and in_features % group_size == 0


class Int4Panels:
    """int4 codes (N, K) with scales and zeros (N, K/G), w = (q - 8) * scale + zero, in int4h.cpp's panels: fp16
    arithmetic, for CPUs whose bf16 instructions are slow. Activations are scaled by a power of two per row and
    rounded to fp16. The interface of Int4Gemv, less its bf16 conversion (these kernels take prompts themselves)
    and its int8 activations (int4a8.cpp reads Int4Gemv's layout)."""

    def __init__(self, canonical: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
        """From the codes' canonical packing (N, K/2) (neolm.quant.kernels.pack_int4, as saved) and the bf16 scales
        and zeros, repacked in one native pass (the panels hold all three)."""
        assert canonical.dtype == torch.uint8 and canonical.is_contiguous()
        self.n, self.k, self.group_size = canonical.shape[0], 2 * canonical.shape[1], group_size
        assert int4h_supported(self.k, group_size) and scale.shape == zero.shape == (self.n, self.k // group_size)
        lib = _library()[0]
        self.q = weight_empty((lib.neolm_int4h_panel_bytes(self.n, self.k, group_size),), torch.uint8)
        s, z = (t.to(torch.bfloat16).contiguous() for t in (scale, zero))
        lib.neolm_int4h_repack(canonical.data_ptr(), s.data_ptr(), z.data_ptr(), self.q.data_ptr(), self.n, self.k,
                               group_size, 1)  # fmt: skip

    def weights(self, bias: torch.Tensor | None, a8: bool = False):
        """These tensors as `Weights` (for neolm.native.decode)."""
        assert not a8, "int4a8.cpp reads Int4Gemv's layout"
        return Weights("int4h", self.q, None, bias, self.n, self.k, self.group_size)

    def canonical(self) -> torch.Tensor:
        """The codes in their canonical (saved) packing, (N, K/2)."""
        out = torch.empty(self.n, self.k // 2, dtype=torch.uint8)
        _library()[0].neolm_int4h_repack(out.data_ptr(), None, None, self.q.data_ptr(), self.n, self.k,
                                         self.group_size, 0)  # fmt: skip
        return out

    def codes(self) -> torch.Tensor:
        """The codes (N, K) this copy holds."""
        from neolm.quant.kernels import unpack_int4  # (neolm.quant imports this module)

        return unpack_int4(self.canonical())

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (M, K) @ W^T (+ bias), any number of rows."""
        xf = x.float().contiguous()
        y, y_bf16 = _out(x, self.n)
        lib = _library()[0]
        work = torch.empty(lib.neolm_int4h_work_bytes(x.shape[0], self.k, self.group_size), dtype=torch.uint8)
        lib.neolm_gemm_int4h(xf.data_ptr(), x.shape[0], self.q.data_ptr(), *_bias(bias), y.data_ptr(), y_bf16, self.n,
                             self.k, self.group_size, work.data_ptr())  # fmt: skip
        return y
