"""OpenAI's completion and chat completion requests, read into neolm's terms, and the responses written back.

What the fields mean is OpenAI's: `temperature` 0 is greedy (default 1: sampling), `top_p`, `n`, `stop` (kept out of
the text, as OpenAI does), `seed`, `max_tokens` (completions: default 16; chat: up to the end of the context;
`max_completion_tokens` is its newer name), `echo` (completions), `stream` with `stream_options.include_usage`,
`best_of` (completions: that many sampled, the `n` with the highest mean log-probability per token returned, as
OpenAI ranks them; not streamed; usage counts them all), `presence_penalty` and `frequency_penalty` (over the tokens
generated so far, as vLLM), `logit_bias` (token id -> bias, added to the logits before any other processing). vLLM's
extra sampling fields are taken too: `top_k`, `min_p`, `min_tokens`, `repetition_penalty`, `stop_token_ids` (more
tokens that end a choice as eos does), `ignore_eos`, `include_stop_str_in_output`, `allowed_token_ids` (the only
tokens that may be generated), `bad_words` (strings never generated, alone or after a space),
`truncate_prompt_tokens` (keep the prompt's last k) and `use_beam_search` with `length_penalty` (beam search of `n`
beams, the `n` best hypotheses answered, best first: neolm.beam, transformers' algorithm under vLLM's fields; no
sampling field goes with it). Structured outputs (neolm.structured): OpenAI's `response_format` ({"type":
"json_object"}, or "json_schema" with `json_schema.schema`), vLLM's `structured_outputs` ({"json" | "regex" |
"choice" | "grammar": ...}) and its older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (GBNF)
with `guided_whitespace_pattern`. Chat's `tools` and `tool_choice`: serve/tools.py. Fields neolm cannot honour
(suffix, the deprecated functions, ...) are refused with a 400 that says so rather than ignored; unknown fields
likewise.

Log-probabilities: completions' `logprobs` (k, at most 20) gives each token's log-probability, its text
offset and the k most likely tokens plus the chosen one (as vLLM); with `echo`, the prompt's tokens too, the
first with none (the scoring request lm-evaluation-harness's `local-completions` sends). Chat's `logprobs`
true with `top_logprobs` (k) gives OpenAI's `content` list. They are the model's own (the log-softmax of its
logits before temperature, top-k/top-p and repetition penalty, as vLLM reports by default) and cover every
generated token, a stop string's included.
Fields sent as null count as absent. Sampling fields left out take the checkpoint's generation_config.json
values where it has them (as vLLM does), else OpenAI's defaults.

A chat is written in the model's chat format (neolm.chat): its chat template where the checkpoint has one
(or `neolm serve --chat-template`), rendered as transformers' apply_chat_template does, with vLLM's
`add_generation_prompt` (default true), `continue_final_message` (the reply goes on with the final message,
a reply begun for the model, say) and `chat_template_kwargs` fields; else, for base models, a plain
transcript that they continue well: the system message, then one "User: ..." / "Assistant: ..." line per
message, then "Assistant:"; the reply stops where the model starts a new "User:" line.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from neolm.errors import NeolmError
from neolm.generation_config import GenerationConfig
from neolm.serve import tools
from neolm.serve.errors import ApiError
from neolm.structured import check_spec
from neolm.tokenizer import StreamDecoder

MAX_LOGPROBS = 20  # the most alternatives per token a request may ask for (vLLM's default limit; OpenAI: 5 and 20)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's (and vLLM's) default max_tokens for /v1/completions

SAMPLING = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
            "top_k", "min_tokens", "repetition_penalty", "user", "presence_penalty", "frequency_penalty",
            "logprobs", "logit_bias", "min_p",
            "stop_token_ids", "ignore_eos", "include_stop_str_in_output", "allowed_token_ids", "bad_words",
            "truncate_prompt_tokens", "response_format", "structured_outputs", "guided_json", "guided_regex",
            "guided_choice", "guided_grammar", "guided_whitespace_pattern", "guided_decoding_backend",
            "use_beam_search", "length_penalty"}  # fmt: skip
FIELDS = {
    "completion": SAMPLING | {"prompt", "echo", "best_of", "suffix"},
    "chat": SAMPLING | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                        "function_call", "parallel_tool_calls", "add_generation_prompt",
             "chat_template_kwargs", "continue_final_message"},
}  # fmt: skip


@dataclass
class Request:
    """A request in neolm's terms: prompts as token ids, generation arguments, and how to answer."""

    kind: str  # "completion" or "chat"
    prompts: list[list[int]]
    gc: GenerationConfig | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    echo: list[str] = field(default_factory=list)  # completions with echo: each prompt's text, put before its choices
    stop: list[str] = field(default_factory=list)  # cut from the text (OpenAI leaves stop strings out)
    lstrip: bool = False  # leave out the reply's leading whitespace (chats in the plain transcript)
    n: int = 1  # choices per prompt in the answer: the best n of gc.num_return_sequences (best_of) when more
    logprobs: int | None = None  # alternatives per token when log-probabilities are asked for
    prompt_logprobs: bool = False  # and of the prompt's tokens too (completions with echo)
    tool_choice: tools.ToolChoice | None = None  # chat: the reply is answered as tool calls (serve/tools.py)
    id: str = ""
    created: int = 0

    @property
    def ranked(self) -> bool:
        """best_of: more sequences are sampled than answered, the best by their tokens' log-probabilities."""
        return self.gc.num_return_sequences > self.n


