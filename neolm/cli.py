"""The `neolm` command: thin subcommands over the library. Only this module prints."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from neolm.errors import NeolmError
from neolm.tool_calls import FORMATS, FORMATS_HELP

CHAT_MAX_NEW_TOKENS = 256  # `neolm chat`'s reply length unless asked or set by the checkpoint
MODEL_HELP = (
    "a local checkpoint folder (config.json + weights), a Hugging Face hub id such as "
    "EleutherAI/gpt-neo-125M or EleutherAI/pythia-160m, or modelscope:ID"
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), as every other neolm error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(convert, ok, requirement: str):
    """An argparse type: convert the text, then insist on `requirement`."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if convert is int else ''}number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    return parse


non_negative = _checked(int, lambda v: v >= 0, ">= 0")
positive = _checked(int, lambda v: v >= 1, ">= 1")
positive_float = _checked(float, lambda v: v > 0, "> 0")
non_negative_float = _checked(float, lambda v: v >= 0, ">= 0")
seed_type = _checked(int, lambda v: 0 <= v < 2**63, "between 0 and 2**63 - 1")


def _add_model_args(p: argparse.ArgumentParser, required: bool = False, positional: bool = False) -> None:
    """The model argument (positional when required or asked for; else --model) and loading options."""
    if required:
        p.add_argument("model", help=MODEL_HELP)
    elif positional:
        p.add_argument("model", nargs="?", help=MODEL_HELP + " (default: neolm's bundled model)")
    else:
        p.add_argument("-m", "--model", help=MODEL_HELP + " (default: neolm's bundled model)")
    p.add_argument("--revision", help="hub branch, tag or commit, e.g. step143000 for a Pythia training checkpoint")
    p.add_argument("--adapter", metavar="FOLDER_OR_HUB_ID",
                   help="a LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors, as PEFT and "
                   "neolm train --lora-r write it), merged into the weights as they load")  # fmt: skip
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 on CPU, bf16 on GPU")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=non_negative, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights while loading (weights only)")
    p.add_argument("--group-size", type=non_negative, default=64, help="int4 group size: 32, 64, 128 or 256 (default 64)")
    p.add_argument("--quantize-head", action="store_true", help="with --quantize: the output head too (faster)")
    p.add_argument(
        "--quantize-activations",
        action="store_true",
        help="with int8 or int4 weights on CPU: quantize each matmul's input rows to int8 too (W8A8 / W4A8, as "
        "CTranslate2 and llama.cpp's Q8_0 / Q4_0 do) and multiply in integers (AVX-512 VNNI): prompts and batches "
        "faster, a little less exact",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "float32", "bfloat16", "float16", "int8"],
        default="auto",
        help="dtype of the keys and values kept while generating (default auto: the model's, exact). bfloat16 with "
        "a float32 model halves the cache's memory and what each step reads of it: faster batches and long "
        "contexts, keys and values at bf16 precision. int8 quarters it (int8 codes and a scale per key and per "
        "value row of each head, as llama.cpp's q8_0 cache), a little less exact",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="CPU: one-token matmuls outside the native decode step (the output head; every layer without it) "
        "use the fastest kernel for their shape, timed at start-up: neolm's AVX-512 kernels, torch.compile's on "
        "CPUs without them, or oneDNN's (bench/README.md has the gains)",
    )
    p.add_argument(
        "--mmap",
        action="store_true",
        help="CPU: leave the weights in the checkpoint file's pages (shared with the page cache and other processes) "
        "instead of copying them: loads take next to no time or memory, decoding was 3-12%% slower at pythia-1.4b",
    )
    p.add_argument(
        "--huge-pages",
        action="store_true",
        help="CPU (Linux): move the weights into transparent huge pages (2 MiB) once loaded: decoding was 1.02-1.12x "
        "faster on a Zen 4 EPYC (loads 1.9-5 s longer at pythia-1.4b), no faster on a Xeon (bench/PROFILE.md, "
        "session 43). Needs /sys/kernel/mm/transparent_hugepage/enabled at madvise or always; not with --mmap",
    )
    p.add_argument(
        "--no-native",
        dest="native",
        action="store_false",
        help="keep every decode step and layer in torch. By default on CPU each new token (of one sequence, or of "
        "each of up to 12 prompts) goes through every block in one call of neolm's AVX-512 kernels, and the output "
        "head, quantized layers and the attention of prompts run on them too (built once with the system's C++ compiler, cached in "
        "~/.cache/neolm/native), where the machine can build them; on a CUDA GPU each decode step replays a "
        "CUDA graph of every block",
    )


