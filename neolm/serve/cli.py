"""`neolm serve`: a thin subcommand over neolm.serve."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from neolm.cli import _add_model_args, load_model, non_negative, non_negative_float, positive
from neolm.embedding import POOLINGS
from neolm.errors import NeolmError
from neolm.serve.engine import DEFAULT_PREFILL_CHUNK, MIN_PREFILL_CHUNK
from neolm.serve.speculation import DEFAULT_LOOKUP_MAX, Speculation, guesser
from neolm.serve.store import MAX_STORED, MAX_STORED_IN_FILE, FileStore, Store
from neolm.tool_calls import FORMATS, FORMATS_HELP


def register(sub) -> dict:
    s = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL over HTTP with OpenAI's API: POST /v1/completions and /v1/chat/completions "
        "(stream: server-sent events; logprobs, and with echo the prompt's), /v1/responses (the Responses API: "
        "stored responses continue with previous_response_id; GET and DELETE /v1/responses/ID, GET "
        "/v1/responses/ID/input_items; background responses, polled, or streamed and resumed with GET "
        "/v1/responses/ID?stream=true&starting_after=N, and POST /v1/responses/ID/cancel), /v1/conversations "
        "(OpenAI's Conversations API: conversations and their items, which responses with `conversation` read and "
        "extend), /v1/embeddings, "
        "GET /v1/models, /health and /metrics "
        "(Prometheus), and vLLM's /tokenize, /detokenize and /tokenizer_info (lm-eval's local-completions scores "
        "through them). Any OpenAI client works, e.g. "
        "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none'). Sampling fields are OpenAI's (temperature "
        "0: greedy) plus vLLM's top_k, min_tokens and repetition_penalty; structured outputs through OpenAI's "
        "response_format (json_object, json_schema) or vLLM's structured_outputs / guided_json, guided_regex, "
        "guided_choice and guided_grammar (GBNF); function calling (tools, tool_choice: auto, required, none or a "
        "named function). Sampling fields a request leaves out take the "
        "checkpoint's generation_config.json values, else OpenAI's defaults (temperature 1: sampling). Requests are "
        "batched continuously: one that arrives while others decode joins them at the next step, whatever its "
        "settings, and gets the tokens it would get alone. A chat is written in the checkpoint's chat template "
        "(chat_template.jinja or tokenizer_config.json's chat_template, rendered as transformers' "
        "apply_chat_template does) or --chat-template's; base models have none, and their chats are written as a "
        "plain 'User: ... / Assistant: ...' transcript. Ctrl-C stops the server; SIGTERM stops it gracefully: no "
        "new requests (the port closes; /health answers 503 on open connections), those taken are answered (within "
        "--shutdown-timeout), then it exits.",
    )
    _add_model_args(s, positional=True)
    net = s.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    net.add_argument("--port", type=non_negative, default=8000, help="port (default 8000; 0: any free one)")
    net.add_argument("--served-model-name", help="the model's name in the API (default: MODEL as given)")
    _add_lora_modules(net, "a request whose `model` is NAME")
    net.add_argument("--allow-runtime-lora-updating", action="store_true",
                     help="open vLLM's POST /v1/load_lora_adapter ({\"lora_name\": ..., \"lora_path\": ...}) and "
                     "/v1/unload_lora_adapter ({\"lora_name\": ...}) to add and remove adapters while serving (vLLM: "
                     "VLLM_ALLOW_RUNTIME_LORA_UPDATING); an adapter is unloaded only once no request names it. "
                     "With --api-key, they need the key too")  # fmt: skip
    net.add_argument("--embedding-pooling", choices=POOLINGS, default="last",
                     help="how POST /v1/embeddings pools a text's final hidden states into its vector: the last "
                     "token's (default, as vLLM embeds with a causal LM) or their mean; L2-normalised either "
                     "way")  # fmt: skip
    net.add_argument("--allowed-origins", nargs="*", default=["*"], metavar="ORIGIN",
                     help="web pages (origins such as https://example.org) whose scripts may call the API, by CORS "
                     "headers (default: * for any, as vLLM's; the option with no origins: none)")  # fmt: skip
    net.add_argument("--api-key", default=os.environ.get("NEOLM_API_KEY"),
                     help="require 'Authorization: Bearer KEY' (default: $NEOLM_API_KEY; unset: no key)")  # fmt: skip
    net.add_argument("--chat-template", metavar="FILE_OR_TEMPLATE",
                     help="a Jinja chat template (a file, or the template itself) to use instead of the checkpoint's "
                     "own; without either, chats are a plain 'User: / Assistant:' transcript")  # fmt: skip
    _add_tool_call_parser(net)
    net.add_argument("--shutdown-timeout", type=non_negative_float, metavar="SECONDS",
                     help="on SIGTERM, answer the requests taken for at most this long, then end those left (a "
                     "whole answer gets 503, a stream an error event) and exit (default: as long as they take). Set "
                     "it below the orchestrator's kill deadline (Kubernetes' terminationGracePeriodSeconds, 30 by "
                     "default; docker stop's 10) so that every client gets an answer or an error, not a cut "
                     "connection; 0 ends them at once")  # fmt: skip
    net.add_argument("--responses-store", metavar="FILE",
                     help="keep stored /v1/responses (store: true, the default) and /v1/conversations in this SQLite "
                     "file, created if absent, so that previous_response_id, conversations, GET and background "
                     "responses outlive a restart or a "
                     "crash (a background response still running when the server stopped is 'failed' at the next "
                     "start); default: in memory, lost when the server stops")  # fmt: skip
    net.add_argument("--max-stored-responses", type=positive, metavar="N",
                     help=f"stored responses kept, and conversations, the least recently used of each dropped "
                     f"beyond (default {MAX_STORED:,} in "
                     f"memory, {MAX_STORED_IN_FILE:,} with --responses-store)")  # fmt: skip
    net.add_argument("--max-batch", type=positive, default=8, help="sequences decoded together at most (default 8)")
    net.add_argument("--prefill-chunk", type=non_negative, default=DEFAULT_PREFILL_CHUNK, metavar="TOKENS",
                     help="while sequences decode, read a joining prompt at most this many tokens a step, so that a "
                     f"long prompt delays the running sequences' next tokens by one chunk's forward, not its whole "
                     f"(default {DEFAULT_PREFILL_CHUNK}; at least {MIN_PREFILL_CHUNK}; 0: whole prompts). Chunks give "
                     "the same tokens as one forward")  # fmt: skip
    _add_speculative_config(net)
    net.add_argument("--prefix-cache", type=non_negative, default=0, metavar="MB",
                     help="keep the keys and values of finished sequences, up to MB megabytes, so that a prompt "
                     "that begins with one (a chat's next turn resends the conversation; a system prompt or few-shot "
                     "context shared by requests, even ones that run at once) "
                     "reads only the rest, as vLLM's prefix caching (default 0: off). Outputs are then a rounding "
                     "away from a request alone: tokens can differ at near-ties")  # fmt: skip

    b = sub.add_parser(
        "batch",
        help="answer a file of OpenAI batch requests offline",
        description="Answer every request of INPUT, a file in OpenAI's Batch format (JSONL, a request a line: "
        '{"custom_id": ..., "method": "POST", "url": "/v1/completions", "/v1/chat/completions" or "/v1/responses", '
        '"body": {...}}), '
        "as `neolm serve` would, batched continuously in this process (vLLM's run_batch). Each answer is appended "
        "to OUTPUT as its request ends, in OpenAI's batch output format ({custom_id, response: {status_code, body}, "
        "error}); a request the server would refuse gets its error there and the others go on. A crash or Ctrl-C "
        "loses only the requests in flight: --resume skips the custom_ids OUTPUT already holds. Prints a summary.",
    )
    b.add_argument("input", metavar="INPUT", help="the requests (JSONL)")
    b.add_argument("output", metavar="OUTPUT", help="where the answers go (JSONL; appended to with --resume)")
    _add_model_args(b)
    run = b.add_argument_group("batch")
    run.add_argument("--resume", action="store_true", help="OUTPUT exists: skip the requests it answers, add the rest")
    run.add_argument("--served-model-name", help="the model's name in the answers (default: MODEL as given)")
    _add_lora_modules(run, "a request whose body's `model` is NAME (with adapters, a request naming neither MODEL's "
                      "name nor an adapter's is refused; without, `model` is not read)")  # fmt: skip
    run.add_argument("--chat-template", metavar="FILE_OR_TEMPLATE",
                     help="a Jinja chat template to use instead of the checkpoint's own (as neolm serve)")  # fmt: skip
    _add_tool_call_parser(run)
    run.add_argument("--max-batch", type=positive, default=8, help="sequences decoded together at most (default 8)")
    run.add_argument("--prefill-chunk", type=non_negative, default=DEFAULT_PREFILL_CHUNK, metavar="TOKENS",
                     help=f"prompt tokens read a step while sequences decode (default {DEFAULT_PREFILL_CHUNK}; as "
                     "neolm serve)")  # fmt: skip
    _add_speculative_config(run)
    return {"serve": cmd_serve, "batch": cmd_batch}


def _add_speculative_config(group) -> None:
    group.add_argument("--speculative-config", metavar="JSON",
                       help="speculative decoding, as vLLM's: '{\"method\": \"ngram\", \"num_speculative_tokens\": 5, "
                       "\"prompt_lookup_max\": 4}' guesses from n-grams of the prompt and text so far (prompt_lookup_min "
                       f"default 1, _max {DEFAULT_LOOKUP_MAX}); '{{\"model\": \"EleutherAI/pythia-70m\", "
                       "\"num_speculative_tokens\": 4}' from a smaller draft model (loaded with MODEL's --dtype and "
                       "--quantize; another tokenizer guesses through text). The model checks a round's guesses in one "
                       "forward, so each kept guess saves a step. Rounds run while one sequence decodes (then reading "
                       "the weights bounds each step) and while they pay (each sequence times its rounds against "
                       "its plain steps); batches of several step as without. Greedy requests keep their "
                       "tokens (a near-tie can round the other way), sampled ones their distribution; seeded ones "
                       "never speculate. /metrics counts guesses and those kept")  # fmt: skip


def _add_lora_modules(group, who: str) -> None:
    group.add_argument("--lora-modules", nargs="+", type=lora_module, default=[], metavar="NAME=PATH",
                       help="LoRA adapters in PEFT's format (a folder or hub id with adapter_config.json) held beside "
                       f"the weights, unmerged (as vLLM's --lora-modules; also its JSON form '{{\"name\": ..., "
                       f"\"path\": ...}}'): {who} runs with that adapter, in one batch with requests for the base "
                       "model and other adapters (decoding at the base model's speed, within noise: bench/LORA.md; "
                       "--adapter merges one into the weights instead)")  # fmt: skip


def _add_tool_call_parser(group) -> None:
    group.add_argument("--tool-call-parser", choices=sorted(FORMATS),
                       help="the format the chat template's model writes tool calls in, so that tool_choice \"auto\" "
                       "(OpenAI's default with tools) reads them from its replies into tool_calls, as vLLM's "
                       f"--enable-auto-tool-choice --tool-call-parser: {FORMATS_HELP}. The plain "
                       "transcript lists the tools itself and teaches hermes (default with it: hermes); without a "
                       "parser a template's \"auto\" requests are refused, \"required\" and named calls "
                       "work")  # fmt: skip


def lora_module(text: str) -> tuple[str, str]:
    """--lora-modules' NAME=PATH, or vLLM's JSON {"name": ..., "path": ...}."""
    if text.lstrip().startswith("{"):
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e.msg})") from None
        name, path = (item.get("name"), item.get("path")) if isinstance(item, dict) else (None, None)
    else:
        name, _, path = text.partition("=")
    if not isinstance(name, str) or not isinstance(path, str) or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"takes NAME=PATH (or {{\"name\": ..., \"path\": ...}}), got {text!r}")
    return name.strip(), path.strip()


def _load(args):
    """The model, its adapters (--lora-modules) loaded, its name in the API, and --speculative-config (read, and as
    the engine's guesser)."""
    from neolm.api import DEFAULT_MODEL_NAME

    name = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    names = [n for n, _ in args.lora_modules]
    clash = sorted({n for n in names if names.count(n) > 1 or n == name})
    if clash:
        raise NeolmError(f"--lora-modules: each adapter needs a name of its own, not the model's ({name!r}) or "
                         f"another adapter's: {', '.join(clash)}")  # fmt: skip
    spec = Speculation.parse(args.speculative_config) if args.speculative_config else None  # (before the slow load)
    lm = load_model(args)
    guess = None
    if spec is not None:
        # (the draft is loaded as MODEL is, but without MODEL's merged --adapter)
        draft = load_model(argparse.Namespace(**{**vars(args), "adapter": None}), spec.model) if spec.model else None
        guess = guesser(spec, lm, draft)
    if args.tool_call_parser:
        lm.chat_format.tool_calls = FORMATS[args.tool_call_parser]
    for adapter, path in args.lora_modules:
        lm.load_adapter(path, adapter)
    lm.disable_adapters()  # a request names its adapter; the base model's run without
    return lm, name, spec, guess


def _tell_speculation(command: str, spec: Speculation | None) -> None:
    if spec is not None:
        print(f"neolm {command}: speculative decoding while one sequence decodes: {spec.describe()}", file=sys.stderr,
              flush=True)  # fmt: skip


def _store(args) -> Store:
    """Where stored responses are kept: --responses-store's file, else memory."""
    if args.responses_store is None:
        return Store(args.max_stored_responses or MAX_STORED)
    return FileStore(args.responses_store, args.max_stored_responses or MAX_STORED_IN_FILE)


def cmd_serve(args) -> int:
    from neolm.serve.http import Server

    store = _store(args)  # (a file that cannot be used: refused before the slow load)
    lm, name, spec, guess = _load(args)
    server = Server(lm, args.host, args.port, name, args.api_key, args.max_batch, args.prefill_chunk, args.prefix_cache,
                    args.allow_runtime_lora_updating, args.allowed_origins, args.embedding_pooling, store,
                    guess)  # fmt: skip
    host, port = server.server_address[:2]

    def on_sigterm(signum, frame) -> None:  # a graceful stop (docker stop, systemd, Kubernetes); again: at once
        if server.draining:
            raise KeyboardInterrupt
        limit = "" if args.shutdown_timeout is None else f" for at most {args.shutdown_timeout:g} s"
        print(f"neolm serve: SIGTERM: answering the {server.answering} requests taken{limit}, then stopping (another "
              "SIGTERM or Ctrl-C stops at once)", file=sys.stderr, flush=True)  # fmt: skip
        threading.Thread(target=server.drain, args=(args.shutdown_timeout,), name="neolm-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    print(f"neolm serve: {server.model_name} on http://{host}:{port}/v1 (Ctrl-C stops; SIGTERM finishes the requests "
          "taken, then stops)", file=sys.stderr, flush=True)  # fmt: skip
    _tell_speculation("serve", spec)
    try:
        server.run()
    except KeyboardInterrupt:
        print("neolm serve: stopped", file=sys.stderr)
        return 0
    stopped = server.engine.stopped
    ended = (f"; --shutdown-timeout ended {stopped} request{'s' * (stopped != 1)} unanswered" if stopped
             else ", every request answered" if server.draining else "")  # fmt: skip
    print("neolm serve: stopped" + ended, file=sys.stderr)
    return 0


def cmd_batch(args) -> int:
    from tqdm import tqdm

    from neolm.serve.batch import answered, read_requests, run
    from neolm.serve.engine import Engine

    lines = read_requests(args.input)  # (checked before the slow load)
    done: set[str] = set()
    if os.path.exists(args.output):
        if not args.resume:
            raise NeolmError(f"{args.output} exists: --resume adds the requests it lacks, or give another OUTPUT")
        done = answered(args.output)
    todo = [line for line in lines if line.custom_id not in done]
    if done:
        print(f"neolm batch: {len(lines) - len(todo)} of {len(lines)} requests already answered in {args.output}",
              file=sys.stderr)  # fmt: skip
    if not todo:
        return 0
    lm, name, spec, guess = _load(args)
    engine = Engine(lm, args.max_batch, args.prefill_chunk, guesser=guess)
    _tell_speculation("batch", spec)
    with tqdm(total=len(todo), unit="req", desc="batch", disable=not sys.stderr.isatty()) as bar:
        summary = run(lm, todo, args.output, name, engine, lambda record: bar.update())
    rate = summary.completion_tokens / summary.seconds if summary.seconds else 0.0
    errors = ", ".join(f"{n} {code}" for code, n in sorted(summary.errors.items()))
    print(f"neolm batch: {summary.requests} request{'s' * (summary.requests != 1)} answered in {summary.seconds:.1f}s "
          f"({summary.completion_tokens:,} tokens, {rate:,.1f} tokens/s), {summary.failed} failed"
          + (f" ({errors})" if errors else "") + f"; answers in {args.output}", file=sys.stderr)  # fmt: skip
    return 0
