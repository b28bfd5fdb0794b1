"""`neolm serve` under clients that hold multi-turn chats, with and without its prefix cache.

    python bench/serve_chat.py --model /tmp/neolm-bench/models/pythia-160m/hf --clients 4 --turns 6 \\
        --message-tokens 48 --reply-tokens 32 --prefix-cache 0,256 --rounds 2 --out bench/SERVE.md

For each --prefix-cache value (MB; 0: off), and each --source tree (LABEL=DIR, to compare versions of neolm in
one run; default: the installed one): start `neolm serve` (a fresh process), and let --clients threads each hold
a chat of --turns turns at once (client c starting c x --stagger seconds after the first) through
/v1/chat/completions, streamed: every turn resends the conversation (after a system message of --system-tokens
tokens that all clients share, if any, and that a warm-up chat sent before them) with a new user message of
--message-tokens tokens (common one-token words), --think seconds after the last reply, and gets a greedy reply
of exactly --reply-tokens tokens. Reported: generated tokens per second over the run, the median time to a
reply's first token (all turns, and the first and last turns'), and the prompt tokens the cache supplied
(usage's prompt_tokens_details.cached_tokens) against all prompt tokens. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

from report import publish
from serve_load import WORDS, run_clients, start, stop, stream_events


def turn(base: str, messages: list[dict], tokens: int) -> tuple[str, float, int, int]:
    """One streamed chat completion: (reply, seconds to its first token, prompt tokens, cached prompt tokens)."""
    body = {"messages": messages, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}
    began, first, reply, usage = time.perf_counter(), None, "", {}
    for event in stream_events(f"{base}/chat/completions", body):
        if event.get("usage"):
            usage = event["usage"]
        elif event["choices"] and event["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter() - began
            reply += event["choices"][0]["delta"]["content"]
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return reply, first or 0.0, usage["prompt_tokens"], cached


def run(args, mb: str, label: str, source: str | None) -> dict:
    args.load = [*args.extra, "--prefix-cache", mb]
    server, base = start(args, args.max_batch, source)
    try:
        draw = random.Random(0)
        system = "".join(draw.choices(WORDS, k=args.system_tokens)).strip()
        opening = [{"role": "system", "content": system}] if system else []
        turn(base, [*opening, {"role": "user", "content": "Warm-up"}], 8)  # (a chat before the clients' chats)
        texts = [["".join(draw.choices(WORDS, k=args.message_tokens)).strip() for _ in range(args.turns)]
                 for _ in range(args.clients)]  # fmt: skip
        firsts, starts, lasts, prompt, cached = [], [], [], [0], [0]

        def client(c: int) -> None:
            time.sleep(c * args.stagger)
            messages = list(opening)
            for t in range(args.turns):
                time.sleep(args.think if t else 0)
                messages.append({"role": "user", "content": texts[c][t]})
                reply, first, n, hit = turn(base, messages, args.reply_tokens)
                messages.append({"role": "assistant", "content": reply})
                firsts.append(first)
                if t == 0:
                    starts.append(first)
                if t == args.turns - 1:
                    lasts.append(first)
                prompt[0] += n
                cached[0] += hit

        wall = run_clients(args.clients, client)
    finally:
        stop(server)
    generated = args.clients * args.turns * args.reply_tokens
    return {"label": label, "prefix_cache": mb, "tok_s": generated / wall, "wall_s": wall,
            "ttft_s": statistics.median(firsts), "first_ttft_s": statistics.median(starts),
            "last_ttft_s": statistics.median(lasts), "prompt": prompt[0], "cached": cached[0]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder or hub id (default: the bundled model)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--message-tokens", type=int, default=48)
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--system-tokens", type=int, default=0, help="a system message of this many tokens, the same "
                   "for every client (0: none)")  # fmt: skip
    p.add_argument("--stagger", type=float, default=0.0, help="client c starts its chat c times this many seconds "
                   "after the first (0: all at once)")  # fmt: skip
    p.add_argument("--think", type=float, default=0.0, help="seconds a client waits between a reply and its next "
                   "message (a person reading and typing)")  # fmt: skip
    p.add_argument("--source", action="append", default=[], metavar="LABEL=DIR",
                   help="a neolm source tree to serve from (repeat to compare; default: the installed neolm)")
    p.add_argument("--prefix-cache", default="0,256", help="comma-separated `neolm serve --prefix-cache` values (MB)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="run every row this many times, alternating")
    p.add_argument("--out", help="append the table to this markdown file")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more `neolm serve` options after --")
    args = p.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    if args.model and os.path.exists(args.model):  # the servers may run in another directory
        args.model = os.path.abspath(args.model)
    sources = [tuple(s.split("=", 1)) for s in args.source] or [("", None)]
    if any(len(s) != 2 for s in sources):
        raise SystemExit("--source takes LABEL=DIR")
    sources = [(label, os.path.abspath(path) if path else None) for label, path in sources]
    rows = [(f"{label} {mb}".strip(), mb, path) for label, path in sources for mb in args.prefix_cache.split(",")]
    runs = []
    for round_ in range(args.rounds):
        for label, mb, path in rows if round_ % 2 == 0 else rows[::-1]:
            runs.append(run(args, mb, label, path))
            print(runs[-1], file=sys.stderr)
    lines = [
        f"`python {' '.join(sys.argv)}`",
        "",
        (
            f"{platform.processor() or platform.machine()}, {args.threads} threads; {args.clients} clients x "
            f"{args.turns} turns of {args.message_tokens}-token messages"
            + (f" after a shared {args.system_tokens}-token system message" if args.system_tokens else "")
            + f" and {args.reply_tokens}-token greedy replies"
            + (f", client c starting {args.stagger:g} s x c after the first" if args.stagger else "")
            + (f", {args.think:g} s between a reply and the next message" if args.think else "")
            + f"; median of {args.rounds} round(s)"
        ),
        "",
        (
            "| source, --prefix-cache MB | tokens/s [min-max] | vs first row | median TTFT, s | first turn's TTFT, s "
            "| last turn's TTFT, s | prompt tokens cached |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    base = None
    for label, _, _ in rows:
        mine = [r for r in runs if r["label"] == label]
        tok_s = statistics.median(r["tok_s"] for r in mine)
        base = base or tok_s
        lines.append(
            f"| {label} | {tok_s:.1f} [{min(r['tok_s'] for r in mine):.1f}-{max(r['tok_s'] for r in mine):.1f}] | "
            f"{tok_s / base:.2f}x | {statistics.median(r['ttft_s'] for r in mine):.3f} | "
            f"{statistics.median(r['first_ttft_s'] for r in mine):.3f} | "
            f"{statistics.median(r['last_ttft_s'] for r in mine):.3f} | {mine[0]['cached']} of {mine[0]['prompt']} |"
        )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
