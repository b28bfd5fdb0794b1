"""neolm's prompt attention (neolm/native/attention.cpp) against torch's scaled_dot_product_attention.

    python bench/prompt_attention.py [--models gpt-neo-125M,pythia-160m,pythia-1.4b] [--rounds 8]

1. The kernels alone, causal, at the head shapes of GPT-Neo / Pythia (q, k, v strided views of the fused
   projection, as in the model): ms per call and the speed-up.
2. Whole prefills of 512 tokens (last logits) on the benchmark's checkpoints (bench.py makes them under
   /tmp/neolm-bench/models/<shape>/hf), in one process, the model's attention hook switched on and off
   between calls, so that both see the same phases of the machine's memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import neolm
from neolm.native.attention import prompt_attention

MODELS = Path("/tmp/neolm-bench/models")
HEADS = [(12, 64), (16, 128), (8, 256), (32, 80)]  # 125M/160m, 1.3B/1.4b, pythia-1b, pythia-2.8b
CASES = [(1, 512), (1, 128), (8, 32)]  # (batch, tokens)


def timed(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def kernels() -> None:
    print("| heads x dim | dtype | batch x tokens | SDPA, ms | native, ms | speed-up |\n|---|---|---|---|---|---|")
    for heads, dim in HEADS:
        for dtype in (torch.float32, torch.bfloat16):
            for batch, tokens in CASES:
                q, k, v = torch.randn(batch, tokens, heads, 3, dim).to(dtype).permute(3, 0, 2, 1, 4)
                scale = dim**-0.5
                def sdpa_call(q=q, k=k, v=v, scale=scale):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2).contiguous()

                sdpa, ours = timed(sdpa_call), timed(lambda q=q, k=k, v=v, scale=scale: prompt_attention(q, k, v, "causal", scale))
                print(f"| {heads} x {dim} | {str(dtype)[6:]} | {batch} x {tokens} | {sdpa:.2f} | {ours:.2f} | {sdpa / ours:.2f}x |")


def prefills(models: list[str], rounds: int) -> None:
    print("\n| model | dtype | SDPA, tok/s | native, tok/s | speed-up (per-round range) |\n|---|---|---|---|---|")
    ids = torch.randint(0, 50000, (1, 512), generator=torch.Generator().manual_seed(0))
    for name in models:
        folder = MODELS / name / "hf"
        if not folder.exists():
            print(f"| {name} | skipped: {folder} missing (run bench/bench.py first) | | | |")
            continue
        for dtype in ("float32", "bfloat16"):
            model = neolm.load(folder, dtype=dtype).model
            rates: dict[bool, list[float]] = {False: [], True: []}
            with torch.inference_mode():
                for r in range(rounds + 1):
                    for native in (False, True):
                        for block in model.blocks:
                            block.attn.attend = prompt_attention if native else None
                        start = time.perf_counter()
                        model(ids, last_only=True)
                        if r:  # round 0 warms up
                            rates[native].append(512 / (time.perf_counter() - start))
            ratios = [b / a for a, b in zip(rates[False], rates[True])]
            off, on = statistics.median(rates[False]), statistics.median(rates[True])
            print(f"| {name} | {dtype} | {off:.0f} | {on:.0f} | {on / off:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt-neo-125M,pythia-160m,pythia-1.4b")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kernels()
    prefills([m for m in args.models.split(",") if m], args.rounds)


if __name__ == "__main__":
    main()
