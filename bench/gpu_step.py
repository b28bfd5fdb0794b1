"""Where a GPU decode step's time goes: one sequence, one token, on a CUDA GPU.

    python bench/gpu_step.py --models pythia-160m,pythia-1.4b --dtype bfloat16

For each model (random weights of the real shape, bench/prepare.py's, made under --cache when missing):
- eager: every block launched from Python (native=False), per step, and the kernels it launches (torch.profiler:
  their count and the GPU time they take together);
- graph: one replay of neolm.cuda_graphs' recorded step (the blocks only);
- step: a whole generate step (iter_generate with min_new_tokens: the embedding, the blocks, ln_f and the head,
  the processors, the pick and its copy to the host);
- roofline: the weight bytes a step reads / the GPU's read bandwidth;
- with --compile: the blocks' step compiled by torch.compile (inductor's fused kernels) and recorded into a graph.
Each the median of --steps timed steps after a warm-up.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "engines"), str(HERE.parent)]
from common import module_stream_bytes
from gpu import read_bandwidth
from prepare import make_checkpoint

import neolm
from neolm.cuda_graphs import GraphStep, static_blocks
from neolm.generate import iter_generate
from neolm.generation_config import GenerationConfig
from neolm.model import KVCache


def timed(fn, steps: int) -> float:
    """Median ms of fn() over `steps` calls, each synchronized."""
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def measure(folder: Path, dtype: str, steps: int, bandwidth: float, compile_too: bool) -> dict:
    lm = neolm.load(folder, device="cuda", dtype=dtype)
    model = lm.model
    step = model.decode_step
    assert isinstance(step, GraphStep)
    cache = KVCache(model.config, 1, 64 + 4 * steps, model.cache_dtype, "cuda")
    x = model.wte(torch.tensor([[5]], device="cuda"))
    with torch.inference_mode():
        model.decode_step = None
        model(torch.arange(64, device="cuda")[None], cache=cache)
        positions = torch.tensor([[64]], device="cuda")

        def eager():
            model(torch.tensor([[7]], device="cuda"), positions, cache, head=False)
            cache.length -= 1

        eager_ms = timed(eager, steps)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eager()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        model.decode_step = step
        step(x, positions, cache)  # recorded here

        def replay():
            step(x, positions, cache)

        graph_ms = timed(replay, steps)
    compiled = {}
    if compile_too:  # the same step through inductor (fused kernels), then recorded into a graph of its own
        try:
            fn = torch.compile(static_blocks, dynamic=False)
            slot = torch.tensor(cache.length, device="cuda")
            with torch.inference_mode():
                t = time.perf_counter()
                fn(model, x, positions, cache, slot, None)
                fn(model, x, positions, cache, slot, None)
                torch.cuda.synchronize()
                compiled["compile_s"] = time.perf_counter() - t
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn(model, x, positions, cache, slot, None)
            compiled["compiled_graph_ms"] = timed(graph.replay, steps)
        except Exception as e:  # noqa: BLE001 (an experiment: its failure is a result)
            compiled["compiled_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    gc = GenerationConfig(max_new_tokens=steps + 1, min_new_tokens=steps + 1)
    prompt = [list(range(100, 132))]
    list(iter_generate(model, prompt, gc))
    torch.cuda.synchronize()
    marks = []
    for _ in iter_generate(model, prompt, gc):
        marks.append(time.perf_counter())
    per_step = statistics.median(1e3 * (b - a) for a, b in itertools.pairwise(marks))
    weights = module_stream_bytes(model)
    return {"eager_ms": eager_ms, "eager_kernels": len(kernels),
            "eager_kernel_ms": sum(e.device_time_total for e in kernels) / 1e3 if kernels else None,
            "graph_ms": graph_ms, "step_ms": per_step, "roofline_ms": 1e3 * weights / (bandwidth * 1e9), **compiled}  # fmt: skip


def int8_layer(n: int = 8192, k: int = 2048, steps: int = 50) -> None:
    """ms of one int8 layer (pythia-1.4b's fc: 2048 -> 8192) at 1, 8 and 512 rows: aten's packed kernel against
    dequantizing to bf16 and cuBLAS, and the bf16 layer."""
    from neolm.quant import kernels

    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    scale = torch.rand(n, device="cuda") / 100
    w = (q.float() * scale[:, None]).bfloat16()
    for m in (1, 8, 512):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        packed = timed(lambda: kernels.int8_mm(x, q, scale), steps)
        dequant = timed(
            lambda: torch.nn.functional.linear(x, (q.to(torch.bfloat16) * scale[:, None].bfloat16())), steps
        )
        dense = timed(lambda: torch.nn.functional.linear(x, w), steps)
        print(f"int8 {k}->{n} at {m} rows: packed {packed:.3f} ms, dequantized {dequant:.3f} ms, bf16 {dense:.3f} ms")


def int4_layer(n: int = 8192, k: int = 2048, steps: int = 50) -> None:
    """ms of one int4 layer (group 64) at 1 to 512 rows: aten's packed kernel (tinygemm) against dequantizing to
    bf16 and cuBLAS, and the bf16 layer."""
    from neolm.quant.linear import Int4Linear

    layer = Int4Linear.from_linear(torch.nn.Linear(k, n, bias=False).cuda().bfloat16(), 64)
    layer.prepare()
    w = layer.dequantize(torch.bfloat16)
    for m in (1, 8, 32, 64, 128, 512):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        packed = timed(lambda: layer.matmul(x), steps)
        dequant = timed(lambda: torch.nn.functional.linear(x, layer.dequantize(torch.bfloat16)), steps)
        dense = timed(lambda: torch.nn.functional.linear(x, w), steps)
        print(f"int4 {k}->{n} at {m} rows: packed {packed:.3f} ms, dequantized {dequant:.3f} ms, bf16 {dense:.3f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="pythia-160m,pythia-1.4b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cache", default="/tmp/neolm-bench")
    p.add_argument("--compile", action="store_true", help="also time the step compiled by inductor, in a graph")
    args = p.parse_args()
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth:.0f} GB/s; {torch.cuda.get_device_name()}; torch {torch.__version__}")
    int8_layer()
    int4_layer()
    if not args.models:
        return
    for name in args.models.split(","):
        folder = Path(args.cache) / "models" / name / "hf"
        if not (folder / "config.json").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            make_checkpoint(name, str(folder))
        r = measure(folder, args.dtype, args.steps, bandwidth, args.compile)
        print(f"{name} {args.dtype}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()),
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
