"""The `neolm` command: thin subcommands over the library. Only this module prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from neolm.errors import NeolmError

MODEL_HELP = (
    "a local checkpoint folder (config.json + weights), a Hugging Face hub id such as "
    "EleutherAI/gpt-neo-125M or EleutherAI/pythia-160m, or modelscope:ID"
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), as every other neolm error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    if required:
        p.add_argument("model", help=MODEL_HELP)
    else:
        p.add_argument("-m", "--model", help=MODEL_HELP + " (default: neolm's bundled model)")
    p.add_argument("--revision", help="hub branch, tag or commit, e.g. step143000 for a Pythia training checkpoint")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 on CPU, bf16 on GPU")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=_non_negative, help="CPU threads for PyTorch (default: PyTorch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="neolm", description="GPT-Neo and GPT-NeoX (Pythia) in plain PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what neolm does to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser(
        "generate",
        help="continue a prompt",
        description="Continue a prompt. Greedy by default; --do-sample samples (with --temperature, --top-k, "
        "--top-p). The prompt comes from the argument, or from standard input when it is omitted or '-'.",
    )
    g.add_argument("prompt", nargs="?", help="the text to continue ('-' or omitted: read standard input)")
    _add_model_args(g, required=False)
    knobs = g.add_argument_group("generation (names and meaning as in transformers.generate)")
    knobs.add_argument("--max-new-tokens", type=_non_negative, help="new tokens at most (default 100)")
    knobs.add_argument("--max-length", type=_non_negative, help="prompt + new tokens at most")
    knobs.add_argument("--min-length", type=_non_negative, default=0, help="prompt + new tokens before eos may end it")
    knobs.add_argument("--min-new-tokens", type=_non_negative, default=0, help="new tokens before eos may end it")
    knobs.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    knobs.add_argument("--temperature", type=_positive_float, default=1.0, help="sampling temperature (default 1)")
    knobs.add_argument("--top-k", type=_non_negative, default=50, help="sample from the k likeliest (0: all; default 50)")
    knobs.add_argument("--top-p", type=_positive_float, default=1.0, help="nucleus sampling mass (default 1: off)")
    knobs.add_argument("--repetition-penalty", type=_positive_float, default=1.0, help=">1 discourages repeats")
    knobs.add_argument("--num-return-sequences", type=_non_negative, default=1, help="samples per prompt")
    knobs.add_argument("--seed", type=_seed, help="seed for reproducible sampling")
    knobs.add_argument("--stop", action="append", metavar="TEXT", help="stop once the text ends in TEXT (repeatable)")
    knobs.add_argument(
        "--truncate", action="store_true", help="drop the oldest prompt tokens when prompt + new tokens overflow"
    )
    out = g.add_argument_group("output")
    out.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print tokens as they come (default: on in a terminal)",
    )
    out.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")

    d = sub.add_parser(
        "prepare-data",
        help="tokenize text into a packed token file for training",
        description="Tokenize text files, folders of them (.txt/.md recursively) or JSONL into OUT/train.bin and "
        "OUT/val.bin (uint16 tokens when the vocabulary allows, end-of-text between documents) + OUT/meta.json. "
        "The validation split takes whole documents.",
    )
    d.add_argument("inputs", nargs="+", help="text files, folders, or .jsonl files")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--tokenizer", default="gpt2", help="gpt2 (GPT-Neo), gpt-neox-20b (Pythia), or a model folder")
    d.add_argument("--val-files", nargs="+", metavar="GLOB", help="documents (file names) held out for validation")
    d.add_argument("--val-fraction", type=float, default=0.0, help="else: this fraction of documents, at random")
    d.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    d.add_argument("--seed", type=_seed, default=0)

    t = sub.add_parser(
        "train",
        help="pre-train or fine-tune a model",
        description="Train from a preset architecture (--preset) or fine-tune a model (--init) on data from "
        "`neolm prepare-data`. The same command runs as one process or under torchrun (FSDP2 over N ranks). "
        "Writes OUT/checkpoints (resumable with --resume), OUT/metrics.jsonl, OUT/loss.png and OUT/final "
        "(Hugging Face format).",
    )
    t.add_argument("--data", required=True, help="a folder written by neolm prepare-data")
    t.add_argument("--out", required=True, help="run folder")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="architecture to train from scratch (see --list-presets)")
    src.add_argument("--init", help="model to fine-tune: " + MODEL_HELP)
    src.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    t.add_argument("--seq-len", type=_non_negative, default=256)
    t.add_argument("--micro-batch-size", type=_non_negative, default=8, help="windows per rank per forward")
    t.add_argument("--grad-accum", type=_non_negative, default=1, help="micro-batches per optimizer step")
    t.add_argument("--max-steps", type=_non_negative, default=1000)
    t.add_argument("--lr", type=_positive_float, default=6e-4, help="peak learning rate")
    t.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay (default lr/10)")
    t.add_argument("--warmup", type=_non_negative, default=100, help="linear warm-up steps")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    t.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast (default) or fp32")
    t.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    t.add_argument("--eval-every", type=_non_negative, default=100)
    t.add_argument("--eval-windows", type=_non_negative, default=64, help="validation windows per evaluation")
    t.add_argument("--save-every", type=_non_negative, default=200)
    t.add_argument("--keep", type=_non_negative, default=2, help="checkpoints to keep")
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--export", help="where to write the final model (default OUT/final)")
    t.add_argument("--export-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    t.add_argument("--no-plot", action="store_true", help="do not draw OUT/loss.png")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")

    i = sub.add_parser("info", help="describe a model", description="Describe a model: family, size, dtype, context.")
    _add_model_args(i, required=True)
    i.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _read_prompt(args) -> str:
    if args.prompt is not None and args.prompt != "-":
        prompt = args.prompt
    elif sys.stdin is None or (sys.stdin.isatty() and args.prompt is None):
        raise NeolmError("no prompt: pass it as an argument or on standard input")
    else:
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise NeolmError("the prompt is empty")
    return prompt


def _load(args):
    import neolm

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return neolm.load(args.model, revision=args.revision, dtype=args.dtype, device=args.device)


def cmd_generate(args) -> int:
    prompt = _read_prompt(args)
    if args.num_return_sequences < 1:
        raise NeolmError("--num-return-sequences must be at least 1")
    knobs = dict(
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        min_length=args.min_length,
        min_new_tokens=args.min_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        num_return_sequences=args.num_return_sequences,
        seed=args.seed,
        stop_strings=args.stop,
        truncate_prompt=args.truncate,
    )
    from neolm.generate import GenerationConfig

    GenerationConfig.from_kwargs(**knobs)  # reject bad combinations before the (slow) load
    lm = _load(args)
    echo = "" if args.no_echo else prompt
    stream = sys.stdout.isatty() if args.stream is None else args.stream
    if stream and args.num_return_sequences == 1:
        pieces = lm.stream(prompt, **knobs)  # checks the request before anything is printed
        sys.stdout.write(echo)
        sys.stdout.flush()
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    texts = lm.generate(prompt, **knobs)
    texts = [texts] if isinstance(texts, str) else texts
    for n, text in enumerate(texts):
        if n:
            print("-" * 40)
        print(echo + text)
    return 0


def cmd_info(args) -> int:
    lm = _load(args)
    info = lm.info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key + ':':<{width + 1}} {value:,}" if isinstance(value, int) else f"{key + ':':<{width + 1}} {value}")
    return 0


def cmd_prepare_data(args) -> int:
    from neolm.tokenizer import BUILTIN, Tokenizer, load_tokenizer
    from neolm.train.data import prepare

    if args.tokenizer in BUILTIN:
        tokenizer = Tokenizer.builtin(args.tokenizer)
    else:
        from neolm import hub

        tokenizer = load_tokenizer(hub.resolve(args.tokenizer), default="gpt2")
    if not 0 <= args.val_fraction < 1:
        raise NeolmError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    meta = prepare(args.inputs, args.out, tokenizer, args.tokenizer, args.val_files, args.val_fraction,
                   args.text_field, args.seed, progress=sys.stderr.isatty())  # fmt: skip
    print(
        f"{meta['documents']} documents: {meta['train_tokens']:,} train + {meta['val_tokens']:,} validation tokens "
        f"({meta['dtype']}) at {meta['tokens_per_second']:,} tokens/s -> {args.out}"
    )
    return 0


def cmd_train(args) -> int:
    from neolm.train.presets import PRESETS

    if args.list_presets:
        for name, hf in PRESETS.items():
            from neolm.config import Config

            print(f"{name:<16} {hf['model_type']:<9} {Config.from_hf(hf).n_params() / 1e6:>9,.1f}M parameters")
        return 0
    from neolm.train.loop import TrainArgs, train

    fields = {k: v for k, v in vars(args).items() if k in TrainArgs.__dataclass_fields__}
    summary = train(TrainArgs(**fields, plot=not args.no_plot, progress=sys.stderr.isatty()))
    if summary.get("val_loss") is not None:
        import math

        print(f"step {summary['step']}: loss {summary['loss']:.4f}, validation loss {summary['val_loss']:.4f} "
              f"(perplexity {math.exp(summary['val_loss']):.2f})")  # fmt: skip
    print(f"model written to {summary['export']}" + (f"; loss curves in {summary['plot']}" if summary.get("plot") else ""))
    return 0


COMMANDS = {"generate": cmd_generate, "info": cmd_info, "prepare-data": cmd_prepare_data, "train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="neolm: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except NeolmError as e:
        print(f"neolm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `neolm generate ... | head`
        sys.stderr.close()
        return 0
    except MemoryError:
        print(f"neolm {args.command}: error: out of memory (try --dtype bfloat16 or a smaller model)", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one line by default, the traceback with -v
        if args.verbose:
            raise
        print(f"neolm {args.command}: internal error: {type(e).__name__}: {e} (rerun with -v for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
