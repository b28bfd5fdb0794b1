"""Throughput of `neolm serve` under concurrent clients, with and without batching.

    python bench/serve_load.py --model /tmp/neolm-bench/models/pythia-160m/hf --clients 8 --requests 4 \\
        --max-tokens 64 --max-batch 1,8 --threads 2 --out bench/SERVE.md

For each --max-batch value (and --prefill-chunk value): start `neolm serve` (a fresh process, --port 0), send
--requests streamed completions from each of --clients threads at once (greedy, distinct prompts, --max-tokens
each, ignoring eos via min_tokens), and report generated tokens per second over the whole run, the median and
90th-percentile request latency, the median time to first token, and the gaps between a stream's tokens
(inter-token latency: median, 99th percentile, longest). --max-tokens LOW-HIGH gives each request a length
drawn between the two, --prompt-tokens LOW-HIGH a prompt of that many tokens (common one-token words; default a
short sentence); the same draws in every row.
--source LABEL=DIR,...: rows for each checkout of neolm (its folder put first on PYTHONPATH), e.g. to compare
two versions of the engine in one run; --rounds repeats every row, alternating. Not a test.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

WORDS = [" the", " of", " and", " to", " in", " a", " is", " that", " for", " it", " was", " on"]  # one token each


def start(args, max_batch: int, source: str | None = None, chunk: str | None = None) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "neolm.cli", "serve", "--port", "0", "--max-batch", str(max_batch),
               "--threads", str(args.threads)] + ([args.model] if args.model else []) + args.load  # fmt: skip
    if chunk:
        command += ["--prefill-chunk", chunk]
    env = dict(os.environ)
    if source:  # (python -m puts the working directory first on the path: run it there)
        env["PYTHONPATH"] = os.pathsep.join([source, *filter(None, [env.get("PYTHONPATH")])])
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=source)
    line = server.stderr.readline()
    match = re.search(r"on (http://\S+/v1)", line)
    if not match:
        server.kill()
        raise SystemExit(f"the server did not start: {line}{server.stderr.read()}")
    # drain its log, or a full pipe would stop the server at its next log line
    threading.Thread(target=lambda: collections.deque(server.stderr, maxlen=0), daemon=True).start()
    return server, match[1]


def stop(server: subprocess.Popen) -> None:
    """Stop a server as Ctrl-C does; terminate it where SIGINT is ignored (a shell's background job)."""
    server.send_signal(2)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.terminate()
        server.wait(timeout=30)


def stream_events(url: str, body: dict) -> Iterator[dict]:
    """POST `body` to `url` as a streamed request (usage included): the server-sent events' JSON objects."""
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=1200) as response:
        for line in response:
            if line.startswith(b"data: {"):
                yield json.loads(line[6:])