WATERMARK_HELP = (
    "the watermark's settings as transformers' WatermarkingConfig: bias (default 2.0, added to the green tokens' "
    "logits), greenlist_ratio (0.25), hashing_key (15485863: choose your own for a private watermark), "
    "seeding_scheme (lefthash, or selfhash: sturdier, slower) and context_width (1); e.g. bias=2.5,hashing_key=42. "
    "Or SynthID Text's, as transformers' SynthIDTextWatermarkingConfig, when it gives keys (the secret, separated "
    "by ':'): ngram_len, keys, context_history_size (1024), sampling_table_seed (0), sampling_table_size (65536), "
    "skip_first_ngram_calls (false); e.g. ngram_len=5,keys=654:400:836:123:340:443:597:160:57 (with --do-sample)"
)


def _dola_layers(text: str) -> str | list[int]:
    if text in ("low", "high"):
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"low, high or layer numbers separated by commas, not {text!r}") from None


def _add_generation_args(p: argparse.ArgumentParser, chat: bool = False):
    """The generation knobs (names and meaning as transformers.generate's), in a group that is returned; a chat
    has one reply per turn, whose length counts from its own start."""
    knobs = p.add_argument_group("generation (names and meaning as in transformers.generate)")
    knobs.add_argument("--max-new-tokens", type=non_negative,
                       help=f"new tokens at most (default {CHAT_MAX_NEW_TOKENS if chat else 100})")  # fmt: skip
    if not chat:
        knobs.add_argument("--max-length", type=non_negative, help="prompt + new tokens at most")
        knobs.add_argument("--min-length", type=non_negative, help="prompt + new tokens before eos may end it")
    knobs.add_argument("--min-new-tokens", type=non_negative, help="new tokens before eos may end it")
    knobs.add_argument("--do-sample", action=argparse.BooleanOptionalAction, help="sample (--no-do-sample: greedy)")
    knobs.add_argument("--temperature", type=positive_float, help="sampling temperature (default 1)")
    knobs.add_argument("--top-k", type=non_negative, help="sample from the k likeliest (0: all; default 50)")
    knobs.add_argument("--top-p", type=positive_float, help="nucleus sampling mass (default 1: off)")
    knobs.add_argument("--repetition-penalty", type=positive_float, help=">1 discourages repeats")
    knobs.add_argument("--encoder-repetition-penalty", type=positive_float, metavar="X",
                       help=">1 favours the prompt's tokens (stay on its topic), <1 discourages them")  # fmt: skip
    knobs.add_argument("--no-repeat-ngram-size", type=non_negative, metavar="N", help="no N-gram may occur twice")
    knobs.add_argument("--min-p", type=float, help="sample only tokens with this fraction of the likeliest's probability")
    knobs.add_argument("--typical-p", type=positive_float, help="locally typical sampling's mass (default 1: off)")
    knobs.add_argument("--top-h", type=positive_float, metavar="X",
                       help="top-H sampling: the likeliest tokens whose entropy stays within X (0-1) of the whole's")  # fmt: skip
    knobs.add_argument("--presence-penalty", type=float, metavar="X",
                       help="OpenAI's: subtract X from the logit of every token generated so far (-2 to 2)")  # fmt: skip
    knobs.add_argument("--frequency-penalty", type=float, metavar="X",
                       help="OpenAI's: subtract X per time a token was generated (-2 to 2)")  # fmt: skip
    if not chat:
        knobs.add_argument("--num-beams", type=non_negative, metavar="N",
                           help="beam search with N beams (with --no-do-sample; the text comes at the end)")  # fmt: skip
        knobs.add_argument("--length-penalty", type=float, metavar="X",
                           help="beam search: a hypothesis scores log p / length^X (default 1; < 1 favours short ones)")  # fmt: skip
        knobs.add_argument("--num-beam-groups", type=non_negative, metavar="G",
                           help="diverse beam search: the beams split into G groups, each a beam search of its own, "
                           "that choose in turn (--num-beams a multiple of G)")  # fmt: skip
        knobs.add_argument("--diversity-penalty", type=float, metavar="X",
                           help="diverse beam search: subtract X from a token's score per group before that chose "
                           "it at this step (e.g. 1.0)")  # fmt: skip
        knobs.add_argument("--force-words", action="append", metavar="TEXT[|TEXT...]",
                           help="constrained beam search: the text must hold this phrase (or one of these |-separated "
                           "ones); repeat for more; encoded as given, so a word mid-sentence takes its leading space: "
                           "--force-words ' Paris'")  # fmt: skip
        knobs.add_argument("--num-return-sequences", type=non_negative, help="samples (or best beams) per prompt")
        knobs.add_argument("--dola-layers", type=_dola_layers, metavar="low|high|I,J,...",
                           help="DoLa: contrast the last layer's prediction with the furthest of these earlier layers' "
                           "(low: the lower half, high: the upper half; 0 is the embeddings); with "
                           "--repetition-penalty 1.2, as its authors advise")  # fmt: skip
        knobs.add_argument("--penalty-alpha", type=float, metavar="X",
                           help="contrastive search (with --top-k 4 to 10 and --no-do-sample): the likeliest of the top-k "
                           "tokens, less X times its hidden state's likeness to the text's; against repetition")  # fmt: skip
        knobs.add_argument("--token-healing", action="store_true", default=None,
                           help="choose the prompt's last token again among those that begin with it, so that a "
                           "prompt cut inside a word or URL (\"http:\") goes on as text would (transformers' "
                           "token_healing; the prompt's outer whitespace is dropped first)")  # fmt: skip
    knobs.add_argument("--seed", type=seed_type, help="seed for reproducible sampling")
    knobs.add_argument("--prefill-chunk-size", type=positive, metavar="N",
                       help="read the prompt N tokens at a time: less memory for a long prompt, "
                       "the same text")  # fmt: skip
    knobs.add_argument("--guidance-scale", type=float, metavar="X",
                       help="classifier-free guidance: > 1 (e.g. 1.5) holds the text closer to the prompt, away from "
                            "--negative-prompt (default: the prompt's last token alone); each token costs two forwards")  # fmt: skip
    knobs.add_argument("--negative-prompt", metavar="TEXT",
                       help="with --guidance-scale: the text to steer away from")  # fmt: skip
    knobs.add_argument("--watermark", action="store_true",
                       help="write a green-list watermark into the text, which `neolm watermark` detects")  # fmt: skip
    knobs.add_argument("--watermark-config", metavar="KEY=VALUE,...", help="implies --watermark; " + WATERMARK_HELP)
    knobs.add_argument("--max-time", type=positive_float, metavar="SECONDS",
                       help="end the text with the first token after this many seconds")  # fmt: skip
    cut = "; cut out of the reply" if chat else ""
    knobs.add_argument(
        "--stop", action="append", metavar="TEXT", help=f"stop once the text ends in TEXT (repeatable){cut}"
    )
    what = "each reply" if chat else "the text"
    shape = p.add_argument_group(
        "structured outputs (only tokens that keep the text a possible match are generated, and it ends once whole; "
        "cut short by --max-new-tokens, it is the start of a match)"
    ).add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="SCHEMA",
                       help=f"{what} is JSON that satisfies this JSON Schema (its JSON text, or a .json file): "
                       "properties in the schema's order, no keys it does not name")  # fmt: skip
    shape.add_argument("--json-object", action="store_true", default=None, help=f"{what} is a JSON object")
    shape.add_argument("--regex", metavar="PATTERN",
                       help=f"{what} matches this regular expression whole (Python syntax; look-aheads, but no "
                       "look-behinds or back-references)")  # fmt: skip
    shape.add_argument("--choice", action="append", metavar="TEXT",
                       help=f"{what} is one of these strings (repeat the option for each)")  # fmt: skip
    shape.add_argument("--grammar", metavar="GBNF",
                       help=f"{what} matches this GBNF grammar's root rule (llama.cpp's format; recursive rules nest "
                       "without limit, but a left-recursive one only 3 levels deep)")  # fmt: skip
    shape.add_argument("--grammar-file", metavar="FILE", help="--grammar, read from a file (e.g. llama.cpp's json.gbnf)")
    return knobs


