"""The CUDA section of the benchmark: neolm against transformers (and vLLM where it is installed) on one GPU.

    python bench/gpu.py --models pythia-160m,gpt-neo-125M,pythia-1.4b,gpt-neo-1.3B --out bench/GPU.md

Same checkpoints and figures as bench/bench.py (random weights of the real shapes from bench/prepare.py, the same
prompt ids, eos banned): single-stream decode (32-token prompt, 128 new tokens, greedy), time to first token,
prefill of a 512-token prompt, batch-8 decode, load time from the page cache, peak GPU memory, and each decode
rate as a fraction of the GPU's roofline (weight bytes a step reads / the read bandwidth measured in the same
run). Every row runs in this one process, one after another (a GPU has no neighbours to share its memory bus
with, so in-process runs do not disturb each other the way CPU rows would); each figure is the median of --runs
runs after an untimed warm-up, with min and max.

Engines: neolm (its default on a GPU: decode steps replayed as CUDA graphs, neolm.cuda_graphs), neolm eager
(native=False: every op launched from Python, as before the graphs), transformers (its default attention, sdpa,
and its default dynamic cache), vLLM (reported as not installed where it is not).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "engines"), str(HERE.parent)]
from common import module_stream_bytes
from prepare import make_checkpoint
from worker import prompt_ids

import neolm
from neolm.generate import iter_generate
from neolm.generation_config import GenerationConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED = {"int8": "int8", "int4": "int4"}  # neolm's weight-only kinds (activations in bf16 on a GPU)


def sync() -> None:
    torch.cuda.synchronize()


def read_bandwidth(gib: float = 2.0, passes: int = 10) -> float:
    """GB/s of a read-only reduction over `gib` GiB of bf16 (a weight-streaming decode step's access pattern)."""
    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device="cuda")
    rates = []
    for i in range(passes + 1):
        sync()
        t = time.perf_counter()
        x.sum(dtype=torch.float32)
        sync()
        if i:
            rates.append(x.numel() * 2 / (time.perf_counter() - t) / 1e9)
    del x
    return statistics.median(rates)


class NeolmEngine:
    def __init__(self, native: bool):
        self.native = native

    def load(self, folder: Path, precision: str) -> None:
        kwargs = {"device": "cuda", "native": self.native}
        if precision in QUANTIZED:
            kwargs |= {"dtype": "bfloat16", "quantize": QUANTIZED[precision], "quantize_head": True}
        else:
            kwargs["dtype"] = DTYPES[precision]
        self.lm = neolm.load(folder, **kwargs)
        self.model = self.lm.model

    def steps(self, prompts: list[list[int]], n: int) -> tuple[list[float], list[int]]:
        gc_ = GenerationConfig(max_new_tokens=n, min_new_tokens=n)
        times, tokens = [], []
        t0 = time.perf_counter()
        for step in iter_generate(self.lm.model, prompts, gc_):
            times.append(time.perf_counter() - t0)
            tokens.append(int(step[0]))
        return times, tokens

    def prefill(self, ids: list[int]) -> None:
        with torch.inference_mode():
            self.lm.model(torch.tensor([ids], device="cuda"), last_only=True)

    def graphs(self) -> int | None:
        step = self.lm.model.decode_step
        return len(step.graphs) if step is not None and hasattr(step, "graphs") else None


class _Clock:
    def __init__(self):
        self.t0, self.times, self.tokens, self.prompt_seen = time.perf_counter(), [], [], False

    def put(self, value):
        if self.prompt_seen:
            self.tokens.append(int(value.reshape(-1)[0]))  # (a sync, as neolm's steps make)
            self.times.append(time.perf_counter() - self.t0)
        self.prompt_seen = True

    def end(self):
        pass