def field_of(body: dict, name: str, kinds: tuple, default=None, check=None, requirement: str = ""):
    """body[name] if it is of one of `kinds` (bool counts only where asked for) and passes `check`, `default` when
    absent or null; else ApiError naming the field."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__.replace("str", "string").replace("int", "integer").replace("float", "number")
                            for k in kinds)  # fmt: skip
        raise ApiError(400, f"'{name}' must be {'an' if names[0] in 'aeiou' else 'a'} {names}, got {value!r}", name)
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' must be {requirement}, got {value!r}", name)
    return value


class ContextFull(ApiError):
    """A chat whose prompt fills the model's whole context (the Responses API's truncation "auto" shortens it)."""


def known_fields(body, fields: set[str]) -> None:
    """ApiError unless the body is a JSON object whose fields (those not null) are among `fields`."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(k for k, v in body.items() if k not in fields and v is not None)
    if unknown:
        raise ApiError(400, f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])


def known_params(query: dict[str, list[str]], params: set[str]) -> None:
    """ApiError unless a URL's query parameters (urllib.parse.parse_qs's) are among `params`."""
    unknown = sorted(set(query) - params)
    if unknown:
        raise ApiError(400, f"unknown query parameters: {', '.join(unknown)}", unknown[0])


def _refuse(body: dict, kind: str) -> None:
    known_fields(body, FIELDS[kind])
    unsupported = {
        "suffix": "not supported (no insertion)",
        "functions": "functions (deprecated) are not supported: use tools",
        "function_call": "functions (deprecated) are not supported: use tools and tool_choice",
    }
    for name, why in unsupported.items():
        if body.get(name) not in (None, False, 0, 0.0, {}, [], "none"):
            raise ApiError(400, f"'{name}': {why}", name)


