"""One engine x model x precision, measured in its own process; prints one JSON object.

Run by bench/bench.py (which also sets OMP/MKL thread variables), with the interpreter that has the
engine installed. Needs only the standard library plus the engine's own packages, so it runs in the
peers' virtual environments too. Each engine module defines `Engine(variant)` with
`files(model_dir, precision)` (the paths `load` reads), `load(model_dir, precision, threads)`,
`single(ids, n)` and `batch(prompts, n)` (both return the time of each generation step since the call, in
seconds, and leave the first sequence's tokens in `.tokens`), `prefill(ids)`, `unload()` and `info()`. With
--serve it decodes on request instead (serve()).

Figures (raw per-run values; bench.py takes median/min/max):
  ttft_s         time to the first new token, 32-token prompt (prefill + one step)
  decode_tps     (n - 1) / (time of token n - time of token 1), single stream, greedy, n forced
  prefill_tps    prompt tokens / time to process a 512-token prompt and get the last logits
  batch_tps      batch * (n - 1) / (last step - first step), 8 different prompts at once
  batch_e2e_tps  batch * n / whole batched call (prefill included)
  load_s         load + build from a warm page cache (the engine's files, `Engine.files`, are read once
                 before the first load; then runs - 1 reloads)
  peak_rss_mb    VmHWM of this process after load and all measurements
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import random
import sys
import time
import traceback

from common import Unavailable, read_through

MODULES = {
    "neolm": "neolm_engine",
    "transformers": "hf_engine",
    "ctranslate2": "ct2_engine",
    "llamacpp": "llamacpp_engine",
}


def prompt_ids(length: int, seed: int) -> list[int]:
    """The same pseudo-random ids for every engine: plain BPE tokens, no special ids."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(length)]


def peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def check_steps(steps: list[float], n: int, what: str) -> None:
    if len(steps) != n:
        raise RuntimeError(f"{what}: expected {n} generation steps, got {len(steps)} (eos not suppressed?)")


def measure(engine, args, result: dict, save) -> None:
    """Fill result["figures"], calling save() after each step so that a killed worker leaves what it had."""
    figures = result["figures"] = {
        k: [] for k in ("ttft_s", "decode_tps", "prefill_tps", "batch_tps", "batch_e2e_tps", "load_s")
    }
    t0 = time.perf_counter()
    result["warmed_bytes"] = read_through(engine.files(args.model_dir, args.precision))
    result["warm_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    engine.load(args.model_dir, args.precision, args.threads)
    figures["load_s"].append(time.perf_counter() - t0)
    result["info"] = engine.info()
    short = prompt_ids(args.prompt_len, 0)
    n = args.new_tokens
    wanted = set(args.figures.split(","))
    # warm-up: kernels, allocator, oneDNN/ggml plans; not timed
    check_steps(engine.single(short, min(4, n)), min(4, n), "warm-up")
    if "prefill" in wanted:
        engine.prefill(prompt_ids(min(64, args.prefill_len), 9))
    for r in range(args.runs):
        if "single" in wanted:
            steps = engine.single(short, n)
            check_steps(steps, n, "single stream")
            result["greedy_tokens"] = [int(t) for t in engine.tokens]  # the engines' agreement check
            figures["ttft_s"].append(steps[0])
            if n > 1:
                figures["decode_tps"].append((n - 1) / (steps[-1] - steps[0]))
        if "prefill" in wanted:
            long = prompt_ids(args.prefill_len, 100 + r)
            t = time.perf_counter()
            engine.prefill(long)
            figures["prefill_tps"].append(len(long) / (time.perf_counter() - t))
        save()
    if "batch" in wanted and args.batch > 1:
        prompts = [prompt_ids(args.prompt_len, 1000 + i) for i in range(args.batch)]
        engine.batch(prompts, min(4, n))  # warm-up at this batch size
        for _ in range(args.runs):
            steps = engine.batch(prompts, n)
            check_steps(steps, n, "batch")
            if n > 1:
                figures["batch_tps"].append(args.batch * (n - 1) / (steps[-1] - steps[0]))
            figures["batch_e2e_tps"].append(args.batch * n / steps[-1])
            save()
    result["peak_rss_mb"] = peak_rss_mb()  # before the reloads
    if "load" in wanted:
        for _ in range(args.runs - 1):
            engine.unload()
            gc.collect()
            t0 = time.perf_counter()
            engine.load(args.model_dir, args.precision, args.threads)
            figures["load_s"].append(time.perf_counter() - t0)
            save()


def serve(engine, args) -> None:
    """bench/duel.py's side: load and warm up, print {"ready": ...}, then one single-stream decode per "single"
    line on stdin, each answered by a JSON line; "quit" (or the end of stdin) ends it. Idle while it waits, so
    that two of these processes can be alternated on one machine."""
    engine.load(args.model_dir, args.precision, args.threads)
    short, n = prompt_ids(args.prompt_len, 0), args.new_tokens
    check_steps(engine.single(short, min(4, n)), min(4, n), "warm-up")
    print(json.dumps({"ready": True, "info": engine.info()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "single":
            break
        steps = engine.single(short, n)
        check_steps(steps, n, "single stream")
        print(json.dumps({"decode_tps": (n - 1) / (steps[-1] - steps[0])}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", required=True, choices=sorted(MODULES))
    p.add_argument("--variant", default="")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--precision", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--figures", default="single,prefill,batch,load")
    p.add_argument("--out", help="where the JSON result goes (not with --serve)")
    p.add_argument("--serve", action="store_true", help="decode on request from stdin (bench/duel.py)")
    args = p.parse_args()
    if args.serve:
        serve(importlib.import_module(MODULES[args.engine]).Engine(args.variant), args)
        os._exit(0)
    if not args.out:
        p.error("--out is required")
    result = {"engine": args.engine, "variant": args.variant, "precision": args.precision, "python": sys.executable}

    def save():
        with open(args.out + ".tmp", "w") as f:
            json.dump({"status": "partial", "rss_so_far_mb": peak_rss_mb(), **result}, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    try:
        module = importlib.import_module(MODULES[args.engine])
        measure(module.Engine(args.variant), args, result, save)
        result["status"] = "ok"
    except Unavailable as e:
        result.update(status="unavailable", reason=str(e))
    except ImportError as e:
        result.update(status="unavailable", reason=f"not installed: {e}")
    except Exception as e:  # noqa: BLE001 - the report shows it
        result.update(status="error", reason=f"{type(e).__name__}: {e}".strip()[:500], traceback=traceback.format_exc())
    result["figures"] = {k: v for k, v in result.get("figures", {}).items() if v}
    save()
    os._exit(0)  # skip slow interpreter teardown of big models


if __name__ == "__main__":
    main()