def _structured_spec(args) -> dict | None:
    """neolm.structured's spec from --json-schema / --json-object / --regex / --choice, or None."""
    if args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith(("{", "[")) and text not in ("true", "false"):
            try:
                text = Path(text).read_text()
            except OSError as e:
                raise NeolmError(f"--json-schema: neither JSON nor a readable file: {e}") from None
        try:
            return {"json": json.loads(text)}
        except json.JSONDecodeError as e:
            raise NeolmError(f"--json-schema: not valid JSON: {e}") from None
    if args.json_object:
        return {"json_object": True}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice:
        return {"choice": args.choice}
    if args.grammar is not None:
        return {"grammar": args.grammar}
    if args.grammar_file is not None:
        try:
            return {"grammar": Path(args.grammar_file).read_text()}
        except OSError as e:
            raise NeolmError(f"--grammar-file: {e}") from None
    return None


def _generation_knobs(args) -> dict:
    """The generation arguments given on the command line (the rest: the model's generation defaults), checked."""
    names = ("max_new_tokens", "max_length", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k",
             "top_p", "repetition_penalty", "num_return_sequences", "seed", "no_repeat_ngram_size", "min_p",
             "typical_p", "presence_penalty", "frequency_penalty", "num_beams", "length_penalty",
             "num_beam_groups", "diversity_penalty",
             "prompt_lookup_num_tokens", "num_assistant_tokens", "top_h", "max_time", "guidance_scale", "penalty_alpha", "dola_layers",
             "token_healing", "encoder_repetition_penalty", "prefill_chunk_size", "assistant_early_exit")  # fmt: skip
    knobs = {name: getattr(args, name, None) for name in names} | {"stop_strings": args.stop}
    knobs["structured_outputs"] = _structured_spec(args)
    knobs = {k: v for k, v in knobs.items() if v is not None}
    from neolm.generation_config import GenerationConfig

    negative = {"negative_prompt_ids": [0]} if args.negative_prompt is not None else {}  # (its text: once loaded)
    words = getattr(args, "force_words", None)
    forced = {"force_words_ids": [[0]]} if words else {}  # (its text too)
    GenerationConfig.from_kwargs(**knobs, **negative, **forced)  # reject bad combinations before the (slow) load
    if words:
        if not all(all(w.split("|")) for w in words):
            raise NeolmError("--force-words: a phrase (or an alternative between |) is empty")
        knobs["force_words"] = [w.split("|") if "|" in w else w for w in words]
    if "structured_outputs" in knobs:  # and a bad schema or regex
        from neolm.structured import spec_automaton

        spec_automaton(knobs["structured_outputs"])
    if args.negative_prompt is not None:
        knobs["negative_prompt"] = args.negative_prompt
    if args.watermark or args.watermark_config is not None:
        from neolm.watermark import parse_settings

        knobs["watermarking_config"] = parse_settings(args.watermark_config or "")
    return knobs


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
    _add_model_args(g, positional=False)
    _add_generation_args(g).add_argument(
        "--truncate", action="store_true", help="drop the oldest prompt tokens when prompt + new tokens overflow"
    )
    fast = g.add_argument_group(
        "assisted generation (speculative decoding: the same tokens, or samples of the same distribution, in "
        "fewer passes over the weights when the guesses are right)"
    )
    fast.add_argument("--prompt-lookup-num-tokens", type=positive, metavar="N",
                      help="guess N tokens from what followed the last 2 tokens earlier in the text (the prompt "
                      "included): for continuations that repeat or quote it")  # fmt: skip
    fast.add_argument("--assistant-model", metavar="MODEL",
                      help="a smaller model that guesses the tokens (e.g. EleutherAI/pythia-70m for a larger "
                      "Pythia), loaded with the same options; one with another tokenizer (gpt-neo-125M for a "
                      "Pythia) guesses through text")  # fmt: skip
    fast.add_argument("--assistant-early-exit", type=positive, metavar="K",
                      help="the model's own first K layers (with its head) guess: no second model, but only as "
                      "good as those layers' predictions (models trained for early exit)")  # fmt: skip
    fast.add_argument("--num-assistant-tokens", type=positive, metavar="N",
                      help="the assistant guesses N tokens at most per forward of the model (default 20; it "
                      "stops earlier below 0.4 probability)")  # fmt: skip
    out = g.add_argument_group("output")
    out.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print tokens as they come (default: on in a terminal)",
    )
    out.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")

    c = sub.add_parser(
        "chat",
        help="chat with a model",
        description="Chat with a model in the terminal: each line you type is a message, the reply streams back. "
        "The conversation is written in the checkpoint's chat template (chat_template.jinja or "
        "tokenizer_config.json's chat_template) or --chat-template's; base models have none, and their chats are "
        "a plain 'User: ... / Assistant: ...' transcript whose 'User:' lines end a reply. Each turn reads only "
        "the new message: the keys and values of the conversation so far are kept. When the conversation "
        "outgrows the context, its oldest exchanges are left out (the system message stays). Sampling follows "
        "the checkpoint's generation_config.json unless given (--no-do-sample: greedy). Commands: /help, "
        "/reset, /undo, /system TEXT, /save FILE, /exit. Ctrl-C stops a reply (what came is kept). With --tools "
        "the model may call functions: each call is printed, you type its result, and the model goes on. A message "
        "of several lines: end each line but the last with a backslash, or put the message between lines of "
        'three double quotes ("""). With standard input not a terminal, each line is a message (the same two '
        "ways join lines) and only the replies are printed.",
    )
    _add_model_args(c, positional=False)
    c.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with")
    c.add_argument("--messages", metavar="FILE",
                   help="start from a saved conversation: a JSON list of {role, content} messages (as /save "
                   "writes)")  # fmt: skip
    c.add_argument("--chat-template", metavar="FILE_OR_TEMPLATE",
                   help="a Jinja chat template (a file, or the template itself) to use instead of the checkpoint's "
                   "own; without either, chats are a plain 'User: / Assistant:' transcript")  # fmt: skip
    c.add_argument("--tools", metavar="FILE",
                   help='functions the model may call: a JSON file of OpenAI\'s tools, a list of {"type": "function", '
                   '"function": {"name", "description", "parameters": JSON schema}} (or {"tools": [...]}). The '
                   "calls a reply makes are printed (to standard error) and you type each call's result as you type a "
                   "message (a line, or several joined the same two ways); the model then answers with them. Calls are read in the "
                   "chat format's tool-call format: the plain transcript lists the tools and teaches hermes; a "
                   "template's needs --tool-call-parser")  # fmt: skip
    c.add_argument("--tool-call-parser", choices=sorted(FORMATS),
                   help=f"the format the chat template's model writes tool calls in (as neolm serve's): "
                   f"{FORMATS_HELP}")  # fmt: skip
    _add_generation_args(c, chat=True)

    for module in SUBSYSTEMS:
        COMMANDS.update(importlib.import_module(module).register(sub))

    i = sub.add_parser("info", help="describe a model", description="Describe a model: family, size, dtype, context.")
    _add_model_args(i, positional=True)
    i.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _read_prompt(args, what: str = "prompt") -> str:
    if args.prompt is not None and args.prompt != "-":
        prompt = args.prompt
    elif sys.stdin is None or (sys.stdin.isatty() and args.prompt is None):
        raise NeolmError(f"no {what}: pass it as an argument or on standard input")
    else:
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise NeolmError(f"the {what} is empty")
    return prompt


