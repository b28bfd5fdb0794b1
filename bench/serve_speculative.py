"""`neolm serve --speculative-config` against the same server without it, in one run.

    python bench/serve_speculative.py --model /tmp/neolm-bench/models/pythia-1.4b/hf --requests 4 --max-tokens 96 \\
        --config ngram='{"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 3}' \\
        --config draft='{"model": "/tmp/neolm-bench/models/pythia-1.4b/neolm-int8", "num_speculative_tokens": 4}' \\
        --threads 2 --rounds 2 --out bench/SPECULATIVE.md

Each row starts `neolm serve` (a fresh process) with one --config (LABEL=JSON; the row "off" has none), then:
- alone: --requests streamed greedy completions one after another (distinct prompts of --prompt-tokens common
  words, --max-tokens each, eos ignored through min_tokens): tokens per second over them;
- together: the same requests from --clients clients at once, where speculation stands aside: tokens per second;
- the guesses made and kept (/metrics), and whether each reply's text equals the "off" row's.
--rounds repeats every row, alternating the order. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import urllib.request

from report import publish
from serve_load import complete, prompts, run_clients, start, stop, stream_events


def streamed(base: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """One greedy streamed completion: its text and its tokens."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0}
    text, tokens = "", 0
    for event in stream_events(f"{base}/completions", body):
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif event["choices"]:
            text += event["choices"][0]["text"]
    return text, tokens


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
        began, tokens, replies = time.perf_counter(), 0, []
        for prompt in texts:
            text, n = streamed(base, prompt, args.max_tokens)
            replies.append(text)
            tokens += n
        alone = tokens / (time.perf_counter() - began)
        spec = counters(base)
        made: list[int] = []  # (appended to by the clients' threads)

        def client(c: int) -> None:
            for prompt in texts:
                made.append(complete(base, f"{prompt} ({c})", args.max_tokens)[1])

        together = None
        if args.clients > 1:
            wall = run_clients(args.clients, client)
            together = sum(made) / wall
    finally:
        stop(server)
    return {"label": label, "alone_tok_s": alone, "together_tok_s": together,
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
            runs.append(run(argparse.Namespace(**vars(args), load=[]), label, config) | {"round": round_})
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
            "| --speculative-config | alone tok/s | vs off | together tok/s | vs off | guesses kept / made (rounds) "
            "| replies = off's |"
        ),
        "|---|---|---|---|---|---|---|",
    ]

    def versus(mine: list[dict], key: str) -> str:  # the median [min-max] of the per-round ratios to "off"
        ratios = [r[key] / o[key] for r in mine for o in runs if o["label"] == "off" and o["round"] == r["round"]
                  and r[key] and o[key]]  # fmt: skip
        return f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}–{max(ratios):.2f}]" if ratios else ""

    for label, config in rows:
        mine = [r for r in runs if r["label"] == label]

        def cell(key: str, mine=mine) -> str:
            values = [r[key] for r in mine if r[key] is not None]
            return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]" if values else ""

        last = mine[-1]
        same = sum(x == y for r in mine for x, y in zip(r["replies"], reference))
        lines.append(
            f"| {label}{f' `{config}`' if config else ''} | {cell('alone_tok_s')} | {versus(mine, 'alone_tok_s')} | "
            f"{cell('together_tok_s')} | {versus(mine, 'together_tok_s')}"
            + " | "
            + (f"{last['kept']:.0f} / {last['guessed']:.0f} ({last['drafts']:.0f})" if config else "")
            + f" | {same}/{len(reference) * len(mine)} |"
        )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