def _sampling(body: dict, max_tokens: int | None, defaults: dict) -> dict:
    """GenerationConfig arguments. A sampling field the request leaves out takes the checkpoint's value (its
    generation_config.json, as vLLM does), else OpenAI's default: sampling at temperature 1, no top-k."""
    temperature = field_of(body, "temperature", (int, float), None, lambda v: v >= 0, ">= 0 (0: greedy)")
    if temperature is None:
        sample = defaults.get("do_sample", True)
        temperature = defaults.get("temperature", 1.0) if sample else 0
    sample = temperature > 0
    top_p = field_of(body, "top_p", (int, float), defaults.get("top_p", 1.0), lambda v: 0 < v <= 1, "in (0, 1]")
    top_k = field_of(body, "top_k", (int,), defaults.get("top_k") or 0, lambda v: v >= -1, ">= 0 (0 or -1: off)")
    n = field_of(body, "n", (int,), 1, lambda v: 1 <= v <= 128, "between 1 and 128")
    seed = field_of(body, "seed", (int,), None, lambda v: 0 <= v < 2**63, "between 0 and 2**63 - 1")
    penalty = field_of(body, "repetition_penalty", (int, float), defaults.get("repetition_penalty", 1.0),
                     lambda v: v > 0, "> 0")  # fmt: skip
    min_tokens = field_of(body, "min_tokens", (int,), 0, lambda v: v >= 0, ">= 0")
    presence, frequency = (field_of(body, name, (int, float), 0.0, lambda v: -2 <= v <= 2, "between -2 and 2")
                           for name in ("presence_penalty", "frequency_penalty"))  # fmt: skip
    min_p = field_of(body, "min_p", (int, float), defaults.get("min_p") or 0.0, lambda v: 0 <= v <= 1, "in [0, 1]")
    length_penalty = field_of(body, "length_penalty", (int, float), 1.0, math.isfinite, "a finite number")
    common = dict(max_new_tokens=max_tokens, min_new_tokens=min_tokens, repetition_penalty=float(penalty),
                  presence_penalty=float(presence), frequency_penalty=float(frequency))  # fmt: skip
    if field_of(body, "use_beam_search", (bool,), False):
        return common | _beam_search(body, n, float(length_penalty)) | {"sequence_bias": _logit_bias(body)}
    if length_penalty != 1.0:
        raise ApiError(400, "'length_penalty' scores beam search's hypotheses: set 'use_beam_search' too",
                       "length_penalty")  # fmt: skip
    if n > 1 and not sample:
        raise ApiError(400, "'n' > 1 needs sampling: greedy decoding (temperature 0) gives n identical choices", "n")
    best_of = field_of(body, "best_of", (int,), n, lambda v: n <= v <= 128, f"between n ({n}) and 128")
    if best_of > 1 and not sample:
        raise ApiError(400, "'best_of' > 1 needs sampling: greedy decoding (temperature 0) gives one completion",
                       "best_of")  # fmt: skip
    return common | dict(
        do_sample=sample, temperature=float(temperature) if sample else 1.0, top_p=float(top_p) if sample else 1.0,
        top_k=max(top_k, 0) if sample else None, num_return_sequences=best_of, seed=seed,
        min_p=float(min_p) if sample and min_p else None, sequence_bias=_logit_bias(body), num_beams=1,
    )  # fmt: skip


def _beam_search(body: dict, n: int, length_penalty: float) -> dict:
    """GenerationConfig arguments of vLLM's use_beam_search: n beams, the n best hypotheses answered (best first),
    scored by the model's log-probabilities (temperature 1 or 0; no sampling field may be set)."""
    for name, off in (("temperature", (0, 1)), ("top_p", (1,)), ("top_k", (0, -1)), ("min_p", (0,)), ("seed", ())):
        if body.get(name) is not None and body[name] not in off:
            raise ApiError(400, f"beam search (use_beam_search) chooses without sampling: leave out '{name}'", name)
    if body.get("best_of") not in (None, n):
        raise ApiError(400, "beam search (use_beam_search) answers the n best of n beams: leave out 'best_of'",
                       "best_of")  # fmt: skip
    return dict(do_sample=False, num_beams=n, num_return_sequences=n, length_penalty=length_penalty)


def _logit_bias(body: dict) -> dict | None:
    """OpenAI's logit_bias {"token id": bias in [-100, 100]}, added to those tokens' logits at every step, as
    a GenerationConfig's sequence_bias of one-token sequences."""
    bias = field_of(body, "logit_bias", (dict,), None)
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(key, str) and key.isdigit() and number and -100 <= value <= 100):
            raise ApiError(400, f"'logit_bias' maps token ids to numbers between -100 and 100, got {key!r}: {value!r}",
                           "logit_bias")  # fmt: skip
        out[(int(key),)] = float(value)
    return out


@dataclass(frozen=True)
class AllowedTokens:
    """vLLM's allowed_token_ids as a prefix_allowed_tokens_fn: these ids and no others, at every step. (Equal
    lists compare equal, so requests with the same ones are processed together.)"""

    ids: tuple[int, ...]

    def __call__(self, batch_id: int, input_ids) -> list[int]:
        return list(self.ids)


def _token_ids(body: dict, name: str, vocab: int) -> list[int]:
    ids = field_of(body, name, (list,), [])
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise ApiError(400, f"'{name}' must be a list of token ids between 0 and {vocab - 1}, got {ids!r}"[:300], name)
    return ids


