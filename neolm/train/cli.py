"""`neolm prepare-data` and `neolm train`: thin subcommands over neolm.train."""

from __future__ import annotations

import math
import os
import sys

from neolm.cli import MODEL_HELP, non_negative, positive_float, seed_type
from neolm.errors import NeolmError


def register(sub) -> dict:
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
    d.add_argument("--seed", type=seed_type, default=0)

    t = sub.add_parser(
        "train",
        help="pre-train or fine-tune a model",
        description="Train from a preset architecture (--preset) or fine-tune a model (--init) on data from "
        "`neolm prepare-data`. The same command runs as one process or under torchrun (FSDP2 over N ranks). "
        "Writes OUT/checkpoints (resumable with --resume), OUT/metrics.jsonl, OUT/loss.png and OUT/final "
        "(Hugging Face format).",
    )
    t.add_argument("--data", help="a folder written by neolm prepare-data (required)")
    t.add_argument("--out", help="run folder (required)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="architecture to train from scratch (see --list-presets)")
    src.add_argument("--init", help="model to fine-tune: " + MODEL_HELP)
    src.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    t.add_argument("--seq-len", type=non_negative, default=256)
    t.add_argument("--micro-batch-size", type=non_negative, default=8, help="windows per rank per forward")
    t.add_argument("--grad-accum", type=non_negative, default=1, help="micro-batches per optimizer step")
    t.add_argument("--max-steps", type=non_negative, default=1000)
    t.add_argument("--lr", type=positive_float, default=6e-4, help="peak learning rate")
    t.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay (default lr/10)")
    t.add_argument("--warmup", type=non_negative, default=100, help="linear warm-up steps")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    t.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast (default) or fp32")
    t.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    t.add_argument("--eval-every", type=non_negative, default=100)
    t.add_argument("--eval-windows", type=non_negative, default=64, help="validation windows per evaluation")
    t.add_argument("--save-every", type=non_negative, default=200)
    t.add_argument("--keep", type=non_negative, default=2, help="checkpoints to keep")
    t.add_argument("--seed", type=seed_type, default=0)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--export", help="where to write the final model (default OUT/final)")
    t.add_argument("--export-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    t.add_argument("--no-plot", action="store_true", help="do not draw OUT/loss.png")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    lora = t.add_argument_group("LoRA (with --init: the model stays frozen, low-rank updates are learnt, merged into "
                                "the exported weights and written alone to EXPORT-adapter in PEFT's format)")  # fmt: skip
    lora.add_argument("--lora-r", type=non_negative, default=0, metavar="R",
                      help="train a rank-R update of each target layer instead of every weight (0: off; 8 or 16 "
                      "are usual)")  # fmt: skip
    lora.add_argument("--lora-alpha", type=positive_float, default=16.0, metavar="ALPHA",
                      help="the updates are scaled by ALPHA / R (default 16)")  # fmt: skip
    lora.add_argument("--lora-dropout", type=float, default=0.05, metavar="P",
                      help="dropout on the updates' input (default 0.05)")  # fmt: skip
    lora.add_argument("--lora-targets", default="qkv,proj,fc,out", metavar="LAYERS",
                      help="which layers of each block: qkv, proj (attention), fc, out (MLP); comma-separated "
                      "(default: all four)")  # fmt: skip
    lora.add_argument("--quantize", choices=["int8", "int4"],
                      help="QLoRA: hold the frozen weights as int8 or int4 codes (a quarter or an eighth of fp32's "
                      "memory; under torchrun every rank holds all the codes and FSDP2 shards the rest); the export "
                      "merges the updates into the float weights")  # fmt: skip
    return {"prepare-data": cmd_prepare_data, "train": cmd_train}


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
    if not (args.data and args.out):
        raise NeolmError("--data and --out are required")
    from neolm.train.loop import TrainArgs, train

    fields = {k: v for k, v in vars(args).items() if k in TrainArgs.__dataclass_fields__}
    summary = train(TrainArgs(**fields, plot=not args.no_plot, progress=sys.stderr.isatty()))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports
        return 0
    if summary.get("val_loss") is not None:
        print(f"step {summary['step']}: loss {summary['loss']:.4f}, validation loss {summary['val_loss']:.4f} "
              f"(perplexity {math.exp(summary['val_loss']):.2f})")  # fmt: skip
    adapter = f"; its LoRA adapter (PEFT's format) to {summary['adapter']}" if summary.get("adapter") else ""
    plot = f"; loss curves in {summary['plot']}" if summary.get("plot") else ""
    print(f"model written to {summary['export']}{adapter}{plot}")
    return 0


