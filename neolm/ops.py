"""The one dense layer the model uses: nn.Linear with faster CPU kernels for inference.

On CPU, torch's F.linear goes to MKL, whose fp32 GEMM/GEMV runs at a fraction of the memory bandwidth
on some CPUs (on an AMD EPYC: ~20 GB/s at one token against the ~60 GB/s the hardware streams). oneDNN's
linear (the kernel `torch.compile` itself picks for CPU linears) reaches 1.3-2.5x that from 1 to 512 rows
(bench/PROFILE.md). It has no autograd, so it only runs where no gradient is wanted; training, other
devices and other dtypes use F.linear.

Opt-in (`compile_gemv`, `neolm.load(..., compile=True)`): one-row products (single-stream decoding) go
to a one-row kernel (GEMV) compiled for this machine: neolm's own AVX-512 kernels (`neolm.native`), or,
on CPUs without them, a GEMV that `torch.compile` generates per weight shape. Each layer shape keeps the
kernel that is fastest on this machine. A layer on the native kernels also sends products of up to
`native.FEW_ROWS` rows (a decode step of a batch) to them. It needs a C++ compiler at run time, as
torch.compile does.
"""

from __future__ import annotations

import functools
import logging
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

from neolm import native
from neolm.errors import NeolmError

log = logging.getLogger(__name__)

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _no_grad_wanted(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN for CPU inference in fp32/bf16 (bf16 products of many rows
    in fp32 where this CPU's fp32 GEMM is the faster one: `gemm_dtype`)."""
    if (
        _ONEDNN
        and x.device.type == "cpu"
        and x.dtype in _ONEDNN_DTYPES
        and weight.dtype == x.dtype
        and _no_grad_wanted(x, weight)
    ):
        if x.dtype == torch.bfloat16 and x.shape[:-1].numel() >= FP32_ROWS and gemm_dtype() == torch.float32:
            return _bf16_in_fp32(x, weight, bias)
        return _onednn(x, weight, bias)
    return F.linear(x, weight, bias)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# Products of many rows (prompts) multiply their weights in bf16 unless this CPU's fp32 GEMM runs faster by this
# factor; then a bf16 model's products of FP32_ROWS rows or more upcast them (exact) a block at a time, and
# quantized layers dequantize to fp32 (neolm.quant.linear.QuantLinear._block_matmul).
GEMM_FP32_MARGIN = 1.25
FP32_ROWS = 32  # (at 32 rows the upcast costs a quarter of what the fp32 GEMM saves; at 8, all of it)
FP32_BLOCK = 1 << 21  # weights upcast at a time: 8 MiB in fp32


def rows_per_block(n: int, k: int, max_weights: int, align: int = 1) -> int:
    """Rows of an (n, k) weight per block when it is made (dequantized, upcast) a block at a time: as few
    blocks of at most ~max_weights as fit, of equal sizes (no thin tail), rounded up to a multiple of align."""
    blocks = -(-n * k // max_weights)
    return -(-n // blocks // align) * align


def _bf16_in_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A bf16 product through the fp32 GEMM: the same exact products (bf16 x bf16 fits fp32), fp32 sums (in
    another order than the bf16 GEMM's), the bias added in fp32 and the output rounded to bf16 once."""
    x2 = x.reshape(-1, x.shape[-1]).float()  # (M, K)
    n, k = weight.shape
    step = rows_per_block(n, k, FP32_BLOCK)
    y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    for start in range(0, n, step):
        end = min(start + step, n)
        part = _onednn(x2, weight[start:end].float(), None if bias is None else bias[start:end].float())
        y[:, start:end] = part  # (rounded to bf16)
    return y.view(*x.shape[:-1], n)


@functools.cache
def gemm_dtype() -> torch.dtype:
    """The dtype, bf16 or fp32, in which oneDNN's CPU GEMM multiplies many rows faster on this machine: bf16
    where the CPU has fast bf16 units (an AVX-512 Zen 5: ~2x fp32's rate), fp32 where bf16 runs slower (an
    Intel Xeon with AVX512-BF16 but no AMX exposed: 85 against 150 G multiply-adds/s, bench/PROFILE.md,
    session 13). Timed once per process, in interleaved rounds (~20 ms); bf16 unless fp32 wins by
    GEMM_FP32_MARGIN, so that near-ties (where a coin could flip the choice, and the last bits of prompt
    logits with it) keep the default. fp32 is the more exact of the two: activations are not rounded."""
    if not _ONEDNN:
        return torch.bfloat16
    x, w = torch.randn(256, 1024), torch.randn(1024, 1024) / 32
    best = {torch.bfloat16: float("inf"), torch.float32: float("inf")}
    with torch.inference_mode():
        operands = {dtype: (x.to(dtype), w.to(dtype)) for dtype in best}
        for dtype, (a, b) in operands.items():  # warm-up: oneDNN makes its primitives on first use
            _onednn(a, b, None)
        for _ in range(3):
            for dtype, (a, b) in operands.items():
                start = time.perf_counter()
                _onednn(a, b, None)
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    bf16, fp32 = best[torch.bfloat16], best[torch.float32]
    dtype = torch.float32 if fp32 * GEMM_FP32_MARGIN < bf16 else torch.bfloat16
    log.info("many-row bf16 and quantized products in %s (oneDNN GEMM 256x1024x1024: bf16 %.2f ms, fp32 %.2f ms)",
             str(dtype).removeprefix("torch."), 1e3 * bf16, 1e3 * fp32)  # fmt: skip
    return dtype


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) one row @ weight (N, K).T (+ bias), products and sums in fp32; written for torch.compile,
    which turns it into one fused, vectorised pass over the weight."""
    y = (x.float()[..., None, :] * weight.float()).sum(-1)  # (..., 1, K) * (N, K) -> (..., N)
    y = y if bias is None else y + bias.float()
    return y.to(x.dtype)


class _Compiled:
    """torch.compile(fn) (static shapes, whole graph), made on the first call: torch.compile imports
    torch._dynamo, ~1.2 s, which a process pays only where a compiled kernel runs (layers offer one to
    `use_native` and `compile_gemv`, which often take another)."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, *args):
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=False, fullgraph=True)
        return self.compiled(*args)


_compiled: dict[tuple, _Compiled] = {}  # (function, shapes and dtypes) -> its torch.compile'd version


def compiled(fn, *tensors: torch.Tensor | None) -> _Compiled:
    """fn compiled for these tensors' shapes and dtypes (once per process, on its first call)."""
    key = (fn, *((None if t is None else (*t.shape, t.dtype)) for t in tensors))
    if key not in _compiled:
        # a copy of fn with its own code object: dynamo caches (and limits) compilations per code object,
        # so each shape gets its own cache instead of all shapes sharing, and overflowing, one
        copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        _compiled[key] = _Compiled(copy)
    return _compiled[key]


class Linear(nn.Linear):
    gemv = None  # set by compile_gemv: fn(x, weight, bias), the kernel for one-row inputs at inference
    gemv_rows = 1  # the most rows `gemv` takes (native.FEW_ROWS for the native kernels)

    def _cpu_float(self) -> bool:
        """A CPU fp32/bf16 weight, and a bias (if any) of its dtype: what the one-row kernels take."""
        w, b = self.weight, self.bias
        return w.device.type == "cpu" and w.dtype in _ONEDNN_DTYPES and (b is None or b.dtype == w.dtype)

    def gemv_kernels(self) -> dict:
        """One-row kernels for a CPU fp32/bf16 weight: name -> fn(x (1, K), weight, bias) -> (1, N)."""
        if not self._cpu_float():
            return {}
        weights = self.native_weights()
        if weights is not None and weights.kind in native.available()[0]:
            return {"native": native.float_gemv}
        return {"inductor": compiled(_gemv, self.weight, self.bias)}

    def native_weights(self):
        """This layer's tensors for neolm's native kernels (neolm.native.decode), or None."""
        w, b = self.weight, self.bias
        if not (self._cpu_float() and w.is_contiguous() and (b is None or b.is_contiguous())):
            return None
        kind = "bf16" if w.dtype == torch.bfloat16 else "f32"
        return native.Weights(kind, w, bias=b, n=w.shape[0], k=w.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.gemv is not None
            and 0 < x.shape[:-1].numel() <= self.gemv_rows
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype
            and _no_grad_wanted(x, self.weight)
        ):
            y = self.gemv(x.reshape(-1, self.in_features).contiguous(), self.weight, self.bias)  # (M, N)
            return y.view(*x.shape[:-1], self.out_features)
        return linear(x, self.weight, self.bias)


def _seconds_per_pass(modules: list[nn.Module], x: torch.Tensor, passes: int = 3) -> float:
    """Fastest of `passes` passes of x through every module (weights streamed as in a decode step); the
    caller has run them once already (compilation, first-touch)."""
    best = float("inf")
    with torch.inference_mode():
        for _ in range(passes):
            start = time.perf_counter()
            for module in modules:
                module(x)
            best = min(best, time.perf_counter() - start)
    return best


def _use(modules: list[nn.Module], offers: list[dict], kernel: str) -> None:
    """Give each layer its offer of `kernel` (None, its own kernel, for "own"). The native kernels also take
    products of a few rows (a decode step of a batch); the others one row."""
    for module, offer in zip(modules, offers):
        module.gemv = offer.get(kernel)
        module.gemv_rows = native.FEW_ROWS if kernel == "native" else 1


def use_native(modules: list[nn.Module]) -> int:
    """Give these layers neolm's native kernels for products of one to native.FEW_ROWS rows, untimed (what
    compile_gemv picks for the output head on AVX-512 CPUs: bench/PROFILE.md); returns how many took them."""
    offers = [m.gemv_kernels() if callable(getattr(m, "gemv_kernels", None)) else {} for m in modules]
    taking = [(m, offer) for m, offer in zip(modules, offers) if "native" in offer]
    _use([m for m, _ in taking], [offer for _, offer in taking], "native")
    return len(taking)


ROUNDS = 3  # timed passes per kernel in compile_gemv
# The layer's own kernel is kept only when it beats the best one-row kernel by more than this factor's
# inverse: when the machine's memory is in a slow phase both stream at that speed and tie, and which wins is
# noise; when it is fast, the one-row kernels pull ahead (e.g. a 160M model's fp32 head: 2.4 ms native vs
# 3.3-3.7 ms oneDNN in the same process; bench/PROFILE.md).
OWN_MARGIN = 0.9


def compile_gemv(model: nn.Module) -> int:
    """Give one-row products of every layer that offers kernels (`gemv_kernels()`) the fastest of them:
    neolm's native kernels, or torch.compile'd GEMVs (compiled now, seconds per shape), or the layer's own
    kernel. The layers of each (type, shape, dtype) are timed together, so that their weights stream from
    memory as in a decode step. Returns how many layers use a one-row kernel."""
    groups: dict[tuple, list[tuple[str, nn.Module]]] = {}  # (layer type, shape, dtype) -> its layers
    for name, module in model.named_modules():
        if callable(getattr(module, "gemv_kernels", None)):
            module.gemv, module.gemv_rows = None, 1
            dtype = module.dtype if isinstance(getattr(module, "dtype", None), torch.dtype) else module.weight.dtype
            groups.setdefault((type(module), module.in_features, module.out_features, dtype), []).append((name, module))
    count = 0
    for (kind, k, n, dtype), members in groups.items():
        modules = [m for _, m in members]
        offers = [m.gemv_kernels() for m in modules]
        names = set.intersection(*(set(o) for o in offers))
        if not names:
            continue
        x = torch.zeros(1, k, dtype=dtype)
        timings = dict.fromkeys(["own", *sorted(names)], float("inf"))

        for kernel in timings:  # one warm-up pass each, which compiles torch.compile's kernels
            _use(modules, offers, kernel)
            try:
                with torch.inference_mode():
                    for m in modules:
                        m(x)
            except Exception as e:  # torch.compile's errors: no C++ compiler, unsupported platform, ...
                raise NeolmError(
                    f"compiling the one-token matmul of {members[0][0]} failed; --compile / compile=True needs "
                    f"torch.compile with a working C++ compiler ({str(e).strip().splitlines()[0][:300]})"
                ) from None
        for _ in range(ROUNDS):  # interleaved: a change in the machine's speed meets every kernel alike
            for kernel in timings:
                _use(modules, offers, kernel)
                timings[kernel] = min(timings[kernel], _seconds_per_pass(modules, x, passes=1))
        best = min(timings, key=timings.get)
        offered = min((t, kernel) for kernel, t in timings.items() if kernel != "own")
        if best == "own" and timings["own"] > OWN_MARGIN * offered[0]:
            best = offered[1]  # a tie within the noise: the one-row kernel
        _use(modules, offers, best)
        count += len(modules) if best != "own" else 0
        log.debug("%s %dx%d %s: %s; using %s", kind.__name__, n, k, dtype,
                  ", ".join(f"{name} {1e6 * t / len(modules):.0f} us" for name, t in timings.items()), best)  # fmt: skip
    log.info("one-token kernels: %d linear layers use them (%s)", count,
             "native AVX-512" if native.available()[0] else "torch.compile; " + native.available()[1])  # fmt: skip
    return count
