"""Where neolm's single-stream decode step goes, on the benchmark's checkpoints (run bench.py first).

  python bench/profile_decode.py --models pythia-160m,gpt-neo-125M --threads 2 --out bench/PROFILE.md

Per model (fp32, batch 1, 32-token prompt, 128 greedy steps with eos banned, as bench.py):
  step          median ms per decode step of `iter_generate` and the tok/s it gives
  roofline      weight bytes per step / read bandwidth (torch sum over 1 GiB, same threads)
  linears only  the model's own nn.Linear layers at M=1, back to back (torch's GEMV floor)
  zero-compute  the same layer/head structure with tiny widths: per-step framework + Python cost
  ops           torch.profiler over 32 steps: aten calls and self time per step, top ops
  experiments   the same step with one change patched in from outside (neolm itself is not edited)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "engines"))
import itertools

from common import module_stream_bytes
from machine import bandwidth, quietness

import neolm
from neolm.generate import iter_generate
from neolm.generation_config import GenerationConfig
from neolm.model import GPT

PROMPT = [1000 + 37 * i % 29000 for i in range(32)]


def step_ms(model, n=128, repeats=3) -> float:
    """Median decode step (ms): token 2..n of `iter_generate`, best of `repeats` generations."""
    best = []
    for _ in range(repeats):
        times = []
        t0 = time.perf_counter()
        for _ in iter_generate(model, [PROMPT], GenerationConfig(max_new_tokens=n, min_new_tokens=n)):
            times.append(time.perf_counter() - t0)
        best.append(statistics.median(b - a for a, b in itertools.pairwise(times)) * 1000)
    return min(best)


def linears_ms(model) -> float:
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(1, m.in_features) for m in layers}
    runs = []
    with torch.inference_mode():
        for _ in range(20):
            t = time.perf_counter()
            for m in layers:
                F.linear(xs[m.in_features], m.weight, m.bias)
            runs.append(time.perf_counter() - t)
    return statistics.median(runs[2:]) * 1000


def gemv_variants(model, bw_gbs: float) -> list[str]:
    """One pass over the model's own Linear layers at M=1 (weights cycle through DRAM), in other forms."""
    from neolm.quant.linear import Int4Linear, Int8Linear

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    threads = torch.get_num_threads()

    def timed(fns, nbytes, what):
        runs = []
        with torch.inference_mode():
            for _ in range(12):
                t = time.perf_counter()
                for f in fns:
                    f()
                runs.append(time.perf_counter() - t)
        ms = statistics.median(runs[2:]) * 1000
        gbs = nbytes / ms / 1e6
        return f"| {what} | {ms:.2f} | {nbytes / 1e6:.0f} | {gbs:.1f} | {100 * gbs / bw_gbs:.0f}% |"

    def nb(*ts):
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    rows = ["| weights as | ms per pass | MB | GB/s | of read bandwidth |", "|---|---|---|---|---|"]
    x32 = {m.in_features: torch.randn(1, m.in_features) for m in layers}
    xbf = {k: v.bfloat16() for k, v in x32.items()}
    fp32 = [functools.partial(F.linear, x32[m.in_features], m.weight, m.bias) for m in layers]
    size32 = nb(*(t for m in layers for t in (m.weight, m.bias)))
    rows.append(timed(fp32, size32, "fp32 (N, K), F.linear (as shipped)"))
    torch.set_num_threads(1)
    rows.append(timed(fp32, size32, "fp32 (N, K), F.linear, 1 thread"))
    torch.set_num_threads(threads)
    wt = [(m.weight.t().contiguous(), m.bias) for m in layers]
    rows.append(timed([functools.partial(torch.addmm, b, x32[w.shape[0]], w) if b is not None
                       else functools.partial(torch.mm, x32[w.shape[0]], w) for w, b in wt],
                      size32, "fp32 stored transposed (K, N), addmm(b, x, Wt)"))  # fmt: skip
    del wt
    bf = [(m.weight.bfloat16(), None if m.bias is None else m.bias.bfloat16()) for m in layers]
    rows.append(timed([functools.partial(F.linear, xbf[w.shape[1]], w, b) for w, b in bf],
                      nb(*(t for wb in bf for t in wb)), "bf16, F.linear, bf16 activations"))  # fmt: skip
    del bf
    for cls, what in ((Int8Linear, "neolm Int8Linear (int8 per row, bf16 activations in the kernel)"),
                      (Int4Linear, "neolm Int4Linear (int4 group 64, bf16 activations in the kernel)")):  # fmt: skip
        try:
            q = [cls.from_linear(m) for m in layers]
            for mod in q:
                mod.prepare()
            size = nb(*(t for mod in q for t in list(mod.buffers()) + list(mod.parameters())))
            rows.append(timed([functools.partial(mod, x32[mod.in_features]) for mod in q], size, what))
            del q
        except Exception as e:  # noqa: BLE001 - a report line, not a failure
            rows.append(f"| {what} | failed: {str(e)[:80]} | | | |")
    return rows


def zero_compute_ms(model) -> float:
    """Same layers, heads, windows, positions kind; d_model = 2 per head, d_ff 8, vocab 256."""
    c = model.config
    twin = c.replace(
        d_model=2 * c.n_head,
        d_ff=8,
        vocab_size=256,
        eos_token_id=0,
        bos_token_id=0,
        rotary_dims=2 if c.rotary_dims else 0,
    )
    net = GPT(twin)
    net.init_weights()
    prompt = [t % 256 for t in PROMPT]
    times = []
    for _ in range(3):
        t0, ts = time.perf_counter(), []
        for _ in iter_generate(net.eval(), [prompt], GenerationConfig(max_new_tokens=128, min_new_tokens=128)):
            ts.append(time.perf_counter() - t0)
        times.append(statistics.median(b - a for a, b in itertools.pairwise(ts)) * 1000)
    return min(times)


