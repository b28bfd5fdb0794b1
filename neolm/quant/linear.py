"""neolm's quantized Linear layers (int8, int4) and the module swap that installs them.

Weight-only quantization; activations stay in floating point. Shapes: N out-features, K in-features,
G group size.

int8  per-output-channel symmetric: q = round(w / s) in [-127, 127], s = max|w_row| / 127.   w ~ q * s
int4  group-wise asymmetric over G consecutive in-features: s = (max - min) / 15, zero = min + 8 s,
      q = round((w - min) / s) in [0, 15].                                          w ~ (q - 8) * s + zero
Scales and zeros are bfloat16 (what the packed kernels consume); the codes are computed against those
rounded values, so the kernels and the dequantized weight describe the same matrix.

The swap happens after the model is built (gpt-fast style): `quantize_model` replaces nn.Linear layers in
place; `swap_empty` installs empty ones on the meta device for loading a quantized checkpoint.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from neolm import native
from neolm.errors import NeolmError
from neolm.memory import weight_copy
from neolm.ops import compiled, gemm_dtype, linear, rows_per_block
from neolm.quant import kernels

log = logging.getLogger(__name__)

GROUP_SIZES = (32, 64, 128, 256)
BITS = {"int8": 8, "int4": 4}
DEFAULT_SKIP = ("lm_head",)  # the output head stays in floating point unless asked
SCALE_DTYPE = torch.bfloat16
_TINY = 1e-8  # scale of an all-equal row or group
ALIGN = 64  # bytes: aten's int8 CPU kernel crashes on codes that are not 32-byte aligned (e.g. memory-mapped)


def with_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y (M, N) + bias (N,) in y's dtype, for the kernels that do not add it themselves."""
    return y if bias is None else y + bias.to(y.dtype)