class TransformersEngine:
    def load(self, folder: Path, precision: str) -> None:
        from transformers import AutoModelForCausalLM

        if precision not in DTYPES:
            raise LookupError(f"not measured: transformers has no {precision} path without bitsandbytes")
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[precision]).to("cuda").eval()

    def steps(self, prompts, n):
        ids = torch.tensor(prompts, device="cuda")
        clock = _Clock()
        with torch.inference_mode():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                min_new_tokens=n, pad_token_id=self.model.config.eos_token_id, streamer=clock)  # fmt: skip
        return clock.times, clock.tokens

    def prefill(self, ids):
        with torch.inference_mode():
            self.model(torch.tensor([ids], device="cuda"), logits_to_keep=1)

    def graphs(self):
        return None


def engine_for(name: str):
    if name == "neolm":
        return NeolmEngine(native=True)
    if name == "neolm-eager":
        return NeolmEngine(native=False)
    if name == "transformers":
        return TransformersEngine()
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise LookupError(f"not installed: {e}") from None
        raise LookupError("installed, but no vLLM engine is written here yet")
    raise SystemExit(f"unknown engine {name}")


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def measure(engine, folder: Path, precision: str, args) -> dict:
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    engine.load(folder, precision)
    sync()
    load_s = time.perf_counter() - t
    n, short = args.new_tokens, prompt_ids(args.prompt_len, 0)
    engine.steps([short], 4)  # warm-up: kernels, cuBLAS, the graph of this shape
    engine.prefill(prompt_ids(args.prefill_len, 9))
    single, ttft, prefill, batch = [], [], [], []
    for r in range(args.runs):
        times, tokens = engine.steps([short], n)
        ttft.append(times[0])
        single.append((n - 1) / (times[-1] - times[0]))
        sync()
        t = time.perf_counter()
        engine.prefill(prompt_ids(args.prefill_len, 100 + r))
        sync()
        prefill.append(args.prefill_len / (time.perf_counter() - t))
    prompts = [prompt_ids(args.prompt_len, 1000 + i) for i in range(args.batch)]
    engine.steps(prompts, 4)
    for _ in range(args.runs):
        times, _ = engine.steps(prompts, n)
        batch.append(args.batch * (n - 1) / (times[-1] - times[0]))
    row = {"decode_tps": summary(single), "ttft_ms": summary([1e3 * s for s in ttft]),
           "prefill_tps": summary(prefill), "batch_tps": summary(batch), "load_s": load_s,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "stream_bytes": module_stream_bytes(engine.model),
           "tokens": tokens, "graphs": engine.graphs()}  # fmt: skip
    return row


def fmt(cell: dict, digits: int = 0) -> str:
    return f"{cell['median']:.{digits}f} [{cell['min']:.{digits}f}–{cell['max']:.{digits}f}]"