def load_model(args, model: str | None = None):
    """neolm.load with the options _add_model_args declared (of `model` instead of args.model, if given)."""
    import neolm

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return neolm.load(
        model or args.model,
        revision=args.revision,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        group_size=args.group_size,
        quantize_head=args.quantize_head,
        compile=args.compile,
        native=args.native,
        quantize_activations=args.quantize_activations,
        kv_cache_dtype=args.kv_cache_dtype,
        mmap=args.mmap,
        huge_pages=args.huge_pages,
        chat_template=getattr(args, "chat_template", None),  # the commands that chat declare it
        adapter=args.adapter,
    )


def cmd_generate(args) -> int:
    prompt = _read_prompt(args)
    if args.num_return_sequences is not None and args.num_return_sequences < 1:
        raise NeolmError("--num-return-sequences must be at least 1")
    knobs = _generation_knobs(args) | ({"truncate_prompt": True} if args.truncate else {})
    if sum(map(bool, (args.assistant_model, args.prompt_lookup_num_tokens, args.assistant_early_exit))) > 1:
        raise NeolmError("give one of --assistant-model, --prompt-lookup-num-tokens and --assistant-early-exit")
    lm = load_model(args)
    echo = "" if args.no_echo else prompt
    beams = lm.generation_config(**knobs).num_beams > 1  # (the checkpoint's defaults too)
    if args.assistant_model:
        knobs["assistant_model"] = load_model(args, args.assistant_model)
    if args.stream and beams:
        raise NeolmError("--stream: beam search (--num-beams > 1) has its text only at the end")
    stream = sys.stdout.isatty() if args.stream is None else args.stream
    if stream and knobs.get("num_return_sequences", 1) == 1 and not beams:
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


