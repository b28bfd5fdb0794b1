"""Peak memory and time of reading a long prompt, whole or in chunks (prefill_chunk_size), neolm against
transformers' own prefill_chunk_size, in one run.

    python bench/prefill_memory.py --model /tmp/neolm-bench/models/pythia-160m/hf --prompt-tokens 2040 \\
        --chunks 0,512,128 --out bench/PREFILL_MEMORY.md

Each measurement runs in a fresh process: load the checkpoint (fp32, --threads threads), generate once from a
short prompt (warm-up), reset the process's peak RSS (/proc/self/clear_refs), then generate one new token, greedy,
from a prompt of --prompt-tokens random ids, with prefill_chunk_size (0: the whole prompt in one forward). Reported
per engine and chunk size: the growth of peak RSS over the RSS before that generation (the memory the prompt's
reading needs beyond the weights: the KV cache, and the activations that chunks make smaller), the seconds it took, and whether its token is the one-forward token. Without
--model, the preset's shape is made with random weights (bench/prepare.py). Not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from machine import describe  # (bench/: this script's folder is on sys.path)
from report import publish

PROBE = r"""
import json, sys, time, torch
engine, folder, tokens, chunk, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)

def rss(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024

prompt = torch.randint(100, 50000, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
kw = {"prefill_chunk_size": chunk} if chunk else {}
if engine == "neolm":
    import neolm
    lm = neolm.load(folder, dtype="float32")
    def run(ids, **extra):
        return lm.generate_ids([ids], max_new_tokens=1, do_sample=False, **extra)[0]
else:
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    def run(ids, **extra):
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False,
                              pad_token_id=0, **extra)
        return out[0, len(ids):].tolist()
run(prompt[:16])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the RSS now
before = rss("VmRSS:")
start = time.perf_counter()
token = run(prompt, **kw)
seconds = time.perf_counter() - start
print(json.dumps({"growth": rss("VmHWM:") - before, "seconds": seconds, "token": token}))
"""


def measure(engine: str, folder: str, tokens: int, chunk: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, engine, folder, str(tokens), str(chunk), str(threads)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Hugging Face checkpoint folder (default: --preset's shape, random weights)")
    p.add_argument("--preset", default="pythia-160m")
    p.add_argument("--prompt-tokens", type=int, default=2040)
    p.add_argument("--chunks", default="0,512,128", help="prefill_chunk_size values, 0: the whole prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="neolm,transformers")
    p.add_argument("--out", help="append the markdown result to this file")
    args = p.parse_args()
    folder = args.model
    if folder is None:
        folder = f"/tmp/neolm-bench/models/{args.preset}/hf"
        if not Path(folder).exists():
            Path(folder).parent.mkdir(parents=True, exist_ok=True)
            prepare = [sys.executable, str(REPO / "bench" / "prepare.py"), "checkpoint", args.preset, folder]
            subprocess.run(prepare, check=True)
    chunks = [int(c) for c in args.chunks.split(",")]
    rows, first = [], {}
    for engine in args.engines.split(","):
        for chunk in chunks:
            r = measure(engine, folder, args.prompt_tokens, chunk, args.threads)
            print(engine, chunk, r, file=sys.stderr)
            first.setdefault(engine, r.get("token"))
            rows.append((engine, chunk, r))
    mib, m = 2**20, describe()
    config = json.loads((Path(folder) / "config.json").read_text())
    kv = config["num_layers" if "num_layers" in config else "num_hidden_layers"] * 2 * (args.prompt_tokens + 1) * (
        config["hidden_size"]) * 4  # fmt: skip
    lines = [
        f"\n## {Path(folder).parent.name if Path(folder).name == 'hf' else Path(folder).name}: a "
        f"{args.prompt_tokens}-token prompt, fp32, {args.threads} threads\n",
        f"`python bench/prefill_memory.py --model {folder} --prompt-tokens {args.prompt_tokens} --chunks "
        f"{args.chunks} --threads {args.threads}`\n",
        f"Machine: {m['cpu']} ({m['cpu_id']}; {m['simd']}), torch {m.get('torch')}, transformers "
        f"{m.get('transformers')}, neolm {m['neolm_commit']}\n",
        f"The KV cache of the prompt and the new token takes {kv / mib:.0f} MiB of each growth (fp32).\n",
        "| engine | prefill_chunk_size | peak RSS growth | growth less the KV cache | seconds | token as one forward's |",
        "|---|---|---|---|---|---|",
    ]
    for engine, chunk, r in rows:
        if "error" in r:
            lines.append(f"| {engine} | {chunk or 'whole'} | not run: {r['error']} | | | |")
            continue
        same = "yes" if r["token"] == first[engine] else "no"
        lines.append(f"| {engine} | {chunk or 'whole'} | {r['growth'] / mib:.0f} MiB | {(r['growth'] - kv) / mib:.0f} MiB "
                     f"| {r['seconds']:.2f} | {same} |")  # fmt: skip
    publish(lines, args.out)


if __name__ == "__main__":
    main()