def _vllm_extras(body: dict, lm) -> dict:
    """GenerationConfig arguments of vLLM's stop_token_ids, ignore_eos, allowed_token_ids and bad_words (the word's
    tokens alone and after a space, as vLLM bans them)."""
    vocab = lm.config.vocab_size
    out = {}
    stop_ids = _token_ids(body, "stop_token_ids", vocab)
    if stop_ids or field_of(body, "ignore_eos", (bool,), False):
        eos = [] if body.get("ignore_eos") else lm.generation_config().eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        out["eos_token_id"] = eos + [t for t in stop_ids if t not in eos]
    allowed = _token_ids(body, "allowed_token_ids", vocab)
    if "allowed_token_ids" in body and body["allowed_token_ids"] is not None and not allowed:
        raise ApiError(400, "'allowed_token_ids' must not be empty", "allowed_token_ids")
    if allowed:
        out["prefix_allowed_tokens_fn"] = AllowedTokens(tuple(sorted(set(allowed))))
    words = field_of(body, "bad_words", (list,), [])
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise ApiError(400, f"'bad_words' must be a list of non-empty strings, got {words!r}"[:300], "bad_words")
    banned = []
    for word in words:
        for ids in (lm.encode(word.strip()), lm.encode(" " + word.strip())):
            if ids not in banned:
                banned.append(ids)
    if banned:
        out["bad_words_ids"] = banned
    return out


def _structured(body: dict) -> dict:
    """GenerationConfig's structured_outputs (neolm.structured) from OpenAI's response_format (json_object,
    json_schema) or vLLM's structured_outputs / guided_json, guided_regex, guided_choice: {} when none is asked."""
    specs = {}  # request field -> spec
    response_format = field_of(body, "response_format", (dict,), None)
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "json_object":
            specs["response_format"] = {"json_object": True}
        elif kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            if not isinstance(schema, (dict, bool)):
                raise ApiError(400, "'response_format' of type json_schema needs json_schema.schema, a JSON schema",
                               "response_format")  # fmt: skip
            specs["response_format"] = {"json": schema}
        elif kind != "text":
            raise ApiError(400, f"'response_format': type must be text, json_object or json_schema, got {kind!r}",
                           "response_format")  # fmt: skip
    guided = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
    for name, key in guided.items():
        if body.get(name) is not None:
            specs[name] = {key: body[name]}
    if body.get("structured_outputs") is not None:
        specs["structured_outputs"] = field_of(body, "structured_outputs", (dict,))
    if len(specs) > 1:
        raise ApiError(400, f"ask for one structured output, got {', '.join(specs)}", list(specs)[1])
    if not specs:
        return {}
    name, spec = next(iter(specs.items()))
    whitespace = field_of(body, "guided_whitespace_pattern", (str,), None)
    if whitespace is not None:
        spec = {**spec, "whitespace_pattern": whitespace}
    try:
        check_spec(spec)
    except NeolmError as e:
        raise ApiError(400, f"'{name}': {e}", name) from None
    return {"structured_outputs": spec}


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of them, got {stop!r}", "stop")
    return stops


def _max_tokens(body: dict, name: str, default):
    return field_of(body, name, (int,), default, lambda v: v >= 0, ">= 0")


def _stream(body: dict) -> tuple[bool, bool]:
    stream = field_of(body, "stream", (bool,), False)
    options = field_of(body, "stream_options", (dict,), {})
    if options and not stream:
        raise ApiError(400, "'stream_options' needs 'stream': true", "stream_options")
    return stream, bool(options.get("include_usage"))


def prompts(body: dict, encode, name: str = "prompt") -> tuple[list[list[int]], list[str] | None]:
    """body[name] in OpenAI's prompt forms (a string, a list of strings, a list of token ids, or a list of such
    lists) as token id lists, and the texts if given as text."""
    prompt = body.get(name)
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt], None
    elif (
        isinstance(prompt, list) and prompt
        and all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt)
    ):  # fmt: skip
        return prompt, None
    else:
        raise ApiError(400, f"'{name}' must be a string, a list of strings, a list of token ids or a list of "
                       f"such lists, got {prompt!r}"[:300], name)  # fmt: skip
    return [encode(t) for t in texts], texts


