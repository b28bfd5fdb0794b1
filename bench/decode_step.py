"""Where a single-stream decode step goes with `compile=True`: the native step (every block in one call), the
output head, and the same step through torch (the model's decode_step switched off), interleaved.

    python bench/decode_step.py --model /tmp/neolm-bench/models/pythia-160m/hf --precisions fp32,bf16,int8,int4

Checkpoints: bench/prepare.py's (random weights of the real shapes). Median ms over --steps steps at cache
slot 100, 2 threads by default. Not a test; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import neolm
from neolm.model import KVCache

PRECISIONS = {
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "int8": dict(dtype="float32", quantize="int8", quantize_head=True),
    "int4": dict(dtype="bfloat16", quantize="int4", quantize_head=True),
}


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


@torch.inference_mode()
def measure(folder: str, precision: str, steps: int) -> dict[str, float]:
    model = neolm.load(folder, compile=True, **PRECISIONS[precision]).model
    native_step, dtype = model.decode_step, model.ln_f.weight.dtype
    assert native_step is not None, "no native decode step on this machine"
    cache = KVCache(model.config, 1, 512, dtype)
    token, position = torch.tensor([[5]]), torch.tensor([[100]])
    model(torch.arange(100)[None], cache=cache)
    x, h = model.wte(token), torch.randn(1, 1, model.config.d_model, dtype=dtype)
    times: dict[str, list[float]] = {"step": [], "blocks": [], "head": [], "torch step": []}

    def step():
        cache.length = 100
        model(token, cache=cache)

    def blocks():
        cache.length = 100
        native_step(x.clone(), position, cache)

    for i in range(steps):
        times["step"].append(_ms(step))
        times["blocks"].append(_ms(blocks))
        times["head"].append(_ms(lambda: model.lm_head(model.ln_f(h))))
        if i % 4 == 0:
            model.decode_step = None
            times["torch step"].append(_ms(step))
            model.decode_step = native_step
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a checkpoint folder")
    parser.add_argument("--precisions", default="fp32,bf16,int8,int4")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for precision in args.precisions.split(","):
        ms = measure(args.model, precision, args.steps)
        print(f"{precision}: " + ", ".join(f"{name} {value:.2f} ms" for name, value in ms.items()))


if __name__ == "__main__":
    main()