CHAT_COMMANDS = """commands:
  /help          this help
  /reset         start over (the system message stays)
  /undo          take back your last message and its reply
  /system TEXT   start over with TEXT as the system message (no TEXT: none)
  /save FILE     write the conversation to FILE as JSON (--messages FILE starts from it)
  /exit          leave (or Ctrl-D)
A message that begins with / is sent as //message. Ctrl-C stops a reply; what came of it is kept.
A message of several lines: end each line but the last with \\, or put it between lines of \"\"\" (three quotes)."""
QUOTE = '"""'  # opens and closes a message of several lines


def cmd_chat(args) -> int:
    knobs = _generation_knobs(args)
    messages = _read_messages(args.messages) if args.messages else []
    if args.system is not None:  # instead of the saved conversation's system messages
        messages = [{"role": "system", "content": args.system}] + [m for m in messages if m["role"] != "system"]
    tools = _read_tools(args.tools) if args.tools else None
    lm = load_model(args)
    if args.tool_call_parser:
        lm.chat_format.tool_calls = FORMATS[args.tool_call_parser]
    if tools and lm.chat_format.tool_calls is None:
        raise NeolmError(f"--tools: {lm.chat_format.name} does not say how its model writes tool calls; name the "
                         "format with --tool-call-parser")  # fmt: skip
    if "max_new_tokens" not in knobs and not {"max_new_tokens", "max_length"} & set(lm.generation_defaults):
        knobs["max_new_tokens"] = CHAT_MAX_NEW_TOKENS
    from neolm.conversation import Conversation

    chat = Conversation(lm, messages, tools=tools, **knobs)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"neolm chat: {lm.source}, {lm.chat_format.name}. /help lists the commands; Ctrl-D or /exit leaves.",
              file=sys.stderr)  # fmt: skip
    while True:
        message = _read_message(interactive)
        if message is None:
            break
        text = message.strip()
        if text.startswith("/") and not text.startswith("//") and "\n" not in text:
            if not _chat_command(chat, text):
                break
        elif text and not _say(chat, text[1:] if text.startswith("//") else text, interactive):
            break  # (the input ended while a call waited for its result)
    return 0


