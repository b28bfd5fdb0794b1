"""The native few-row matmuls (neolm/native/gemm.cpp) against the one-row kernels and oneDNN.

Two tables, each kernel timed in the same process, weights streamed from memory (several copies of each
matrix in rotation, ~300 MB per kind, so that none comes from cache):

1. pythia-1.4b's block shapes, per weight format: one row through the one-row kernel (gemv.cpp) against M
   rows through gemm.cpp. "batch / single" is what a batch of M sequences would decode per second relative
   to one sequence if the blocks' matmuls were all there is: M x gemv time / gemm time.
2. The output head (50304 rows) and one block shape at M = 1..32 rows, fp32 and bf16: oneDNN's linear (what
   torch runs) against the native kernels; where oneDNN catches up sets `neolm.native.FEW_ROWS`.

    python bench/few_rows.py [--rows 8] [--kinds f32,bf16,int8,int4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neolm import native
from neolm.ops import linear

BYTES = {"f32": 4, "bf16": 2, "int8": 1, "int4": 0.5}
BLOCK_SHAPES = [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192)]  # pythia-1.4b: qkv, proj, fc, out


def seconds(fn, reps: int = 5) -> float:
    """Median of `reps` timed calls after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernel(kind: str, n: int, k: int, copies: int):
    """fn(x (M, K) fp32) -> runs the kind's native kernel over every copy of a random (n, k) matrix."""
    g = torch.Generator().manual_seed(0)
    if kind in ("f32", "bf16"):
        dtype = torch.float32 if kind == "f32" else torch.bfloat16
        weights = [(torch.randn(n, k, generator=g) * 0.02).to(dtype) for _ in range(copies)]
        return lambda x: [native.float_gemv(x.to(dtype), w, None) for w in weights]
    if kind == "int8":
        codes = [torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g) for _ in range(copies)]
        scale = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)
        return lambda x: [native.int8_gemv(x, q, scale, None) for q in codes]
    group = 64
    layers = [
        native.Int4Gemv.from_codes(torch.randint(0, 16, (n, k), generator=g), (torch.rand(n, k // group, generator=g) * 0.01).bfloat16(),
                        (torch.randn(n, k // group, generator=g) * 0.01).bfloat16(), group)
        for _ in range(copies)
    ]  # fmt: skip
    return lambda x: [layer(x, None) for layer in layers]


def block_table(kinds: list[str], rows: int) -> None:
    print(f"| format | shape | one row, ms | {rows} rows, ms | {rows} rows / one row | batch / single |")
    print("|---|---|---|---|---|---|")
    for kind in kinds:
        one = many = 0.0
        for n, k in BLOCK_SHAPES:
            copies = max(1, int(3e8 // (n * k * BYTES[kind])))
            fn = kernel(kind, n, k, copies)
            t1 = seconds(lambda: fn(torch.randn(1, k))) / copies
            tm = seconds(lambda: fn(torch.randn(rows, k))) / copies
            one, many = one + t1, many + tm
            print(f"| {kind} | {n}x{k} | {1e3 * t1:.3f} | {1e3 * tm:.3f} | {tm / t1:.2f} | {rows * t1 / tm:.2f}x |")
        print(f"| {kind} | all four | {1e3 * one:.3f} | {1e3 * many:.3f} | {many / one:.2f} | {rows * one / many:.2f}x |")


def head_table() -> None:
    print("| shape | rows | fp32 oneDNN, ms | fp32 native, ms | bf16 oneDNN, ms | bf16 native, ms |")
    print("|---|---|---|---|---|---|")
    for n, k in [(50304, 768), (8192, 2048)]:
        w = torch.randn(n, k) * 0.02
        wb = w.bfloat16()
        for m in (1, 4, 8, 12, 16, 24, 32):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            cells = [seconds(lambda: linear(x, w, None)), seconds(lambda: native.float_gemv(x, w, None)),
                     seconds(lambda: linear(xb, wb, None)), seconds(lambda: native.float_gemv(xb, wb, None))]  # fmt: skip
            print(f"| {n}x{k} | {m} | " + " | ".join(f"{1e3 * c:.2f}" for c in cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--kinds", default="f32,bf16,int8,int4")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    have, why = native.available()
    kinds = [k for k in args.kinds.split(",") if k in have]
    if not kinds:
        raise SystemExit(f"no native kernels here: {why or 'none of ' + args.kinds}")
    block_table(kinds, args.rows)
    print()
    head_table()


if __name__ == "__main__":
    main()