def op_table(model, steps=32, top=14) -> tuple[list[str], float]:
    from torch.profiler import ProfilerActivity, profile

    gen = iter_generate(model, [PROMPT], GenerationConfig(max_new_tokens=steps + 9, min_new_tokens=steps + 9))
    for _ in range(8):
        next(gen)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            next(gen)
    gen.close()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total_self = sum(e.self_cpu_time_total for e in events)
    calls = sum(e.count for e in events)
    lines = ["| op | calls/step | self µs/step | share |", "|---|---|---|---|"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        lines.append(
            f"| {e.key} | {e.count / steps:.0f} | {e.self_cpu_time_total / steps:.0f} | "
            f"{100 * e.self_cpu_time_total / total_self:.1f}% |"
        )
    return lines, calls / steps


def decode_sdpa(original):
    """Plain matmul-softmax-matmul for one query token; the library kernel otherwise."""

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if q.shape[-2] != 1 or is_causal or kw:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return torch.matmul(scores.softmax(-1), v)

    return sdpa


def experiments(model) -> list[str]:
    import neolm.model as nm

    rows = []
    original = F.scaled_dot_product_attention
    try:
        nm.F.scaled_dot_product_attention = decode_sdpa(original)
        rows.append(
            (
                "one-token attention as matmul + softmax + matmul instead of SDPA's flash kernel",
                step_ms(model, repeats=2),
            )
        )
    finally:
        nm.F.scaled_dot_product_attention = original
    masks = GPT._masks
    try:  # NeoX/global layers: a one-token query with no padding sees every cached key: no mask needed

        def no_global_mask(self, T, start, key_valid, device):
            out = masks(self, T, start, key_valid, device)
            return {w: (None if (w is None and key_valid is None and T == 1) else m) for w, m in out.items()}

        GPT._masks = no_global_mask
        rows.append(("no attention mask for one-token global layers", step_ms(model, repeats=2)))
        nm.F.scaled_dot_product_attention = decode_sdpa(original)
        rows.append(("both of the above", step_ms(model, repeats=2)))
    finally:
        GPT._masks = masks
        nm.F.scaled_dot_product_attention = original
    mlps = [b.mlp for b in model.blocks]
    acts = [m.act for m in mlps]
    threads = torch.get_num_threads()

    def one_thread(act):
        def run(x):  # MKL's vector erf (exact GELU) opens a thread team even for one token's 3072 values
            if x.numel() > 65536:
                return act(x)
            torch.set_num_threads(1)
            try:
                return act(x)
            finally:
                torch.set_num_threads(threads)

        return run

    try:
        for m, act in zip(mlps, acts, strict=True):
            m.act = one_thread(act)
        rows.append(
            ("activation of a decode step on 1 thread (set_num_threads(1) around it)", step_ms(model, repeats=2))
        )
    finally:
        for m, act in zip(mlps, acts, strict=True):
            m.act = act
    return [f"| {what} | {ms:.2f} |" for what, ms in rows]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="pythia-160m,gpt-neo-125M")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="/tmp/neolm-bench")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    q = quietness()
    bw = bandwidth(args.threads)
    out = [(f"# neolm decode profile ({q['time']}, load average {q['loadavg']}, training running: "
           f"{q['neolm_train_running']}, torch {torch.__version__}, {args.threads} threads)"), "",
           f"Read bandwidth {bw['read_gbs']:.1f} GB/s (sum), copy {bw['copy_gbs']:.1f} GB/s.", ""]  # fmt: skip
    for name in args.models.split(","):
        lm = neolm.load(Path(args.cache) / "models" / name / "hf", dtype="float32", device="cpu")
        model = lm.model
        sb = module_stream_bytes(model)
        roof = sb / (bw["read_gbs"] * 1e9) * 1000
        step = step_ms(model)
        lin = linears_ms(model)
        zero = zero_compute_ms(model)
        ops, calls = op_table(model)
        gemv = gemv_variants(model, bw["read_gbs"])
        out += [
            f"## {name} fp32",
            "",
            (
                f"- decode step {step:.2f} ms = {1000 / step:.1f} tok/s; roofline {roof:.2f} ms ({sb / 1e6:.0f} MB of "
                f"weights per step) = {1000 / roof:.1f} tok/s; **{100 * roof / step:.0f}% of roofline**"
            ),
            (
                f"- the model's nn.Linear layers alone at M=1 (torch GEMV floor): {lin:.2f} ms "
                f"({100 * roof / lin:.0f}% of roofline)"
            ),
            f"- zero-compute twin (same layers/heads, tiny widths): {zero:.2f} ms per step = framework + Python overhead",
            f"- rest (attention, norms, elementwise at real widths): {step - lin - zero:.2f} ms",
            f"- aten calls per step: {calls:.0f}",
            "",
            "Top aten ops (profiler, self time):",
            "",
        ]
        out += ops
        out += ["", "The model's Linear layers at M=1 in other weight forms (one pass = one step's matmuls):", ""]
        out += gemv
        out += ["", "Experiments (patched in this process only):", "", "| change | step ms |", "|---|---|"]
        out += [f"| none (as shipped) | {step:.2f} |", *experiments(model), ""]
        print("\n".join(out), flush=True)
    text = "\n".join(out) + "\n"
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
