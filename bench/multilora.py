"""LoRA adapters held unmerged (neolm.multilora): what decoding with them costs, against the base model.

    python bench/multilora.py --model /tmp/neolm-bench/models/pythia-160m/hf --adapters 4 --rank 16 \\
        --rounds 3 --out bench/LORA.md

Random LoRA adapters of --rank on all four linear layers of every block, written in PEFT's format
(neolm.adapter.write_lora_adapter) and loaded with LanguageModel.load_adapter. Rows, each a DecodeBatch of
--batch sequences (32-token prompts, --new-tokens greedy tokens, eos blocked), as the server runs them: decode
tokens/s over all sequences after the first step. "no adapter": the model without any held; "held, unused":
--adapters held, every row on the base model (the native decode step still runs); "one adapter": every row
with the first; "mixed": the rows spread over all --adapters (one per-row masked product per layer); and the
same for one sequence. Each round runs every row once (order reversed every other round); median [min-max]
and the ratio to "no adapter". Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from machine import describe  # (bench/: this script's folder is on sys.path)
from report import publish, spread

import neolm
from neolm.adapter import write_lora_adapter
from neolm.generate import DecodeBatch
from neolm.multilora import LAYERS


def make_adapter(lm, folder: Path, rank: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, block in enumerate(lm.model.blocks):
        for parent, attr in LAYERS:
            layer = getattr(getattr(block, parent), attr)
            key = f"blocks.{i}.{parent}.{attr}"
            state[key + ".lora_a"] = torch.randn(rank, layer.in_features, generator=g) / layer.in_features**0.5
            state[key + ".lora_b"] = torch.randn(layer.out_features, rank, generator=g) * 0.01
    write_lora_adapter(state, lm.config, folder, rank, 2.0 * rank, 0.0, None)


def decode_rate(lm, prompts, adapters: list[int], new_tokens: int) -> float:
    """Decode tokens/s of one DecodeBatch: prompt i with adapter adapters[i] (each adapter's prompts read together)."""
    gc = lm.generation_config(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              repetition_penalty=1.0)  # fmt: skip
    batch = DecodeBatch(lm.model, adapters=lm.adapter_set)
    for adapter in sorted(set(adapters)):
        prefill = batch.prefill([p for p, a in zip(prompts, adapters) if a == adapter], gc, adapter=adapter)
        prefill.read(lm.model)
        batch.join(prefill)
    batch.step()
    start, made = time.perf_counter(), 0
    while not batch.finished:
        made += sum(t is not None for t in batch.step().tokens)
    return made / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/neolm-bench/models/pythia-160m/hf")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="append the table to this markdown file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    plain = neolm.load(args.model, dtype="float32")
    lm = neolm.load(args.model, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.adapters):
            make_adapter(lm, Path(tmp) / f"a{k}", args.rank, seed=k)
            lm.load_adapter(Path(tmp) / f"a{k}")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50000, (32,), generator=g).tolist() for _ in range(args.batch)]
    spread_rows = [1 + i % args.adapters for i in range(args.batch)]
    rows = {
        f"no adapter, batch {args.batch}": (plain, prompts, [0] * args.batch),
        f"{args.adapters} held, unused, batch {args.batch}": (lm, prompts, [0] * args.batch),
        f"one adapter, batch {args.batch}": (lm, prompts, [1] * args.batch),
        f"mixed: {args.adapters} adapters, batch {args.batch}": (lm, prompts, spread_rows),
        "no adapter, 1 sequence": (plain, prompts[:1], [0]),
        "one adapter, 1 sequence": (lm, prompts[:1], [1]),
    }
    for model, ps, adapters in rows.values():  # warm-up
        decode_rate(model, ps, adapters, 4)
    rates: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(args.rounds):
        for name in list(rows) if r % 2 == 0 else list(rows)[::-1]:
            rates[name].append(decode_rate(*rows[name], args.new_tokens))
            print(f"round {r + 1}: {name} {rates[name][-1]:.1f} tok/s", file=sys.stderr)

    def base_of(name: str) -> str:
        return next(n for n in rows if n.startswith("no adapter") and n.split(", ")[-1] == name.split(", ")[-1])

    machine = describe()
    lines = [
        (f"`python bench/multilora.py --model {args.model} --adapters {args.adapters} --rank {args.rank} --batch "
         f"{args.batch} --new-tokens {args.new_tokens} --rounds {args.rounds} --threads {args.threads}`"),
        "",
        (f"{machine['cpu']} ({machine['cpu_id']}; {machine['simd']}), torch {torch.__version__}, {args.threads} "
         f"threads, fp32; {Path(args.model).parent.name}, rank-{args.rank} adapters on every block's four linear "
         f"layers, 32-token prompts, {args.new_tokens} greedy tokens"),
        "",
        "| rows | decode tokens/s | vs no adapter |",
        "|---|---|---|",
        *(f"| {name} | {spread(xs, '{:.1f}')} | {statistics.median(x / b for x, b in zip(xs, rates[base_of(name)])):.2f}x |"
          for name, xs in rates.items()),
        "",
    ]  # fmt: skip
    publish(lines, args.out)


if __name__ == "__main__":
    main()