def _read_line(prompt: str, interactive: bool) -> str | None:
    """A line of input without its newline; None at the end of input (Ctrl-D)."""
    if interactive:
        try:
            return input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line.removesuffix("\n") if line else None


def _read_message(interactive: bool, prompt: str = "> ") -> str | None:
    """The next message: a line; a line that ends in a backslash goes on at the next (as llama.cpp's); or the
    lines from one that starts with three double quotes to one that ends with them (as ollama's). None at the
    end of input (a message begun is sent)."""
    lines: list[str] = []
    quoted = False
    while True:
        line = _read_line("... " if lines or quoted else prompt, interactive)
        if line is None:
            return "\n".join(lines) if lines else None
        if not lines and not quoted and line.lstrip().startswith(QUOTE):
            line, quoted = line.lstrip()[len(QUOTE) :], True
            if line.rstrip().endswith(QUOTE):  # opened and closed on one line
                return line.rstrip()[: -len(QUOTE)]
            if line:
                lines.append(line)
        elif quoted:
            if line.rstrip().endswith(QUOTE):
                lines.append(line.rstrip()[: -len(QUOTE)])
                return "\n".join(lines)
            lines.append(line)
        elif line.endswith("\\"):
            lines.append(line[:-1])
        else:
            lines.append(line)
            return "\n".join(lines)