def complete(base: str, prompt: str, max_tokens: int) -> tuple[float, int, float, list[float]]:
    """Stream one completion: (seconds, tokens, seconds to the first token, gaps between tokens)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    times, tokens = [], 0
    for event in stream_events(f"{base}/completions", body):
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif event["choices"] and event["choices"][0]["text"]:
            times.append(time.perf_counter())
    return time.perf_counter() - start, tokens, times[0] - start, [b - a for a, b in itertools.pairwise(times)]


def lengths(args) -> list[list[int]]:
    """Each client's requests' max_tokens: --max-tokens, or draws from its LOW-HIGH range (seeded)."""
    low, _, high = args.max_tokens.partition("-")
    draw = random.Random(0)
    return [[draw.randint(int(low), int(high or low)) for _ in range(args.requests)] for _ in range(args.clients)]


def prompts(args) -> list[list[str]]:
    """Each client's requests' prompts: --prompt-tokens words (seeded draws), else a short sentence."""
    if not args.prompt_tokens:
        return [[f"Client {c} asks, request {r}:" for r in range(args.requests)] for c in range(args.clients)]
    low, _, high = args.prompt_tokens.partition("-")
    draw = random.Random(1)
    return [["".join(draw.choices(WORDS, k=draw.randint(int(low), int(high or low)))) for _ in range(args.requests)]
            for _ in range(args.clients)]  # fmt: skip


def run_clients(clients: int, client) -> float:
    """client(0) .. client(clients - 1), each in a thread of its own, all at once: the seconds until all end."""
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - began


def run(args, max_batch: int, label: str, source: str | None, chunk: str | None) -> dict:
    server, base = start(args, max_batch, source, chunk)
    try:
        complete(base, "Warm-up", 8)
        latencies, tokens, firsts, gaps = [], [], [], []
        plan, texts = lengths(args), prompts(args)

        def client(c: int) -> None:
            for r in range(args.requests):
                seconds, n, first, between = complete(base, texts[c][r], plan[c][r])
                latencies.append(seconds)
                tokens.append(n)
                firsts.append(first)
                gaps.extend(between)

        wall = run_clients(args.clients, client)
        with urllib.request.urlopen(f"{base.removesuffix('/v1')}/health") as response:
            health = json.loads(response.read())
    finally:
        stop(server)
    return {"source": label, "max_batch": max_batch, "chunk": chunk, "tok_s": sum(tokens) / wall, "wall_s": wall,
            "latency_s": statistics.median(latencies), "p90_s": statistics.quantiles(latencies, n=10)[-1],
            "ttft_s": statistics.median(firsts), "itl_ms": 1e3 * statistics.median(gaps),
            "itl_p99_ms": 1e3 * statistics.quantiles(gaps, n=100, method="inclusive")[-1], "itl_max_ms": 1e3 * max(gaps),
            "batches": health["batches"],
            "largest_batch_requests": health["largest_batch_requests"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder or hub id (default: the bundled model)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--max-tokens", default="64", help="tokens per request: N, or LOW-HIGH for a random length each")
    p.add_argument("--max-batch", default="1,8", help="comma-separated values to compare")
    p.add_argument("--prompt-tokens", help="prompt length in tokens: N, or LOW-HIGH (default: a short sentence)")
    p.add_argument("--prefill-chunk", help="comma-separated `neolm serve --prefill-chunk` values to compare")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--source", help="LABEL=DIR,...: a row per neolm checkout (default: the installed neolm)")
    p.add_argument("--rounds", type=int, default=1, help="run every row this many times, alternating")
    p.add_argument(
        "--load", nargs=argparse.REMAINDER, default=[], help="more `neolm serve` options, e.g. --quantize int8"
    )
    p.add_argument("--out", help="append the table to this markdown file")
    args = p.parse_args()
    if args.model and os.path.exists(args.model):  # the servers may run in another directory
        args.model = os.path.abspath(args.model)
    sources = [tuple(item.split("=", 1)) for item in args.source.split(",")] if args.source else [("", None)]
    chunks = args.prefill_chunk.split(",") if args.prefill_chunk else [None]
    plan = [(source, int(b), c) for source in sources for b in args.max_batch.split(",") for c in chunks]
    runs = []
    for round_ in range(args.rounds):
        for (label, folder), max_batch, chunk in plan if round_ % 2 == 0 else plan[::-1]:
            runs.append(run(args, max_batch, label, folder, chunk))
            print(runs[-1], file=sys.stderr)
    rows = []
    for (label, _), max_batch, chunk in plan:  # the median of each row's rounds
        mine = [r for r in runs if (r["source"], r["max_batch"], r["chunk"]) == (label, max_batch, chunk)]
        rows.append({key: statistics.median(r[key] for r in mine) if isinstance(mine[0][key], float) else mine[0][key]
                     for key in mine[0]} | {"range": [min(r["tok_s"] for r in mine), max(r["tok_s"] for r in mine)]})  # fmt: skip
    base = rows[0]["tok_s"]
    lines = [
        f"`python {' '.join(sys.argv)}`",
        "",
        (
            f"{platform.processor() or platform.machine()}, {args.threads} threads; {args.clients} clients x "
            f"{args.requests} requests of {args.max_tokens} greedy tokens, prompts of "
            f"{args.prompt_tokens or 'a few'} tokens; median of {args.rounds} round(s)"
        ),
        "",
        (
            "| source | --max-batch | --prefill-chunk | tokens/s [min-max] | vs first row | median latency, s | p90 "
            "latency, s | median TTFT, s | ITL median / p99 / max, ms | prompt forwards | most requests at once |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ] + [f"| {r['source'] or 'installed'} | {r['max_batch']} | {r['chunk'] or 'default'} | {r['tok_s']:.1f} "
         f"[{r['range'][0]:.0f}-{r['range'][1]:.0f}] | {r['tok_s'] / base:.2f}x | {r['latency_s']:.2f} | "
         f"{r['p90_s']:.2f} | {r['ttft_s']:.2f} | {r['itl_ms']:.0f} / {r['itl_p99_ms']:.0f} / {r['itl_max_ms']:.0f} | "
         f"{r['batches']} | {r['largest_batch_requests']} |" for r in rows]  # fmt: skip
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