def _chat_text(body: dict, lm, functions: list[dict] | None) -> str:
    """The conversation in the model's chat format (its template, else the plain transcript): answered (vLLM's
    add_generation_prompt, default true), or continued (continue_final_message, which turns the default off)."""
    kwargs = field_of(body, "chat_template_kwargs", (dict,), {})
    go_on = field_of(body, "continue_final_message", (bool,), False)
    add = field_of(body, "add_generation_prompt", (bool,), not go_on)
    if add and go_on:
        raise ApiError(400, "'continue_final_message' and 'add_generation_prompt' cannot both be true",
                       "continue_final_message")  # fmt: skip
    try:
        return lm.chat_format.render(body.get("messages"), add, go_on, **(kwargs | ({"tools": functions} if functions
                                                                                   else {})))  # fmt: skip
    except NeolmError as e:
        raise ApiError(400, str(e), "messages") from None


def parse(kind: str, body, lm) -> Request:
    """Read an OpenAI request body (parsed JSON) of `kind` ("completion" or "chat") for `lm`; ApiError if bad."""
    _refuse(body, kind)
    stream, include_usage = _stream(body)
    stops = _stops(body)
    request = Request(kind, [], None, stream, include_usage, stop=stops, id=f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-"
                      f"{uuid.uuid4().hex}", created=int(time.time()))  # fmt: skip
    context = lm.config.n_positions
    structured = {}
    if kind == "chat":
        functions, request.tool_choice, structured = tools.parse(body, lm.chat_format.tool_calls)
        prompt = lm.encode(_chat_text(body, lm, functions))
        max_tokens = _max_tokens(body, "max_completion_tokens", _max_tokens(body, "max_tokens", None))
        if max_tokens is None:
            max_tokens = max(context - len(prompt), 0)  # to the end of the context, as OpenAI's default
            if max_tokens == 0:
                raise ContextFull(400, f"the conversation is {len(prompt)} tokens, the model's whole context of "
                                  f"{context}: no room for a reply", "messages")  # fmt: skip
        request.prompts = [prompt]
        request.stop = stops + list(lm.chat_format.stop)
        request.lstrip = lm.chat_format.lstrip_reply and not body.get("continue_final_message")
        top = field_of(
            body, "top_logprobs", (int,), None, lambda v: 0 <= v <= MAX_LOGPROBS, f"between 0 and {MAX_LOGPROBS}"
        )
        if field_of(body, "logprobs", (bool,), False):
            request.logprobs = top or 0
        elif top is not None:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        request.prompts, texts = prompts(body, lm.encode)
        max_tokens = _max_tokens(body, "max_tokens", DEFAULT_COMPLETION_TOKENS)
        request.logprobs = field_of(body, "logprobs", (int,), None, lambda v: 0 <= v <= MAX_LOGPROBS,
                                  f"between 0 and {MAX_LOGPROBS}")  # fmt: skip
        if field_of(body, "echo", (bool,), False):
            request.echo = texts if texts is not None else [lm.decode(p) for p in request.prompts]
            request.prompt_logprobs = request.logprobs is not None
    keep = field_of(body, "truncate_prompt_tokens", (int,), None, lambda v: v >= 1, ">= 1")
    if keep is not None and any(len(p) > keep for p in request.prompts):  # vLLM's: only the last `keep` tokens
        request.prompts = [p[-keep:] for p in request.prompts]
        if request.echo:
            request.echo = [lm.decode(p) for p in request.prompts]
    asked = _structured(body)
    if asked and structured:
        raise ApiError(400, "tool_choice already holds the reply to a schema: leave out response_format and the "
                       "structured output fields", "tool_choice")  # fmt: skip
    generation = _sampling(body, max_tokens, lm.generation_defaults) | _vllm_extras(body, lm) | (asked or structured)
    request.n = body.get("n") or 1
    generation["stop_strings"] = request.stop or None
    if field_of(body, "include_stop_str_in_output", (bool,), False):  # end at them, but keep them in the text
        request.stop = list(lm.chat_format.stop) if kind == "chat" else []
    try:
        request.gc = lm.generation_config(**generation)
    except NeolmError as e:
        raise ApiError(400, str(e)) from None
    if request.gc.bos_token_id is not None:  # an empty prompt is a document's start (OpenAI's completions)
        request.prompts = [p or [request.gc.bos_token_id] for p in request.prompts]
    if request.gc.num_beams > 1 and request.prompt_logprobs:
        raise ApiError(400, "beam search (use_beam_search) gives no log-probabilities of the prompt: leave out 'echo' "
                       "or 'logprobs'", "echo")  # fmt: skip
    if request.ranked and stream:
        raise ApiError(400, "'best_of' cannot be streamed: the best completions are known only at the end", "best_of")
    return request


