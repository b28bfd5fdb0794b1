"""Two or more engines' single-stream decode, alternated run by run, each in its own process loaded once.

    python bench/duel.py --model pythia-1.4b --precision fp32 --engines neolm,llamacpp --pairs 10 \\
        [--out bench/results/DUEL.md]

bench.py runs each engine × model × precision in a process of its own, one after the other, so the two rows
of a paired ratio lie a minute or more apart; this VM's memory bandwidth can change by 2x within that time
(bench/README.md), and a memory-bound figure such as single-stream decoding changes with it. Here both engines
load once (their own interpreters and quantized files, as in bench.py: run bench.py for the model and
precision first), warm up, and then decode the same 32-token prompt for 128 tokens in turn, A B B A A B ...,
each waiting idle while the other runs; each pair of runs lies seconds apart. The ratio of a pair is A's rate
over B's; the result is the median [min-max] of the pairs' ratios. Engines: neolm, neolm:compile, neolm:hp,
transformers, transformers:eager, ctranslate2, llamacpp (the bench's variants). With more than two engines
(--engines neolm,neolm:hp,llamacpp), each round runs them all, in order and then reversed, and each engine's
ratios are over the last one's rate in the same round: one row per engine before it. `neolm@TREE` runs the neolm
of another checkout (e.g. `git worktree add /tmp/old HEAD~1`): a change measured against what it changes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from report import spread  # (this folder is on sys.path: the script's own)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODELS = Path("/tmp/neolm-bench/models")


def python_for(engine: str, args) -> str:
    """The interpreter bench.py would use: this one if it has the engine's package, else the peer's venv."""
    module = {"ctranslate2": "ctranslate2", "llamacpp": "llama_cpp"}.get(engine)
    if module is None:
        return sys.executable
    for python in (sys.executable, args.ct2_python if engine == "ctranslate2" else args.llama_python):
        if subprocess.run([python, "-c", f"import {module}"], capture_output=True, check=False).returncode == 0:
            return python
    raise SystemExit(f"{engine}: not installed (see bench/README.md, Installing the peers)")


def commit_of(tree: Path) -> str:
    """The checkout's commit, with "+" where its tracked files differ from it (a change not yet committed)."""

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", "-C", str(tree), *cmd], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")


class Contender:
    def __init__(self, spec: str, args):
        self.name = spec
        spec, _, tree = spec.partition("@")
        engine, _, variant = spec.partition(":")
        if tree and not (Path(tree) / "neolm" / "__init__.py").is_file():
            raise SystemExit(f"{self.name}: {tree} is not a neolm checkout")
        self.commit = commit_of(Path(tree) if tree else REPO)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   TRANSFORMERS_VERBOSITY="error", PYTHONPATH=tree or str(REPO))  # fmt: skip
        cmd = [python_for(engine, args), str(HERE / "engines" / "worker.py"), "--serve", "--engine", engine,
               "--variant", variant, "--model-dir", str(MODELS / args.model / "hf"), "--precision", args.precision,
               "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=HERE / "engines")  # fmt: skip
        ready = self._answer()
        if not ready.get("ready"):
            raise SystemExit(f"{spec}: did not start ({ready})")
        self.rates: list[float] = []

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name}: the worker ended (exit code {self.proc.wait()}); its stderr is above")
        return json.loads(line)

    def run(self) -> float:
        self.proc.stdin.write("single\n")
        self.proc.stdin.flush()
        rate = self._answer()["decode_tps"]
        self.rates.append(rate)
        return rate

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a shape bench.py prepared, e.g. pythia-1.4b")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--engines", default="neolm,llamacpp", help="A,B[,...]: the ratios are each over the last one")
    p.add_argument("--pairs", type=int, default=10, help="rounds (each runs every engine once)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--llama-python", default="/tmp/neolm-bench/llama-venv/bin/python")
    p.add_argument("--ct2-python", default="/tmp/neolm-bench/ct2-venv/bin/python")
    p.add_argument("--out", help="append the result (markdown) to this file, and its JSON beside it")
    args = p.parse_args()
    specs = args.engines.split(",")
    if len(specs) < 2:
        raise SystemExit("--engines needs two engines or more, separated by commas")
    started = time.time()
    contenders = [Contender(spec, args) for spec in specs]
    *others, base = contenders
    ratios: dict[str, list[float]] = {c.name: [] for c in others}
    try:
        for i in range(args.pairs):
            for c in contenders if i % 2 == 0 else contenders[::-1]:  # A B, B A, ...: a drift favours none
                c.run()
            for c in others:
                ratios[c.name].append(c.rates[-1] / base.rates[-1])
            rates = ", ".join(f"{c.name} {c.rates[-1]:.1f}" for c in contenders)
            print(f"round {i + 1}/{args.pairs}: {rates} tok/s; ratios "
                  + ", ".join(f"{r[-1]:.2f}" for r in ratios.values()), flush=True)  # fmt: skip
    finally:
        for c in contenders:
            c.close()
    commit = commit_of(REPO)  # each row's: its A's and B's where they differ
    rows = [(f"| {args.model} | {args.precision} | {c.name} / {base.name} | {spread(ratios[c.name])} | "
             f"{spread(c.rates, '{:.1f}')} | {spread(base.rates, '{:.1f}')} | {args.pairs} | "
             f"{c.commit if c.commit == base.commit else f'{c.commit} / {base.commit}'} |")
            for c in others]  # fmt: skip
    print("\n| model | precision | A / B | ratio, median [min–max] of the pairs | A tok/s | B tok/s | pairs | commit |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.out:
        out = Path(args.out)
        if not out.exists():
            out.write_text(
                "# Single-stream decode, engines alternated run by run (`bench/duel.py`)\n\n"
                f"{__doc__.split(chr(10) + chr(10))[1]}\n\n"
                "| model | precision | A / B | ratio, median [min–max] of the pairs | A tok/s | B tok/s | pairs | commit |\n"
                "|---|---|---|---|---|---|---|---|\n"
            )
        with out.open("a") as f:
            f.write("".join(row + "\n" for row in rows))
        record = {"model": args.model, "precision": args.precision, "engines": specs,
                  "rates": {c.name: c.rates for c in contenders}, "ratios": ratios, "base": base.name,
                  "commit": commit, "commits": {c.name: c.commit for c in contenders}, "threads": args.threads,
                  "new_tokens": args.new_tokens, "started": started,
                  "wall_s": time.time() - started}  # fmt: skip
        with out.with_suffix(".jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
