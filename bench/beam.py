"""Beam search: neolm's generate(num_beams=...) against transformers' on the same checkpoint, in one run.

    python bench/beam.py --model /tmp/neolm-bench/models/pythia-160m/hf --beams 4 --prompt-tokens 32 \\
        --new-tokens 64 --rounds 3 --out bench/BEAM.md

Without --model, pythia-160m's shape is made with random weights (bench/prepare.py) under
/tmp/neolm-bench/models. Each round runs both engines once (the order alternates between rounds) on the same
prompt (--prompt-tokens random ids), greedy beam search with --beams beams and exactly --new-tokens new tokens
(eos blocked by min_new_tokens, so both search to the full length), fp32, --threads threads. Reported: the
seconds per generation (median [min-max] over the rounds), new tokens per second of the best hypothesis,
the ratio, and whether both returned the same hypotheses (all --beams of them, in order). CTranslate2 also has
beam search but its converter needs a transformers older than 5, and llama.cpp's was removed: not measured here.

With --groups G (> 1), diverse beam search (num_beam_groups G, --diversity-penalty): transformers 5 runs it only
from the hub (custom_generate="transformers-community/group-beam-search"), which is tried and reported as not run
when out of reach; neolm's diverse beam search is then timed against its own plain beam search with the same
beams, which tells what the groups cost. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from machine import describe  # (bench/: this script's folder is on sys.path)
from report import publish, spread

import neolm


def run_neolm(lm, prompt, kw) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = lm.generate_ids([prompt], **kw)
    return time.perf_counter() - start, out


def run_transformers(hf, prompt, kw) -> tuple[float, list[list[int]]]:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=hf.config.vocab_size, **kw)
    elapsed = time.perf_counter() - start
    return elapsed, [[t for t in row if t != hf.config.vocab_size] for row in out[:, len(prompt) :].tolist()]


def run_transformers_groups(hf, prompt, kw) -> tuple[float, list[list[int]]]:
    """transformers' diverse beam search, from the hub (it left transformers' own code in version 5)."""
    return run_transformers(hf, prompt, kw | {"custom_generate": "transformers-community/group-beam-search",
                                              "trust_remote_code": True})  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a checkpoint folder (default: pythia-160m's shape, random weights)")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--groups", type=int, default=1, help="> 1: diverse beam search with this many beam groups")
    p.add_argument("--diversity-penalty", type=float, default=1.0, help="diverse beam search's penalty")
    p.add_argument("--out", help="append the table to this markdown file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.model
    if folder is None:
        folder = "/tmp/neolm-bench/models/pythia-160m/hf"
        if not Path(folder).exists():
            import subprocess

            Path(folder).parent.mkdir(parents=True, exist_ok=True)
            prepare = [sys.executable, str(REPO / "bench" / "prepare.py"), "checkpoint", "pythia-160m", folder]
            subprocess.run(prepare, check=True)
    from transformers import AutoModelForCausalLM

    lm = neolm.load(folder, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.randint(0, 50000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    n = args.new_tokens
    kw = dict(num_beams=args.beams, num_return_sequences=args.beams, max_new_tokens=n, min_new_tokens=n,
              do_sample=False, repetition_penalty=1.0)  # fmt: skip
    peer, peer_name, not_run = run_transformers, "transformers", ""
    plain = kw
    if args.groups > 1:
        kw = kw | {"num_beam_groups": args.groups, "diversity_penalty": args.diversity_penalty}
        try:
            run_transformers_groups(hf, prompt[:8], kw | {"max_new_tokens": 2, "min_new_tokens": 2})
            peer = run_transformers_groups
        except Exception as e:  # (offline: the hub is out of reach)
            not_run = f"transformers: not run, its diverse beam search is on the hub ({type(e).__name__}: {e})"
            not_run = not_run.splitlines()[0][:300]
            peer, peer_name = lambda model, prompt, kw: run_neolm(model, prompt, plain), "neolm beam search"
            hf = lm
    run_neolm(lm, prompt[:8], kw | {"max_new_tokens": 4, "min_new_tokens": 4})  # warm-up (kernels, allocations)
    peer(hf, prompt[:8], kw | {"max_new_tokens": 4, "min_new_tokens": 4})
    first = "neolm" if args.groups == 1 else f"neolm diverse ({args.groups} groups)"
    times = {first: [], peer_name: []}
    same = True
    for r in range(args.rounds):
        order = [(first, run_neolm, lm), (peer_name, peer, hf)]
        outputs = {}
        for name, run, model in order if r % 2 == 0 else order[::-1]:
            seconds, outputs[name] = run(model, prompt, kw)
            times[name].append(seconds)
            print(f"round {r + 1}: {name} {seconds:.2f} s", file=sys.stderr)
        same &= outputs[first] == outputs[peer_name]

    machine = describe()
    ratio = statistics.median(t / s for s, t in zip(times[first], times[peer_name]))
    groups = f" --groups {args.groups} --diversity-penalty {args.diversity_penalty}" if args.groups > 1 else ""
    if peer_name == "transformers":
        verdict = f"same {args.beams} hypotheses in the same order: {'yes' if same else 'NO'}"
    else:  # (diverse beam search is meant to differ from plain beam search)
        verdict = f"{not_run}; the hypotheses differ from plain beam search's: {'no' if same else 'yes'}"
    lines = [
        f"`python bench/beam.py --model {folder} --beams {args.beams} --prompt-tokens {args.prompt_tokens} "
        f"--new-tokens {n} --rounds {args.rounds} --threads {args.threads}{groups}`",
        "",
        f"{machine['cpu']} ({machine['cpu_id']}; {machine['simd']}), torch {torch.__version__}, {args.threads} "
        "threads, fp32; "
        f"{Path(folder).parent.name}, {args.beams} beams, {args.prompt_tokens}-token prompt, {n} new tokens",
        "",
        "| engine | seconds per generation | new tokens/s (best hypothesis) |",
        "|---|---|---|",
        *(f"| {name} | {spread(xs)} | {n / statistics.median(xs):.1f} |" for name, xs in times.items()),
        "",
        f"{first} / {peer_name} speed: {ratio:.2f}x (median of the per-round ratios); {verdict}",
        "",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