def tokenize(body, lm) -> dict:
    """vLLM's POST /tokenize: {"prompt": text} or {"messages": [...], "tools": [...]} (the chat's prompt) -> token ids.
    GPT-2 and NeoX tokenizers add no special tokens, so add_special_tokens changes nothing."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - {"model", "prompt", "messages", "tools", "add_special_tokens", "add_generation_prompt",
                                  "continue_final_message", "chat_template_kwargs", "return_token_strs"})  # fmt: skip
    if unknown:
        raise ApiError(400, f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    if "messages" in body:  # with its tools, the prompt a chat request with them reads
        text = _chat_text(body, lm, tools.parse(body | {"tool_choice": "none"}, None)[0] if body.get("tools") else None)
    else:
        text = field_of(body, "prompt", (str,), None)
        if text is None:
            raise ApiError(400, "give 'prompt' (a string) or 'messages'", "prompt")
    tokens = lm.encode(text)
    out = {"count": len(tokens), "max_model_len": lm.config.n_positions, "tokens": tokens, "token_strs": None}
    if field_of(body, "return_token_strs", (bool,), False):
        out["token_strs"] = [_token_text(lm.tokenizer, t)[0] for t in tokens]
    return out


def detokenize(body, lm) -> dict:
    """vLLM's POST /detokenize: {"tokens": [ids]} -> {"prompt": text}."""
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ApiError(400, f"'tokens' must be a list of token ids, got {tokens!r}"[:300], "tokens")
    vocab = lm.config.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the model's vocabulary of {vocab}", "tokens")
    return {"prompt": lm.decode(tokens)}


def tokenizer_info(lm) -> dict:
    """vLLM's GET /tokenizer_info (what lm-evaluation-harness's remote tokenizer reads)."""
    tokenizer = lm.tokenizer
    eos = tokenizer.eos_token_id
    eos_text = tokenizer.token_bytes(eos).decode("utf-8", "replace") if eos is not None else None
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_text, "bos_token": eos_text,
            "pad_token": None, "model_max_length": lm.config.n_positions, "vocab_size": tokenizer.vocab_size,
            "add_prefix_space": False, "chat_template": lm.chat_format.source}  # fmt: skip


