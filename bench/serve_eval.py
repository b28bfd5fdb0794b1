"""lm-evaluation-harness through `neolm serve` (its `local-completions` backend) against `neolm eval`.

    python bench/serve_eval.py --data-dir ../shared/data/eval --tasks lambada_openai --limit 500 \\
        --concurrent 1,4 --threads 2 --out bench/SERVE.md

First `neolm eval` (the harness with neolm's own backend, one process), then for each --concurrent value a fresh
`neolm serve` process and the harness's `local-completions` model sending that many requests at a time, the
tokenizer read from the server. Reports each run's metrics (they should agree: same model, same scoring) and
its wall time for the evaluation, model loading left out. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from serve_load import start, stop  # bench/serve_load.py, beside this script


def direct(args, out: Path) -> dict:
    command = [sys.executable, "-m", "neolm.cli", "eval", args.model or "default", "--tasks", args.tasks,
               "--data-dir", args.data_dir, "--limit", str(args.limit), "--threads", str(args.threads),
               "--bootstrap-iters", "0", "--output", str(out)] + args.load  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    results = json.loads(out.read_text())
    return {"how": "neolm eval", "seconds": results["neolm"]["wall_seconds"], "results": results["results"]}


def served(args, concurrent: int) -> dict:
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from neolm.eval import tasks

    server, base = start(args, max_batch=8)
    try:
        model = LocalCompletionsAPI(base_url=f"{base}/completions", model=server_name(base),
                                    num_concurrent=concurrent, max_retries=1)  # fmt: skip
        manager = tasks.task_manager()
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
            loaded = manager.load(tasks.build(args.tasks.split(","), args.data_dir, None, Path(tmp), manager=manager))
            began = time.perf_counter()
            results = lm_eval.simple_evaluate(model=model, tasks=list(loaded["tasks"].values()), task_manager=manager,
                                              limit=args.limit, bootstrap_iters=0, log_samples=False)  # fmt: skip
            seconds = time.perf_counter() - began
    finally:
        stop(server)
    return {"how": f"neolm serve + local-completions, num_concurrent={concurrent}", "seconds": seconds,
            "results": results["results"]}  # fmt: skip


def server_name(base: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{base}/models") as response:
        return json.loads(response.read())["data"][0]["id"]


def metrics(results: dict) -> str:
    out = []
    for task, values in sorted(results.items()):
        for key, value in sorted(values.items()):
            if isinstance(value, float) and "stderr" not in key:
                out.append(f"{task} {key.split(',')[0]} {value:.4f}")
    return "; ".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder or hub id (default: the bundled model)")
    p.add_argument("--data-dir", required=True, help="folder of <task>_<split>.jsonl files (../shared/data/eval)")
    p.add_argument("--tasks", default="lambada_openai")
    p.add_argument("--limit", type=int, default=500, help="documents per task")
    p.add_argument("--concurrent", default="1,4", help="comma-separated num_concurrent values for the server runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="append the table to this markdown file")
    p.add_argument(
        "--load", nargs=argparse.REMAINDER, default=[], help="loading options for both (e.g. --quantize int8)"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [direct(args, Path(tmp) / "direct.json")]
    rows += [served(args, int(c)) for c in args.concurrent.split(",")]
    lines = [
        f"`python {' '.join(sys.argv)}`",
        "",
        f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}; {args.tasks}, first {args.limit} "
        "documents; evaluation time only (model loading left out)",
        "",
        "| how | seconds | vs neolm eval | metrics |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['how']} | {row['seconds']:.1f} | {row['seconds'] / rows[0]['seconds']:.2f}x | "
                     f"{metrics(row['results'])} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