def _read_messages(path: str) -> list[dict]:
    from neolm.chat import check_messages

    try:
        with open(path, encoding="utf-8") as f:
            return check_messages(json.load(f))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise NeolmError(f"cannot read the conversation {path}: {e}") from None


def _read_tools(path: str) -> list[dict]:
    """--tools' file: OpenAI's tools, a list or {"tools": [...]}, each a function with a name."""
    from neolm.tool_calls import function_of

    try:
        with open(path, encoding="utf-8") as f:
            tools = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise NeolmError(f"cannot read the tools {path}: {e}") from None
    tools = tools.get("tools") if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not tools:
        raise NeolmError(f'{path}: the tools must be a non-empty JSON list of {{"type": "function", "function": '
                         '{"name", "description", "parameters"}} (or {"tools": [...]})')  # fmt: skip
    for i, tool in enumerate(tools):
        if not (function_of(tool) or {}).get("name"):
            raise NeolmError(f'{path}: tools[{i}] is not {{"type": "function", "function": {{"name": ..., '
                             f'"parameters": {{...}}}}}}: {json.dumps(tool)[:200]}')  # fmt: skip
    return [tool if tool.get("type") == "function" else {"type": "function", "function": tool} for tool in tools]


def _say(chat, text: str, interactive: bool) -> bool:
    """Send a message and print the reply as it streams (Ctrl-C stops it); then, while the reply calls tools, read
    each call's result and print the model's answer to them. False at the end of input."""
    try:
        pieces = chat.send(text)
    except NeolmError as e:  # e.g. a message too long for the context: the conversation goes on without it
        print(f"neolm chat: {e}", file=sys.stderr)
        return True
    while _print_reply(chat, pieces):
        for call in chat.calls():
            function = call["function"]
            print(f"[call {function['name']} {function['arguments']}]", file=sys.stderr)
            result = _read_message(interactive, f"{function['name']} result> ")
            if result is None:
                return False
            chat.add_tool_result(call["id"], result)
        try:
            pieces = chat.reply()
        except NeolmError as e:
            print(f"neolm chat: {e}", file=sys.stderr)
            return True
    return True


def _print_reply(chat, pieces) -> bool:
    """Print a reply as it streams; whether it finished with tool calls (Ctrl-C stops it: what came is kept; with
    nothing said, the message is taken back, or the empty reply to tools' results is)."""
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pieces.close()
        if chat.messages[-1]["role"] == "assistant" and not chat.messages[-1]["content"] and not chat.calls():
            chat.undo() if chat.messages[-2]["role"] == "user" else chat.messages.pop()
        print(" [stopped]", file=sys.stderr)
        return False
    sys.stdout.write("\n")
    sys.stdout.flush()
    return bool(chat.calls())


def _chat_command(chat, text: str) -> bool:
    """Run a /command; False to leave."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        print(CHAT_COMMANDS, file=sys.stderr)
    elif name == "/reset":
        chat.reset()
        print("(a new conversation)", file=sys.stderr)
    elif name == "/undo":
        removed = chat.undo()
        print(f"(took back {len(removed)} message{'s' * (len(removed) != 1)})", file=sys.stderr)
    elif name == "/system":
        chat.reset([{"role": "system", "content": arg}] if arg else [])
        print("(a new conversation" + (", with that system message)" if arg else ", with no system message)"),
              file=sys.stderr)  # fmt: skip
    elif name == "/save" and arg:
        try:
            with open(arg, "w", encoding="utf-8") as f:
                json.dump(chat.messages, f, indent=2, ensure_ascii=False)
        except OSError as e:
            print(f"neolm chat: cannot write {arg}: {e}", file=sys.stderr)
        else:
            print(f"(saved {len(chat.messages)} messages to {arg})", file=sys.stderr)
    else:
        print(f"neolm chat: unknown command {text!r}; /help lists them", file=sys.stderr)
    return True


def cmd_info(args) -> int:
    lm = load_model(args)
    info = lm.info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key + ':':<{width + 1}} {value:,}" if isinstance(value, int) else f"{key + ':':<{width + 1}} {value}")
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info}
# Larger subsystems add their own subcommands: each module has register(sub) -> {name: handler}.
SUBSYSTEMS = ("neolm.train.cli", "neolm.eval.cli", "neolm.quant.cli", "neolm.serve.cli")


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