@dataclass(frozen=True)
class Logprob:
    """One token's entry: its log-probability (None for a prompt's first token), its most likely alternatives
    as (token id, log p), and where its text starts in the choice's text (echoed prompt included)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]
    offset: int


def _token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text as OpenAI writes it (bytes that are not whole UTF-8 characters as "bytes:\\xNN..."),
    and its bytes."""
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def logprobs(request: Request, entries: list[Logprob], tokenizer) -> dict | None:
    """A choice's (or a streamed chunk's) `logprobs` object: completions' legacy form (tokens, token_logprobs,
    top_logprobs with the chosen token among them, text_offset) or chat's `content` list."""
    if request.logprobs is None:
        return None
    if request.kind == "chat":

        def item(token: int, logprob: float) -> dict:
            text, raw = _token_text(tokenizer, token)
            return {"token": text, "logprob": logprob, "bytes": raw}

        content = [item(e.token, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
        return {"content": content, "refusal": None}
    texts, tops = [_token_text(tokenizer, e.token)[0] for e in entries], []
    for e, text in zip(entries, texts):
        top = None
        if e.logprob is not None:
            top = {_token_text(tokenizer, t)[0]: lp for t, lp in e.top}
            top.setdefault(text, e.logprob)
        tops.append(top)
    return {"tokens": texts, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
            "text_offset": [e.offset for e in entries]}  # fmt: skip


def prompt_logprobs(prompt: list[int], logprobs: list[float], top: list, tokenizer) -> list[Logprob]:
    """A prompt's entries from the log-probabilities of its tokens 1 .. n-1 and their alternatives (an
    engine.Prompt's): the first token has none."""
    decoder, offset, entries = StreamDecoder(tokenizer), 0, []
    for token, logprob, best in zip(prompt, [None, *logprobs], [(), *top]):
        entries.append(Logprob(token, logprob, best, offset))
        offset += len(decoder.push(token))
    return entries


def usage(request: Request, completion_tokens: int, cached: int = 0) -> dict:
    """Token counts; `cached`: prompt tokens taken from the prefix cache (OpenAI's prompt_tokens_details)."""
    prompt_tokens = sum(len(p) for p in request.prompts)
    counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
              "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
    return counts | ({"prompt_tokens_details": {"cached_tokens": cached}} if cached else {})


def response(request: Request, model: str, texts: list[str], reasons: list[str], completion_tokens: int,
             choice_logprobs: list[dict | None], cached: int = 0) -> dict:  # fmt: skip
    """The whole (non-streamed) answer."""
    rows = zip(texts, reasons, choice_logprobs)
    if request.kind == "chat":
        choices = []
        for i, (text, reason, lp) in enumerate(rows):
            content, calls, reason = _tool_calls(request, text, reason)
            message = {"role": "assistant", "content": content} | ({"tool_calls": calls} if calls is not None else {})
            choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
        kind = "chat.completion"
    else:
        choices = [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
                   for i, (text, reason, lp) in enumerate(rows)]  # fmt: skip
        kind = "text_completion"
    return {"id": request.id, "object": kind, "created": request.created, "model": model, "choices": choices,
            "usage": usage(request, completion_tokens, cached)}  # fmt: skip


def _tool_calls(request: Request, text: str, reason: str) -> tuple[str | None, list[dict] | None, str]:
    """A chat choice's content, tool calls (None: it is answered as text; serve/tools.py) and finish_reason."""
    content, calls = (text, None) if request.tool_choice is None else request.tool_choice.answer(text)
    return content, calls, _finish(request, calls is not None, reason)


def _finish(request: Request, calls: bool, reason: str) -> str:
    """"tool_calls" for a whole reply of tool_choice "required" or "auto" that calls (a named call's stays "stop")."""
    return "tool_calls" if calls and request.tool_choice.name is None and reason == "stop" else reason


def chunk(request: Request, model: str, index: int, text: str | None, reason: str | None = None,
          choice_logprobs: dict | None = None) -> dict:  # fmt: skip
    """One streamed event: text for choice `index` (chat: None opens the choice with its role), or its end. A named
    tool call streams as tool_calls deltas: its id and name first, then its arguments' text. The deltas of
    tool_choice "required" and "auto" come from tools.Held (held_chunk)."""
    if request.kind != "chat":
        choice = {"index": index, "text": text or "", "logprobs": choice_logprobs, "finish_reason": reason}
        return {"id": request.id, "object": "text_completion", "created": request.created, "model": model,
                "choices": [choice]}  # fmt: skip
    tool = request.tool_choice
    named = tool is not None and tool.name is not None
    if text is None:  # the choice opens
        calls_only = tool is not None and tool.auto is None  # named, "required": no content
        delta = {"role": "assistant", "content": None if calls_only else ""}
        if named:
            delta["tool_calls"] = tool.open()
    elif not text:
        delta = {}
    else:
        delta = {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if named else {"content": text}
    return _chat_chunk(request, model, index, delta, reason, choice_logprobs)


def held_chunk(request: Request, model: str, index: int, delta: dict) -> dict:
    """A streamed event of tool_choice "required" or "auto": a delta of tools.Held.push (content, or calls)."""
    return _chat_chunk(request, model, index, delta, None, None)


def calls_chunk(request: Request, model: str, index: int, held: tools.Held, reason: str) -> dict:
    """The end of a streamed choice of tool_choice "required" or "auto": the content not sent yet and, "auto", its
    tool calls (none, for a reply cut short by max_tokens or one that does not call), with the finish reason."""
    delta, calls = held.end()
    return _chat_chunk(request, model, index, delta, _finish(request, calls, reason), None)


def _chat_chunk(request: Request, model: str, index: int, delta: dict, reason: str | None, choice_logprobs) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": choice_logprobs, "finish_reason": reason}
    return {"id": request.id, "object": "chat.completion.chunk", "created": request.created, "model": model,
            "choices": [choice]}  # fmt: skip


def usage_chunk(request: Request, model: str, completion_tokens: int, cached: int = 0) -> dict:
    kind = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
    return {"id": request.id, "object": kind, "created": request.created, "model": model, "choices": [],
            "usage": usage(request, completion_tokens, cached)}  # fmt: skip
