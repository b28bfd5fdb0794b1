"""`neolm serve --speculative-config` against the same server without it, in one run.

    python bench/serve_speculative.py --model /tmp/neolm-bench/models/pythia-1.4b/hf --requests 4 --max-tokens 96 \\
        --config ngram='{"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 3}' \\
        --config draft='{"model": "/tmp/neolm-bench/models/pythia-1.4b/neolm-int8", "num_speculative_tokens": 4}' \\
        --threads 2 --rounds 2 --out bench/SPECULATIVE.md

Each row starts `neolm serve` (a fresh process) with one --config (LABEL=JSON; the row "off" has none), then:
- alone: --requests streamed greedy completions one after another (distinct prompts of --prompt-tokens common
  words, --max-tokens each, eos ignored through min_tokens): tokens per second over them, and the median gap
  between a stream's tokens (a round's tokens come together, so the gaps are uneven: the median is the rounds');
- together: the same requests from --clients clients at once, where speculation stands aside: tokens per second;
- the guesses made and kept (/metrics), and whether each reply's text equals the "off" row's.
--rounds repeats every row, alternating the order. Not a test.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
import urllib.request

from report import publish
from serve_load import complete, prompts, run_clients, start, stop, stream_events


def streamed(base: str, prompt: str, max_tokens: int) -> tuple[str, int, list[float]]:
    """One greedy streamed completion: its text, its tokens, and the gaps between its text's pieces (s)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0}
    text, tokens, times = "", 0, []
    for event in stream_events(f"{base}/completions", body):
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif event["choices"] and event["choices"][0]["text"]:
            text += event["choices"][0]["text"]
            times.append(time.perf_counter())
    return text, tokens, [b - a for a, b in itertools.pairwise(times)]


def counters(base: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base.removesuffix('/v1')}/metrics") as response:
        lines = response.read().decode().splitlines()
    return {line.split("{")[0].removeprefix("neolm:"): float(line.split()[-1]) for line in lines
            if line.startswith("neolm:spec_decode")}  # fmt: skip


def run(args, label: str, config: str | None) -> dict:
    args.load = ["--speculative-config", config] if config else []
    server, base = start(args, args.clients)
    try:
        complete(base, "Warm-up", 8)
        texts = prompts(args)[0]
        began, tokens, gaps, replies = time.perf_counter(), 0, [], []
        for prompt in texts:
            text, n, between = streamed(base, prompt, args.max_tokens)
            replies.append(text)
            tokens += n
            gaps.extend(between)
        alone = tokens / (time.perf_counter() - began)
        spec = counters(base)
        made = [0]

        def client(c: int) -> None:
            for prompt in texts:
                made[0] += complete(base, f"{prompt} ({c})", args.max_tokens)[1]

        together = None
        if args.clients > 1:
            wall = run_clients(args.clients, client)
            together = made[0] / wall
    finally:
        stop(server)
    return {"label": label, "alone_tok_s": alone, "itl_ms": 1e3 * statistics.median(gaps), "together_tok_s": together,
            "drafts": spec.get("spec_decode_num_drafts_total", 0), "guessed": spec.get("spec_decode_num_draft_tokens_total", 0),
            "kept": spec.get("spec_decode_num_accepted_tokens_total", 0), "replies": replies}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder or hub id (default: the bundled model)")
    p.add_argument("--config", action="append", default=[], metavar="LABEL=JSON",
                   help="a --speculative-config to compare with none (repeat for more rows)")  # fmt: skip
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--clients", type=int, default=2, help="clients at once in the 'together' measurement")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--prompt-tokens", default="32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="run every row this many times, alternating")
    p.add_argument("--out", help="append the table to this markdown file")
    args = p.parse_args()
    if args.model and os.path.exists(args.model):  # the servers may run in another directory
        args.model = os.path.abspath(args.model)
    rows = [("off", None)] + [tuple(c.split("=", 1)) for c in args.config]
    if any(len(r) != 2 for r in rows):
        raise SystemExit("--config takes LABEL=JSON")
    runs = []
    for round_ in range(args.rounds):
        for label, config in rows if round_ % 2 == 0 else rows[::-1]:
            runs.append(run(argparse.Namespace(**vars(args), load=[]), label, config))
            print({k: v for k, v in runs[-1].items() if k != "replies"}, file=sys.stderr)
    reference = next(r["replies"] for r in runs if r["label"] == "off")
    lines = [
        f"`python {' '.join(sys.argv)}`",
        "",
        (
            f"{platform.processor() or platform.machine()}, {args.threads} threads; {args.requests} greedy completions of "
            f"{args.max_tokens} tokens after {args.prompt_tokens}-token prompts, one at a time (alone) and from "
            f"{args.clients} clients at once (together); median [min-max] of {args.rounds} round(s)"
        ),
        "",
        (
            "| --speculative-config | alone tok/s | vs off | median gap between streamed tokens, ms | together tok/s "
            "| vs off | guesses kept / made (rounds) | replies = off's |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for label, config in rows:
        mine = [r for r in runs if r["label"] == label]

        def cell(key: str, mine=mine) -> tuple[str, float | None]:
            values = [r[key] for r in mine if r[key] is not None]
            if not values:
                return "", None
            mid = statistics.median(values)
            return f"{mid:.2f} [{min(values):.2f}–{max(values):.2f}]", mid

        alone, a = cell("alone_tok_s")
        together, t = cell("together_tok_s")
        base.setdefault("a", a)
        base.setdefault("t", t)
        last = mine[-1]
        same = sum(x == y for r in mine for x, y in zip(r["replies"], reference))
        lines.append(
            (
                f"| {label}{f' `{config}`' if config else ''} | {alone} | {a / base['a']:.2f}x | "
                f"{statistics.median(r['itl_ms'] for r in mine):.0f} | {together} | "
            )
            + (f"{t / base['t']:.2f}x" if t and base["t"] else "")
            + " | "
            + (f"{last['kept']:.0f} / {last['guessed']:.0f} ({last['drafts']:.0f})" if config else "")
            + f" | {same}/{len(reference) * len(mine)} |"
        )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
