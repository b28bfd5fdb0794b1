"""`neolm quantize`: a thin subcommand over neolm.quant."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from neolm.cli import MODEL_HELP, non_negative
from neolm.errors import NeolmError


def register(sub) -> dict:
    q = sub.add_parser(
        "quantize",
        help="quantize a model's weights to int8 or int4 and save it",
        description="Quantize the Linear layers of MODEL (weights only; embeddings, LayerNorms and, by default, "
        "the output head stay in floating point) and write a folder that `neolm.load` and every neolm command "
        "read with no flag. Unless --no-eval, reports the quality cost: perplexity of full precision vs "
        "quantized on --eval-text (default: a built-in passage), and how many greedy continuations keep their "
        "first 20 tokens.",
    )
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("--to", required=True, metavar="int8|int4", help="int8: per-channel; int4: group-wise")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument(
        "--group-size", type=non_negative, default=64, help="int4 group size: 32, 64, 128 or 256 (default 64)"
    )
    q.add_argument("--quantize-head", action="store_true", help="also quantize the output head (lm_head)")
    q.add_argument("--quantize-activations", action="store_true",
                   help="measure the quality with each matmul's input rows quantized to int8 too, as "
                   "`neolm generate --quantize-activations` runs (W8A8 / W4A8; the folder is the same)")  # fmt: skip
    q.add_argument("--revision", help="hub branch, tag or commit")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="float dtype of the unquantized parts")
    q.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    q.add_argument("--threads", type=non_negative, help="CPU threads for PyTorch (default: PyTorch's choice)")
    ev = q.add_argument_group("quality report")
    ev.add_argument("--eval-text", nargs="+", metavar="FILE", help="text file(s) for perplexity and prompts")
    ev.add_argument("--eval-tokens", type=non_negative, default=16384, help="score at most this many tokens (0: all)")
    ev.add_argument("--eval-context", type=non_negative, help="perplexity window (default: the model's context)")
    ev.add_argument("--prompts", type=non_negative, default=16, help="greedy prompts taken from the text (default 16)")
    ev.add_argument("--no-eval", action="store_true", help="skip the quality report")
    return {"quantize": cmd_quantize}


def _texts(args) -> tuple[list[str], str]:
    from neolm.quant.quality import BUILTIN_TEXT

    if not args.eval_text:
        return [BUILTIN_TEXT], "built-in passage"
    texts = []
    for name in args.eval_text:
        try:
            texts.append(Path(name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise NeolmError(f"cannot read --eval-text {name}: {e.strerror if isinstance(e, OSError) else e}") from None
    return texts, ", ".join(args.eval_text)


def cmd_quantize(args) -> int:
    import neolm
    from neolm.quant import io, linear, quality

    bits = linear.parse_quantize(args.to)
    if bits == 4:
        linear.check_group_size(args.group_size)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise NeolmError(f"--out {out} exists and is not empty")
    texts, source = _texts(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from neolm import checkpoint, hub

    folder = hub.resolve(args.model, args.revision)
    stored = checkpoint.read_hf_config(folder)
    stored = stored.get("torch_dtype") or stored.get("dtype")
    lm = neolm.load(folder, dtype=args.dtype, device=args.device)
    if getattr(lm.model, "quant_config", None):
        raise NeolmError(f"{args.model} is quantized already; quantize its float checkpoint")
    report = {"model": args.model, "quantization": args.to, "group_size": args.group_size if bits == 4 else None}
    if not args.no_eval:
        tokens = [lm.encode(t) for t in texts]
        if args.eval_tokens:
            tokens = _truncate(tokens, args.eval_tokens)
        texts = [lm.decode(t) for t in tokens]
        prompts = quality.prompts_from(tokens, args.prompts, 24)
        prefix = lm.config.eos_token_id if lm.config.eos_token_id is not None else lm.tokenizer.eos_token_id

        def measure():
            return quality.measure(lm.model, lm.encode, texts, prompts, prefix, args.eval_context)

        print(f"measuring full precision on {source} ...", file=sys.stderr)
        full = measure()
    skip = () if args.quantize_head else linear.DEFAULT_SKIP
    linear.quantize_model(lm.model, bits, args.group_size, skip)
    if args.quantize_activations:
        linear.quantize_activations(lm.model)
    from neolm.native import decode

    decode.attach(lm.model)  # the native decode step, if any, was built on the float layers
    from neolm.api import DTYPES

    float_dtype = DTYPES.get(args.dtype) or DTYPES.get(stored) or lm.dtype  # as stored, unless --dtype
    io.save_quantized(lm.model, out, lm.tokenizer, float_dtype)
    size = (out / "model.safetensors").stat().st_size
    report["bytes"] = size
    print(f"wrote {out} (int{bits}{f', group size {args.group_size}' if bits == 4 else ''}; "
          f"model.safetensors {size / 2**20:,.1f} MiB)")  # fmt: skip
    if not args.no_eval:
        print(f"measuring int{bits} ...", file=sys.stderr)
        q = quality.compare(full, measure())
        report |= {"eval_text": source} | q
        print(f"perplexity on {source} ({q['tokens']:,} tokens): {q['perplexity_full']:.3f} full precision, "
              f"{q['perplexity_quantized']:.3f} int{bits} ({100 * q['perplexity_change']:+.2f}%)")  # fmt: skip
        print(f"greedy: {q['greedy_identical']}/{q['greedy_prompts']} prompts keep their first "
              f"{q['greedy_tokens']} tokens (mean common prefix {q['greedy_mean_common_prefix']:.1f})")  # fmt: skip
    (out / "quantization_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _truncate(token_lists: list[list[int]], budget: int) -> list[list[int]]:
    """The first tokens of each text, `budget` in all, shared evenly (a short text leaves its share to the rest)."""
    out = {}
    for i, doc in enumerate(sorted(range(len(token_lists)), key=lambda j: len(token_lists[j]))):
        out[doc] = token_lists[doc][: budget // (len(token_lists) - i)]
        budget -= len(out[doc])
    return [out[doc] for doc in range(len(token_lists))]