def render(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# neolm on CUDA", "", "Generated by `bench/gpu.py` (raw numbers in `GPU.json` beside this file):", "",
             "```", doc["command"], "```", "",
             f"- GPU: {m['gpu']}, {m['gpu_memory_gib']:.0f} GiB; CUDA {m['cuda']} (torch's build); {m['cpu']}",
             f"- torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; neolm at commit {m['commit']}",
             f"- Read bandwidth (sum over 2 GiB of bf16): {doc['bandwidth_gbs']:.0f} GB/s at the start, "
             f"{doc['bandwidth_end_gbs']:.0f} at the end",
             f"- Each cell: median [min–max] of {doc['runs']} runs after a warm-up; rows run one after another in one "
             "process", "",
             "% roofline = decode tok/s ÷ (read bandwidth ÷ weight bytes a step reads: every matrix once, one row of "
             "each embedding table). greedy = ref: how many leading greedy tokens equal neolm fp32's (random "
             "weights give near-flat logits: lower precisions drift early).", ""]  # fmt: skip
    for model in doc["models"]:
        lines += [f"## {model}", "", "| engine | precision | decode tok/s | % roofline | TTFT ms | prefill-512 tok/s | "
                  "batch-8 tok/s | batch/single | load s | peak GiB | greedy = ref |", "|" + "---|" * 11]  # fmt: skip
        rows = [r for r in doc["rows"] if r["model"] == model]
        ref = next(
            (r["tokens"] for r in rows if r["engine"] == "neolm" and r["precision"] == "fp32" and "tokens" in r), None
        )
        for r in rows:
            head = f"| {r['engine']} | {r['precision']} |"
            if "error" in r:
                lines.append(f"{head} {r['error']} |" + " |" * 8)
                continue
            roof = r["decode_tps"]["median"] * r["stream_bytes"] / (doc["bandwidth_gbs"] * 1e9)
            same = (
                ""
                if ref is None
                else f"{next((i for i, (a, b) in enumerate(zip(ref, r['tokens'])) if a != b), len(ref))}/{len(ref)}"
            )
            lines.append(f"{head} {fmt(r['decode_tps'])} | {100 * roof:.0f}% | {fmt(r['ttft_ms'], 1)} | "
                         f"{fmt(r['prefill_tps'])} | {fmt(r['batch_tps'])} | "
                         f"{r['batch_tps']['median'] / r['decode_tps']['median']:.1f}× | {r['load_s']:.1f} | "
                         f"{r['peak_gib']:.2f} | {same} |")  # fmt: skip
        lines.append("")
    lines += [
        "## neolm / transformers",
        "",
        "| model | precision | decode | TTFT | prefill-512 | batch-8 |",
        "|---|---|---|---|---|---|",
    ]
    for model in doc["models"]:
        for precision in doc["precisions"]:
            ours = next(
                (
                    r
                    for r in doc["rows"]
                    if (r["model"], r["engine"], r["precision"]) == (model, "neolm", precision) and "error" not in r
                ),
                None,
            )
            peer = next(
                (
                    r
                    for r in doc["rows"]
                    if (r["model"], r["engine"], r["precision"]) == (model, "transformers", precision)
                    and "error" not in r
                ),
                None,
            )
            if ours and peer:
                ratio = [ours[k]["median"] / peer[k]["median"] for k in ("decode_tps",)]
                ratio.append(peer["ttft_ms"]["median"] / ours["ttft_ms"]["median"])
                ratio += [ours[k]["median"] / peer[k]["median"] for k in ("prefill_tps", "batch_tps")]
                lines.append(f"| {model} | {precision} | " + " | ".join(f"{x:.2f}×" for x in ratio) + " |")
    return "\n".join(lines) + "\n"


def machine() -> dict:
    import subprocess

    import transformers

    props = torch.cuda.get_device_properties(0)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30, "cuda": torch.version.cuda,
            "cpu": f"{cpu}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "commit": commit or "?"}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="pythia-160m,gpt-neo-125M,pythia-1.4b,gpt-neo-1.3B")
    p.add_argument("--engines", default="neolm,neolm-eager,transformers,vllm")
    p.add_argument("--precisions", default="fp32,bf16,int8,int4")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cache", default="/tmp/neolm-bench", help="where the random checkpoints are made and kept")
    p.add_argument("--out", default=str(HERE / "GPU.md"), help="the markdown table (the JSON goes beside it)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    doc = {"command": "python bench/gpu.py " + " ".join(sys.argv[1:]), "machine": machine(), "runs": args.runs,
           "models": args.models.split(","), "precisions": args.precisions.split(","), "rows": []}  # fmt: skip
    doc["bandwidth_gbs"] = read_bandwidth()
    out = Path(args.out)
    for model in doc["models"]:
        folder = Path(args.cache) / "models" / model / "hf"
        if not (folder / "config.json").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            make_checkpoint(model, str(folder))
        for precision in doc["precisions"]:
            for name in args.engines.split(","):
                row = {"model": model, "engine": name, "precision": precision}
                if name == "neolm-eager" and precision in QUANTIZED:
                    continue
                try:
                    row |= measure(engine_for(name), folder, precision, args)
                except LookupError as e:
                    row["error"] = str(e)
                except Exception as e:  # noqa: BLE001 (recorded in the table, the run goes on)
                    row["error"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                gc.collect()
                torch.cuda.empty_cache()
                doc["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
                doc["bandwidth_end_gbs"] = doc["bandwidth_gbs"]
                out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    doc["bandwidth_end_gbs"] = read_bandwidth()
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.write_text(render(doc))
    print(render(doc))


if __name__ == "__main__":
    main()