class QuantLinear(nn.Module):
    """Base class: bias, dispatch between the packed kernel and dequantize-then-matmul.

    `weight` is the dequantized matrix (computed on access, for code that inspects it); the stored
    codes are `qweight`.
    """

    bits = 0

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype  # the model's float dtype: of the bias, and of `weight`
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None
        self.use_kernel = False
        self.native = True  # neolm's native kernels may take this layer where they fit (neolm.load(native=False): no)
        self.gemv = None  # set by neolm.ops.compile_gemv: fn(x, qweight, scale, bias) for one-row (or few-row) inputs
        self.gemv_rows = 1  # the most rows `gemv` takes (neolm.ops._use)
        self._prepared_on: torch.device | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize(self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The packed kernel: x (M, K) -> (M, N), plus bias (N,) where given (added in the native kernels' epilogue:
        a 512-token prompt through pythia-1.4b spent 3% of its time adding biases on their own)."""
        raise NotImplementedError

    def prepare(self, name: str = "") -> None:
        """Pack the codes for the kernel of the device they are on, and check the kernel once."""
        if self.qweight.device.type == "cpu":  # own memory, aligned (neolm.memory.weight_copy)
            self.qweight = weight_copy(self.qweight)
        elif self.qweight.data_ptr() % ALIGN:
            self.qweight = self.qweight.clone()
        self._prepared_on = self.qweight.device

    def gemv_kernels(self) -> dict:
        """One-row kernels this layer can use on CPU: name -> fn(x, qweight, scale, bias) (neolm.ops.compile_gemv)."""
        return {}

    def takes_int8_activations(self) -> bool:
        """Whether `quantize_activations` can take this layer as it is (`neolm.quant.linear.quantize_activations`
        says why not, where not)."""
        return False

    def _on_cpu_in_float(self) -> bool:
        """Whether the codes are on CPU in a float model: where the one-row kernels can take this layer."""
        return self.qweight.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16)

    row_block = 1  # `block_rows` starts at multiples of this
    # Products of this many rows or more on a GPU dequantize the weight into cuBLAS's GEMM instead of the packed
    # kernel, which aten writes for a few rows. int4 on an H100, pythia-1.4b's 2048 -> 8192 (bench/README.md): packed
    # 0.18 ms at 128 rows against 0.36 dequantized; 0.63 against 0.37 at 512
    cuda_gemm_rows = 256
    # Products of this many rows or more on CPU go through dequantized weights and oneDNN's GEMM (`_prefill`,
    # where `prefills()`), fewer to the layer's kernels; each kind that prefills sets it where the two cross
    # (bench/PROFILE.md, session 7, with bf16 GEMMs)
    prefill_rows = 32
    prefill_rows_fp32: int | None = None  # the same where the GEMM runs in fp32 (`gemm_dtype`), if it differs
    block_weights = 1 << 21  # weights per block of `_block_matmul`: 4 MiB in bf16 (faster than 16 at 16-512 rows)

    def prefills(self) -> bool:
        """Whether `_prefill` takes this layer's products of many rows."""
        return False

    def prefill_from(self) -> int:
        """Rows from which `_prefill` takes a product: where the GEMM, in `gemm_dtype()`, overtakes the kernels."""
        fp32 = self.prefill_rows_fp32 is not None and gemm_dtype() == torch.float32
        return self.prefill_rows_fp32 if fp32 else self.prefill_rows

    def block_rows(self, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For `_prefill`: rows [start, end) of the weight in `dtype` (bf16 or fp32), (end - start, K), and a
        factor for each output column (or None)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._prepared_on != x.device:
            self.prepare()
        if (
            x.device.type == "cpu"
            and x.shape[:-1].numel() >= self.prefill_from()
            and not torch.is_grad_enabled()
            and self.prefills()
        ):
            return self._prefill(x)
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if (
            self.gemv is not None
            and 0 < x2.shape[0] <= self.gemv_rows
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_grad_enabled()
        ):
            y = self.gemv(x2.contiguous(), self.qweight, self.scale, self.bias)
        elif (
            self.use_kernel
            and not ((x.requires_grad or self.training) and torch.is_grad_enabled())
            and not (x.device.type == "cuda" and x2.shape[0] >= self.cuda_gemm_rows)
        ):
            y = self.matmul(x2, self.bias)  # (training over frozen codes, QLoRA, takes the float matmul below,
            # which a gradient flows back through; so do many rows on a GPU, `cuda_gemm_rows`)
        else:
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            y = linear(x2, self.dequantize(x.dtype), bias)
        return y.view(*x.shape[:-1], self.out_features)

    def _prefill(self, x: torch.Tensor) -> torch.Tensor:
        y = self._block_matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y += self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _block_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) @ W^T -> (M, N) in x's dtype, for many rows on CPU: the weights dequantized a block of rows
        at a time (made in cache) into oneDNN's GEMM, which outruns the integer kernels from `prefill_rows` on
        (in bf16 on a Zen 5: 1.8x the native int8 kernel at 512 rows, 3.5x native int4). In bf16 (activations
        rounded to it, as in those kernels) or fp32, whichever GEMM this CPU runs faster (`ops.gemm_dtype`);
        accumulation in fp32."""
        dtype = gemm_dtype()
        xb = x.to(dtype)
        n = self.out_features
        step = rows_per_block(n, self.in_features, self.block_weights, self.row_block)
        if step >= n:  # one block: its product is the output
            w, factor = self.block_rows(0, n, dtype)
            y = linear(xb, w, None)  # (M, N)
            return (y if factor is None else y.float() * factor).to(x.dtype)
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)  # (M, N)
        for start in range(0, self.out_features, step):
            end = min(start + step, self.out_features)
            w, factor = self.block_rows(start, end, dtype)
            part = linear(xb, w, None)  # (M, end - start)
            y[:, start:end] = part if factor is None else part.float() * factor
        return y

    def extra_repr(self) -> str:
        kernel = "packed kernel" if self.use_kernel else "dequantize per call"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {kernel}"
        )


class Int8Linear(QuantLinear):
    bits = 8

    def __init__(self, in_features, out_features, bias, dtype, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=SCALE_DTYPE, device=device))  # (N,)
        # of qweight (`prepare` picks it: `wanted_layout`): "rows" (N, K); "a8" (neolm.native.int8a8_pack's, for
        # int8a8.cpp's integer arithmetic: x in 16 bits where this CPU's bf16 is slow, or in 8 bits once
        # `quantize_activations`); or "panels" (neolm.native.int8f_pack's, for int8f.cpp's fp32 arithmetic where
        # this CPU's bf16 is slow and it has no VNNI)
        self.layout = "rows"
        self.a8 = False  # `quantize_activations`: every product quantizes its input rows to int8

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        module = cls(w.shape[1], w.shape[0], linear.bias is not None, w.dtype, "meta")
        for key, t in quantized_weight(w, 8).items():
            setattr(module, key, t)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), False)
        return module

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K) int8 codes, whatever the layout; or those of the output rows `rows` (picked from the kernels'
        layouts without unpacking the rest: the load-time check's 512 rows)."""
        n, k = self.out_features, self.in_features
        if self.layout == "a8":
            return native.int8a8_unpack(self.qweight, n, k, rows)
        if self.layout == "panels":
            return native.int8f_rows(self.qweight, n, k, rows)
        return self.qweight if rows is None else self.qweight[rows]

    def dequantize(self, dtype=None, rows: torch.Tensor | None = None):
        q, scale = (self.codes(), self.scale) if rows is None else (self.codes(rows), self.scale[rows])
        return (q * scale.float()[:, None]).to(dtype or self.dtype)  # (N, K), or (len(rows), K); product in fp32

    prefill_rows = 48  # 32 rows: native 78 ms, bf16 weights 95 ms over 48 of pythia-1.4b's matrices; 48: equal

    def int8_activations(self) -> bool:
        """Whether every product quantizes its input rows to int8 first (`quantize_activations`)."""
        return self.a8 and self.layout == "a8" and self.native and self._on_cpu_in_float()

    def wanted_layout(self) -> str:
        """The codes' layout for this CPU's kernels (as the layer is now: device, dtype, `quantize_activations`).

        Where oneDNN's fp32 GEMM outruns its bf16 one (`gemm_dtype`: a CPU whose bf16 instructions are slow, such
        as a Xeon without AMX), weight-only int8 goes to int8a8.cpp with x quantized to 16 bits a row (VNNI, two
        int8 passes, exact int32 sums: at pythia-1.4b's shapes 1.2x int8f.cpp's speed at one row and 8, 2.4x at
        512; bench/PROFILE.md, session 18), or without VNNI to int8f.cpp's fp32 arithmetic (1.1-1.6x gemm.cpp's
        bf16 kernels at one row, 1.9x at 8: session 16). Elsewhere the codes stay rows, for gemm.cpp's bf16
        kernels and oneDNN's bf16 GEMM."""
        if not (self.native and self._on_cpu_in_float()):
            return "rows"
        have = native.available()[0]
        if self.a8:
            return "a8"  # (`quantize_activations` checked int8a8)
        if gemm_dtype() == torch.float32:
            if "int8a16" in have:
                return "a8"
            if "int8f" in have:
                return "panels"
        return "rows"

    def takes_int8_activations(self) -> bool:
        return self.native and self._on_cpu_in_float() and "int8a8" in native.available()[0]

    def quantize_activations(self) -> None:
        """From now on, quantize the input rows to int8 too: the codes go to int8a8.cpp's layout."""
        self.a8 = True
        if self.layout != "a8":
            self.qweight, self.layout = native.int8a8_pack(self.codes()), "a8"
        self.use_kernel = True  # (int8a8.cpp takes any width)

    def _a8(self, x, qweight, scale, bias):  # the gemv interface of neolm.ops
        bits = 8 if self.a8 else 16
        return native.int8a8_matmul(x, qweight, scale, bias, self.out_features, self.in_features, bits)

    def _f8(self, x, qweight, scale, bias):  # the gemv interface of neolm.ops
        return native.int8f_matmul(x, qweight, scale, bias, self.out_features, self.in_features)

    def matmul(self, x, bias=None):
        if self.layout == "a8":
            return self._a8(x, self.qweight, self.scale, bias)
        if self.layout == "panels":
            return self._f8(x, self.qweight, self.scale, bias)
        if self.prefills() and x.dtype in (torch.float32, torch.bfloat16):  # native: ~1.5x aten's at 13-47 rows
            return native.int8_gemv(x.contiguous(), self.qweight, self.scale, bias)
        return with_bias(kernels.int8_mm(x, self.qweight, self.scale), bias)

    def gemv_kernels(self):
        if not self._on_cpu_in_float():
            return {}
        if self.int8_activations():
            return {"native int8 x int8": self._a8}
        if self.layout == "a8":
            return {"native": self._a8}
        if self.layout == "panels":
            return {"native": self._f8}
        if self.native_weights() is not None and "int8" in native.available()[0]:
            return {"native": native.int8_gemv}
        return {"inductor": compiled(kernels.int8_gemv, self.qweight, self.scale, self.bias)}

    def prefills(self):  # (bf16 GEMMs are slow without bf16 hardware; the codes convert natively). int8a8.cpp and
        # int8f.cpp take prompts too: int8f.cpp's linears at 512 rows 1.18x the GEMM's speed at gpt-neo-125M's
        # shapes, 1.0x at pythia-1.4b's and at 1024-2048 rows (bench/PROFILE.md, session 16); int8a8.cpp's 16-bit
        # form 2.4x int8f.cpp's at pythia-1.4b's (session 18)
        return (self.native and self.qweight.device.type == "cpu" and "bf16" in native.available()[0]
                and self.layout == "rows")  # fmt: skip

    def block_rows(self, start, end, dtype):
        codes, scale = self.qweight[start:end], self.scale[start:end].float()
        if dtype == torch.float32:  # the dequantized weights themselves
            return codes.to(dtype).mul_(scale[:, None]), None
        return native.int8_to_bf16(codes), scale  # codes, exact in bf16; the scales applied to the fp32 result

    def native_weights(self):
        if not (self.native and self._on_cpu_in_float()):
            return None
        if self.layout == "a8":
            kind = "int8a8" if self.a8 else "int8a16"
            return native.Weights(kind, self.qweight, self.scale, self.bias, self.out_features, self.in_features)
        if self.layout == "panels":
            return native.Weights("int8f", self.qweight, self.scale, self.bias, self.out_features,
                                  self.in_features)  # fmt: skip
        return native.Weights("int8", self.qweight, self.scale, bias=self.bias, n=self.out_features, k=self.in_features)

    def prepare(self, name=""):
        layout = self.wanted_layout()
        if self.layout not in ("rows", layout):  # (moved off CPU or to fp16, or a layout this CPU does not take)
            self.qweight, self.layout = self.codes(), "rows"
        rows = kernels.check_rows(self.out_features, self.qweight.device)
        want = self.dequantize(torch.float32, rows)  # the check's reference, from the codes as they are now
        if self.layout != layout:  # rows to one of the kernels' layouts: a copy of its own
            pack = native.int8a8_pack if layout == "a8" else native.int8f_pack
            self.qweight, self.layout, self._prepared_on = pack(self.qweight), layout, self.qweight.device
        elif self.layout != "rows":  # packed before: their own copy, nothing to copy
            self._prepared_on = self.qweight.device
        else:
            super().prepare(name)
            if self.in_features % 32:  # aten's CPU int8 kernel crashes (not fails) on such widths, e.g. 60;
                self.use_kernel = False  # int8a8.cpp and int8f.cpp take any width
                return
            if self.qweight.device.type == "cuda":  # aten's CUDA int8 kernel lost to dequantizing into cuBLAS at
                self.use_kernel = False  # every size on an H100 (1 row: 0.14-0.17 / 0.13 ms, 512: 19 / 0.14 ms;
                return  # bench/README.md, GPU)
        self.use_kernel = kernels.agrees(self.matmul, want, name or "int8 layer", rows)

    def export(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.codes(), "scale": self.scale}
        return out | ({"bias": self.bias.detach()} if self.bias is not None else {})


class Int4Linear(QuantLinear):
    bits = 4

    def __init__(self, in_features, out_features, bias, dtype, group_size: int = 64, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        check_group_size(group_size, in_features)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("zero", torch.empty(out_features, groups, dtype=SCALE_DTYPE, device=device))
        # of qweight: "canonical" (saved form), "cpu" (aten's CPU kernel layout) or "native" (the native kernels')
        self.layout = "canonical"
        self._kweight: torch.Tensor | None = None  # CUDA, or CPU when the layout is not invertible
        self._sz: torch.Tensor | None = None  # (K/G, N, 2) scales and zeros for the kernels
        # the native kernels' codes, made on demand (then the only copy): int4.cpp's (bf16 arithmetic) or, where
        # this CPU's bf16 is slow, int4h.cpp's panels (fp16 arithmetic; `in_fp16`)
        self._native: native.Int4Gemv | native.Int4Panels | None = None
        self.a8 = False  # `quantize_activations`: every product through int4a8.cpp

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> Int4Linear:
        w = linear.weight.detach()
        module = cls(w.shape[1], w.shape[0], linear.bias is not None, w.dtype, group_size, "meta")
        for key, t in quantized_weight(w, 4, group_size).items():
            setattr(module, key, t)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), False)
        return module

    def codes(self) -> torch.Tensor:
        """(N, K) codes in [0, 15], whatever the layout."""
        if self.layout == "native":
            return self._native.codes().to(self.qweight.device)  # (moved with the model: prepare repacks them)
        unpack = kernels.unpack_int4_cpu if self.layout == "cpu" else kernels.unpack_int4
        return unpack(self.qweight)

    def dequantize(self, dtype=None, rows: torch.Tensor | None = None):
        scale, zero, codes = self.scale, self.zero, self.codes()
        if rows is not None:
            scale, zero, codes = scale[rows], zero[rows], codes[rows]
        (N, K), G = codes.shape, self.group_size
        w = (codes.view(N, K // G, G).float() - 8) * scale.float()[..., None] + zero.float()[..., None]
        return w.view(N, K).to(dtype or self.dtype)  # (N, K), or (len(rows), K)

    def int8_activations(self) -> bool:
        """Whether every product quantizes its input rows to int8 first (`quantize_activations`)."""
        return self.a8 and self._native_fits()

    def takes_int8_activations(self) -> bool:
        return self._native_fits() and "int4a8" in native.available()[0]

    def quantize_activations(self) -> None:
        """From now on, quantize the input rows to int8 too (int4a8.cpp, on int4.cpp's copy of the codes)."""
        self.a8 = True
        self._native_gemv()

    def in_fp16(self) -> bool:
        """Whether the products run in int4h.cpp's fp16 arithmetic (codes in its panels): native kernels on CPU in a
        float model, weight-only, where oneDNN's fp32 GEMM outruns its bf16 one (`gemm_dtype`: a CPU whose bf16
        instructions are slow, such as a Xeon without AMX, where the fp16 FMA is 4x faster; at pythia-1.4b's shapes
        its linears ran 1.6x int4.cpp's speed at one row and 3.5x at 8: bench/PROFILE.md, session 17)."""
        return (self._native_fits() and not self.a8 and "int4h" in native.available()[0]
                and native.int4h_supported(self.in_features, self.group_size) and gemm_dtype() == torch.float32)  # fmt: skip

    def matmul(self, x, bias=None):
        if self.layout == "native":
            if self.int8_activations():
                return self._native.a8(x, bias)
            if self.prefills() and x.shape[0] >= self.prefill_from():  # (int4h.cpp's panels take any number of rows)
                return with_bias(self._block_matmul(x), bias)
            return self._native(x, bias)
        packed = self._kweight if self._kweight is not None else self.qweight
        y = kernels.int4_mm(x, packed, self.group_size, self._sz)[:, : self.out_features]  # less row padding
        return with_bias(y, bias)

    def prepare(self, name=""):
        super().prepare(name)
        name = name or "int4 layer"
        if self._native_fits():  # the native kernels take it: their copy of the codes is the only one
            if self.layout == "native":  # prepared before: keep that copy (not the one super() just made)
                self.qweight = self._native.q
            self._native_gemv()
            return
        codes = self.codes()  # (N, K), from whatever layout (the native one included)
        self._native = None
        device = codes.device
        self.qweight, self.layout, self._kweight = kernels.pack_int4(codes), "canonical", None
        try:
            pad = 0
            if device.type == "cpu":
                if self.out_features % kernels.CPU_BLOCK_N == 0 and kernels.cpu_int4_layout_known():
                    self.qweight, self.layout = weight_copy(kernels.pack_int4_cpu(codes)), "cpu"  # one copy of the codes
                else:  # the op wants whole blocks of rows: pad with zero rows (e.g. a 50257-token head)
                    pad = -self.out_features % kernels.CPU_BLOCK_N
                    padded = F.pad(codes, (0, 0, 0, pad))
                    self._kweight = weight_copy(torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded.int(), 2))
            else:
                self._kweight = torch.ops.aten._convert_weight_to_int4pack(kernels.pack_int4(codes), 8)
        except Exception as e:  # noqa: BLE001 (an optional op: missing, or refusing this shape or device)
            log.info("%s: int4 packing unavailable (%s)", name, str(e).splitlines()[0][:120])
            self.use_kernel = False
            return
        scale, zero = (F.pad(t, (0, 0, 0, pad)) for t in (self.scale, self.zero))
        self._sz = kernels.scales_and_zeros(scale, zero, kernels.kernel_dtype(device, self.dtype))
        rows = kernels.check_rows(self.out_features, device)
        self.use_kernel = kernels.agrees(self.matmul, self.dequantize(torch.float32, rows), name, rows)
        if not self.use_kernel:
            self._kweight = self._sz = None

    def gemv_kernels(self):
        if self.native_weights() is None:
            return {}
        kernel = self._native_gemv()
        if self.int8_activations():
            return {"native int4 x int8": lambda x, qweight, scale, bias: kernel.a8(x, bias)}
        return {"native": lambda x, qweight, scale, bias: kernel(x, bias)}

    row_block = native.INT4_ROWS
    # pythia-1.4b prompts, native / bf16 weights: 0.47 at 24 tokens, 0.76 at 64, 0.89 at 128, 1.00 at 160, 1.14
    # at 256 (int4.cpp's few-row kernel, lanes over out-features: bench/PROFILE.md, session 8)
    prefill_rows = 160
    # fp32 GEMMs (an Intel Xeon without AMX, session 13): native / blocks 0.86 at 48 tokens, 1.02 at 64, 1.25 at 96
    prefill_rows_fp32 = 64

    def prefills(self):  # once int4.cpp's copy of the codes exists (made for the native kernels). int4h.cpp takes
        # prompts itself: its linears at 512 rows ran at 1.5x the speed of fp32 GEMMs on weights made from int4.cpp's
        # (bench/PROFILE.md, session 17)
        return isinstance(self._native, native.Int4Gemv) and not self.int8_activations()

    def block_rows(self, start, end, dtype):
        return self._native.to_bf16(start, end).to(dtype), None  # (the weights rounded to bf16 either way)

    def _native_gemv(self) -> native.Int4Gemv | native.Int4Panels:
        """The native kernels with their copy of the codes (made by `prepare` where they fit), which is then the
        layer's only one: every product goes to them (int4.cpp: fewer than `prefill_rows` rows) or to
        `_block_matmul`, fed from it. int4h.cpp's panels where `in_fp16`, else int4.cpp's layout; a copy in the
        other one is repacked. aten's int4 kernel is for the other devices and CPUs."""
        kind = native.Int4Panels if self.in_fp16() else native.Int4Gemv
        if not isinstance(self._native, kind):
            if self._native is not None:  # (in the other native layout)
                canonical = self._native.canonical()
            elif self.layout == "canonical":  # as saved or just quantized: repacked in one native pass
                canonical = self.qweight.contiguous()
            else:
                canonical = kernels.pack_int4(self.codes())
            self._native = kind(canonical, self.scale, self.zero, self.group_size)
            self.qweight, self.layout, self._kweight, self._sz = self._native.q, "native", None, None
            self.use_kernel = True
        return self._native

    def _native_fits(self) -> bool:
        """Whether the native kernels take this layer: on CPU, in a float model, a shape they support."""
        return (
            self.native
            and self._on_cpu_in_float()
            and native.int4_supported(self.in_features, self.group_size)
            and "int4" in native.available()[0]
        )

    def native_weights(self):
        return self._native_gemv().weights(self.bias, self.a8) if self._native_fits() else None

    def export(self) -> dict[str, torch.Tensor]:
        if self.layout == "native":
            qweight = self._native.canonical()
        else:
            qweight = self.qweight if self.layout == "canonical" else kernels.pack_int4(self.codes())
        out = {"qweight": qweight, "scale": self.scale, "zero": self.zero}
        return out | ({"bias": self.bias.detach()} if self.bias is not None else {})

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


# ---- quantization math ------------------------------------------------------------------------
def _row_chunks(w: torch.Tensor) -> list[slice]:
    """Blocks of rows of w (N, K) of about 1 MiB in fp32 on CPU, so that quantizing one keeps its temporaries
    in cache (2x faster than whole-matrix ops on pythia-1.4b); the whole matrix elsewhere."""
    n, k = w.shape
    step = max(1, (1 << 20) // (4 * k)) if w.device.type == "cpu" else n
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


@torch.no_grad()
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> codes int8 (N, K), scales bf16 (N,)."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=SCALE_DTYPE, device=w.device)
    for rows in _row_chunks(w):
        part = w[rows].float()
        scale[rows] = s = (part.abs().amax(dim=1) / 127).clamp(min=_TINY).to(SCALE_DTYPE)
        q[rows] = torch.round(part / s.float()[:, None]).clamp(-127, 127)  # integers: exact in int8
    return q, scale


@torch.no_grad()
def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> codes uint8 (N, K) in [0, 15], scales and zeros bf16 (N, K/G)."""
    N, K = w.shape
    check_group_size(group_size, K)
    q = torch.empty(N, K // group_size, group_size, dtype=torch.uint8, device=w.device)
    scale = torch.empty(N, K // group_size, dtype=SCALE_DTYPE, device=w.device)
    zero = torch.empty_like(scale)
    for rows in _row_chunks(w):
        g = w[rows].float().view(-1, K // group_size, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (rows, K/G)
        scale[rows] = s = ((hi - lo) / 15).clamp(min=_TINY).to(SCALE_DTYPE)
        zero[rows] = z = (lo + 8 * s.float()).to(SCALE_DTYPE)
        base = z.float() - 8 * s.float()  # the rounded min
        q[rows] = torch.round((g - base[..., None]) / s.float()[..., None]).clamp(0, 15)
    return q.view(N, K), scale, zero


def quantized_weight(w: torch.Tensor, bits: int, group_size: int = 64) -> dict[str, torch.Tensor]:
    """The tensors a quantized layer stores for weight w (N, K), by buffer name: int8 qweight and scale;
    int4 qweight (the canonical packing of the codes), scale and zero."""
    if bits == 8:
        q, scale = quantize_int8(w)
        return {"qweight": q, "scale": scale}
    codes, scale, zero = quantize_int4(w, group_size)
    return {"qweight": kernels.pack_int4(codes), "scale": scale, "zero": zero}


def check_group_size(group_size: int, in_features: int | None = None, where: str = "") -> None:
    if group_size not in GROUP_SIZES:
        raise NeolmError(f"group size {group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}")
    if in_features is not None and in_features % group_size:
        raise NeolmError(f"group size {group_size} does not divide the {in_features} in-features{where}; "
                         "choose a smaller group size")  # fmt: skip


def parse_quantize(quantize) -> int:
    """'int8' / 'int4' -> bits."""
    if quantize not in BITS:
        raise NeolmError(f"unknown quantization {quantize!r}; use int8 or int4")
    return BITS[quantize]


# ---- the module swap ------------------------------------------------------------------------------
def targets(model: nn.Module, skip=DEFAULT_SKIP) -> list[str]:
    """Names of the Linear layers that quantization replaces."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in skip]


def checked_targets(model: nn.Module, bits: int, group_size: int, skip=DEFAULT_SKIP, source: str = "") -> list[str]:
    """`targets`, once the group size is known to divide each one's in-features (int4); source: the file the
    quantization comes from, for the error."""
    names = targets(model, skip)
    if bits == 4:
        check_group_size(group_size)
        for name in names:
            where = f" of layer {name}" + (f" ({source})" if source else "")
            check_group_size(group_size, model.get_submodule(name).in_features, where)
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_activations(model: nn.Module) -> None:
    """Make every int8 or int4 layer of `model` quantize its input rows to int8 too (W8A8 / W4A8, symmetric, a
    scale per row from its largest magnitude) and multiply in integers (neolm/native/int8a8.cpp, int4a8.cpp):
    prompts and batches faster on CPUs with AVX-512 VNNI, at some of the activations' precision
    (bench/QUANT_QUALITY.md). Before `neolm.native.decode.attach`, whose step then takes the same kernels."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear | Int4Linear)]
    if not layers:
        raise NeolmError("quantize_activations needs int8 or int4 weights (quantize='int8' or 'int4', or a folder "
                         "quantized to one of them)")  # fmt: skip
    have, why = native.available()
    missing = {"int8a8" if isinstance(m, Int8Linear) else "int4a8" for m in layers} - set(have)
    if missing:
        kernel = " and ".join(sorted(missing))
        raise NeolmError(f"quantize_activations needs neolm's {kernel} CPU kernel: {why or 'this CPU has no AVX-512 VNNI'}")
    for m in layers:
        if not (m.native and m._on_cpu_in_float()):
            raise NeolmError("quantize_activations needs the model on CPU in float32 or bfloat16, with native kernels")
        if isinstance(m, Int4Linear) and not m._native_fits():
            raise NeolmError(f"quantize_activations: no native int4 kernel for a layer of {m.in_features} "
                             f"in-features in groups of {m.group_size}")  # fmt: skip
        m.quantize_activations()


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group_size: int = 64, skip=DEFAULT_SKIP) -> nn.Module:
    """Replace the model's Linear layers (but `skip`) by quantized ones, in place; returns the model."""
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise NeolmError("the model is already quantized")
    if bits not in (4, 8):
        raise NeolmError(f"{bits}-bit quantization is not supported; use 8 or 4")
    names = checked_targets(model, bits, group_size, skip)
    for name in names:
        linear = model.get_submodule(name)
        q = Int8Linear.from_linear(linear) if bits == 8 else Int4Linear.from_linear(linear, group_size)
        q.prepare(name)
        _set(model, name, q)
    model.quant_config = quant_config(bits, group_size, skip, model)
    log.info("quantized %d layers to int%d%s", len(names), bits, f" (group size {group_size})" if bits == 4 else "")
    return model


def swap_empty(model: nn.Module, bits: int, group_size: int, skip, dtype: torch.dtype, native: bool = True) -> None:
    """Replace the Linear layers of a meta-device model by empty quantized ones (to be loaded into); native:
    whether neolm's native kernels may take them."""
    for name in targets(model, skip):
        linear = model.get_submodule(name)
        args = (linear.in_features, linear.out_features, linear.bias is not None, dtype)
        with torch.device("meta"):
            q = Int8Linear(*args) if bits == 8 else Int4Linear(*args, group_size=group_size)
        q.native = native
        _set(model, name, q)


def quant_config(bits: int, group_size: int, skip, model: nn.Module) -> dict:
    """The `quantization_config` that config.json records."""
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    return {
        "quant_method": "neolm",
        "format_version": 1,
        "bits": bits,
        "scheme": "int8 per-output-channel symmetric" if bits == 8 else "int4 group-wise asymmetric",
        "group_size": group_size if bits == 4 else None,
        "scale_dtype": str(SCALE_DTYPE).removeprefix("torch."),
        "modules_not_to_convert": sorted(n for n in linear if n in set(skip)),
    }
