"""Assisted generation (neolm.speculative) against plain greedy decoding, and against transformers' prompt
lookup, on the same checkpoint in one run.

    python bench/speculative.py --model /tmp/neolm-bench/models/pythia-1.4b/hf --new-tokens 128 --rounds 3 \\
        --out bench/SPECULATIVE.md

Rows, each greedy from the same --prompt-tokens random ids to exactly --new-tokens tokens (eos blocked by
min_new_tokens), fp32, --threads threads:
  - neolm and transformers, plain;
  - neolm and transformers with prompt lookup (prompt_lookup_num_tokens=--lookup);
  - neolm with an assistant model: the same checkpoint quantized to int8 (output head included), which reads
    a quarter of the bytes a step; num_assistant_tokens --guesses, without transformers' confidence threshold
    (0: random weights give near-flat distributions, whose top token is never 0.4 likely), and with the
    defaults (20 tokens, threshold 0.4);
  - with --early-exit K[,K...]: neolm with the model's own first K layers as its assistant (assistant_early_exit),
    the same two ways;
  - with --universal: the int8 assistant again, its token ids permuted (in a tokenizer.json of its own and in its
    embedding and head rows), so that its tokenizer is another and neolm carries its guesses over as text
    (universal assisted generation, neolm.universal): an assistant that predicts what the same-tokenizer one
    does, so the row against the int8 row above is what going through bytes costs and loses.
--sample T samples every row at temperature T instead (seed 0; top_k 50, as both libraries' default): the
guesses are then checked by speculative sampling (an assistant's) or kept where the model's samples equal them
(prompt lookup's), and a row's tokens equal the plain row's only in distribution. With --universal, the
assistant of another tokenizer samples in the tokens the vocabularies share (universal speculative decoding).
--prompt-file takes the prompt's tokens from a text file (from --prompt-offset on) instead of random ids (for a
trained model, such as neolm's bundled one: --model neolm/default_model).
Each round runs every row once (the order reversed every other round). Reported: seconds per generation
(median [min-max]), new tokens/s, the model's forwards (neolm: a hook on the model, the assistant's not
counted), the speed over the engine's own plain decoding (median of per-round ratios), and how many leading
tokens equal neolm's plain greedy ones (assisted generation must give them all; a near-tie may flip, as the
forward of several tokens rounds otherwise than one-token steps).

How much the guesses save depends on the text: random weights' greedy text falls into loops, which prompt lookup
guesses; an int8 copy agrees with its fp32 original more than a smaller model agrees with a larger one. These
are the mechanism's costs and gains at this shape, not what a real checkpoint's text will see. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from machine import describe  # (bench/: this script's folder is on sys.path)
from report import publish, spread

import neolm


def run_neolm(lm, prompt, kw) -> tuple[float, list[int], int]:
    calls = []  # (an early exit's forwards, with `layers`, are the assistant's: not counted)
    hook = lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(1) if kwargs.get("layers") is None else None, with_kwargs=True)
    start = time.perf_counter()
    out = lm.generate_ids([prompt], **kw)[0]
    elapsed = time.perf_counter() - start
    hook.remove()
    return elapsed, out, len(calls)


def permuted_copy(folder: Path, tokenizer, out: Path, seed: int = 0) -> Path:
    """The checkpoint in `folder` (whose tokenizer is `tokenizer`) with its token ids permuted, in its tokenizer
    and in the rows of its embedding and head (the tensors with a row per id): a model that predicts what the
    original does, through another vocabulary."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    tokenizer.save(out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    ids = max([*vocab.values(), *(added["id"] for added in spec["added_tokens"])]) + 1  # (added ids may follow)
    perm = torch.randperm(ids, generator=torch.Generator().manual_seed(seed))  # old id -> new id
    spec["model"]["vocab"] = {token: int(perm[i]) for token, i in vocab.items()}
    for added in spec["added_tokens"]:
        added["id"] = int(perm[added["id"]])
    (out / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((Path(folder) / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(config.get(key), int):
            config[key] = int(perm[config[key]])
    (out / "config.json").write_text(json.dumps(config))
    rows = torch.argsort(perm)
    state = load_file(str(Path(folder) / "model.safetensors"))
    for tensor in state.values():
        if tensor.dim() == 2 and tensor.shape[0] == config["vocab_size"]:
            tensor[:ids] = tensor[rows]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(Path(folder) / "generation_config.json", out / "generation_config.json")
    return out


def run_transformers(hf, prompt, kw) -> tuple[float, list[int], int]:
    calls = []
    hook = hf.register_forward_pre_hook(lambda module, args: calls.append(1))
    ids = torch.tensor([prompt])
    if "seed" in kw:  # (transformers samples from torch's global generator)
        kw = dict(kw)
        torch.manual_seed(kw.pop("seed"))
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kw)
    elapsed = time.perf_counter() - start
    hook.remove()
    return elapsed, out[0, len(prompt) :].tolist(), len(calls)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a checkpoint folder (bench/prepare.py checkpoint NAME OUT)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens")
    p.add_argument("--guesses", type=int, default=4, help="num_assistant_tokens of the thresholdless row")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--early-exit", default="", help="comma-separated layer counts for assistant_early_exit rows")
    p.add_argument("--universal", action="store_true",
                   help="add the int8 assistant with its token ids permuted (another tokenizer) rows")  # fmt: skip
    p.add_argument("--sample", type=float, metavar="T", help="sample every row at this temperature (seed 0)")
    p.add_argument("--prompt-file", help="take the prompt from this text file (default: random ids)")
    p.add_argument("--prompt-offset", type=int, default=0, help="from this character of --prompt-file on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="append the table to this markdown file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    folder, n = args.model, args.new_tokens
    lm = neolm.load(folder, dtype="float32")
    if args.universal:  # (made first: the copy holds a float checkpoint in memory a while)
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            other = neolm.load(permuted_copy(Path(folder), lm.tokenizer, Path(scratch)), dtype="float32",
                               quantize="int8", quantize_head=True)  # fmt: skip
        assert not other.tokenizer.same_vocabulary(lm.tokenizer)
    int8 = neolm.load(folder, dtype="float32", quantize="int8", quantize_head=True)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.randint(0, 50000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    if args.prompt_file:
        text = Path(args.prompt_file).read_text(encoding="utf-8")
        prompt = lm.encode(text[args.prompt_offset : args.prompt_offset + 20 * args.prompt_tokens])
        prompt = prompt[: args.prompt_tokens]
    decoding = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=1.0)
    if args.sample is not None:  # (every row decodes with these: greedy, or sampled with --sample)
        decoding |= dict(do_sample=True, temperature=args.sample, top_k=50, seed=0)
    rows = {  # name -> (engine, runner, model, arguments)
        "neolm": ("neolm", run_neolm, lm, decoding),
        f"neolm, prompt lookup {args.lookup}": ("neolm", run_neolm, lm, decoding | {"prompt_lookup_num_tokens": args.lookup}),
        f"neolm, int8 assistant, {args.guesses} guesses, no threshold": ("neolm", run_neolm, lm, decoding | {
            "assistant_model": int8, "num_assistant_tokens": args.guesses, "assistant_confidence_threshold": 0.0}),
        "neolm, int8 assistant, defaults (20, threshold 0.4)": ("neolm", run_neolm, lm, decoding | {"assistant_model": int8}),
        "transformers": ("transformers", run_transformers, hf, decoding),
        f"transformers, prompt lookup {args.lookup}": ("transformers", run_transformers, hf,
                                                       decoding | {"prompt_lookup_num_tokens": args.lookup}),
    }  # fmt: skip
    for k in [int(x) for x in args.early_exit.split(",") if x]:
        of = f"{k} of {lm.config.n_layer} layers"
        guessing = {"assistant_early_exit": k, "num_assistant_tokens": args.guesses,
                    "assistant_confidence_threshold": 0.0}  # fmt: skip
        rows[f"neolm, early exit after {of}, {args.guesses} guesses, no threshold"] = ("neolm", run_neolm, lm,
                                                                                     decoding | guessing)
        rows[f"neolm, early exit after {of}, defaults (20, threshold 0.4)"] = ("neolm", run_neolm, lm, decoding | {
            "assistant_early_exit": k})  # fmt: skip
    if args.universal:
        rows[f"neolm, int8 assistant of another tokenizer, {args.guesses} guesses, no threshold"] = (
            "neolm", run_neolm, lm, decoding | {"assistant_model": other, "num_assistant_tokens": args.guesses,
                                              "assistant_confidence_threshold": 0.0})  # fmt: skip
        rows["neolm, int8 assistant of another tokenizer, defaults (20, threshold 0.4)"] = (
            "neolm", run_neolm, lm, decoding | {"assistant_model": other})
    for _, run, model, kw in rows.values():  # warm-up (kernels, allocations)
        run(model, prompt[:8], kw | {"max_new_tokens": 4, "min_new_tokens": 4})
    times: dict[str, list[float]] = {name: [] for name in rows}
    forwards, same = {}, {}
    reference = None
    for r in range(args.rounds):
        order = list(rows.items())
        for name, (_, run, model, kw) in order if r % 2 == 0 else order[::-1]:
            seconds, out, forwards[name] = run(model, prompt, kw)
            times[name].append(seconds)
            if name == "neolm":
                reference = out
            same.setdefault(name, []).append(out)
            print(f"round {r + 1}: {name} {seconds:.2f} s, {forwards[name]} forwards", file=sys.stderr)
    agree = {name: min(next((i for i, (a, b) in enumerate(zip(o, reference)) if a != b), n) for o in outs)
             for name, outs in same.items()}  # fmt: skip

    def speedup(name: str) -> float:
        plain = rows[name][0]
        return statistics.median(t / s for s, t in zip(times[name], times[plain]))

    machine = describe()
    lines = [
        f"`python bench/speculative.py --model {folder} --prompt-tokens {args.prompt_tokens} --new-tokens {n} "
        f"--lookup {args.lookup} --guesses {args.guesses} --rounds {args.rounds} --threads {args.threads}"
        + (f" --early-exit {args.early_exit}" if args.early_exit else "")
        + (" --universal" if args.universal else "")
        + (f" --sample {args.sample}" if args.sample is not None else "")
        + (f" --prompt-file {args.prompt_file} --prompt-offset {args.prompt_offset}" if args.prompt_file else "")
        + "`",
        "",
        f"{machine['cpu']} ({machine['cpu_id']}; {machine['simd']}), torch {torch.__version__}, {args.threads} "
        f"threads, fp32; {Path(folder).parent.name if Path(folder).name == 'hf' else Path(folder).name} "
        f"{len(prompt)}-token prompt ({'from ' + Path(args.prompt_file).name if args.prompt_file else 'random ids'}), "
        f"{n} new tokens, " + ("greedy" if args.sample is None else f"sampled at temperature {args.sample}"),
        "",
        "| row | seconds per generation | new tokens/s | forwards of the model | speed over own plain | "
        "tokens = neolm plain |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {spread(xs)} | {n / statistics.median(xs):.1f} | {forwards[name]} | {speedup(name):.2f}x | "
            f"{f'{agree[name]}/{n}' if args.sample is None else '–'} |"
            for name, xs in times.items()
        ),
        "",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
