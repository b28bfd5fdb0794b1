"""Tool-call formats: how a model writes the functions it calls into its reply, read back as OpenAI's tool calls.

A chat model fine-tuned for function calling writes its calls in a format of its own, which its chat template
teaches it; a server that answers tool_choice "auto" must find them in the text (vLLM's tool-call parsers, named
by --tool-call-parser). neolm reads four of the common ones, under vLLM's names:

- "hermes": ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks after any text (Hermes 2/3, Qwen 2.5
  and 3 and many fine-tunes); the text before the first block is the reply's content. The plain transcript
  (neolm.chat.Transcript) teaches base models this format.
- "llama3_json": the whole reply is JSON, ``{"name": ..., "parameters": {...}}`` (or "arguments"), several joined by
  ";", optionally after ``<|python_tag|>`` (Llama 3.1 and later).
- "mistral": ``[TOOL_CALLS]`` and then the calls, after any text (the reply's content): a JSON array of
  ``{"name": ..., "arguments": {...}}`` (tokenizers before v11: Mistral 7B Instruct v0.3, Mixtral 8x22B), or each
  call as ``[TOOL_CALLS]NAME[ARGS]{...}``, [ARGS] optional (v11 and later: Mistral Small 3.1 and later, Ministral,
  Devstral). [TOOL_CALLS] is a special token, so the reply is decoded with it (`markers`). Its calls' ids are 9
  letters and digits, the only ids Mistral's templates take back.
- "pythonic": the whole reply is a Python list of calls with keyword arguments, ``[get_weather(city="Paris"),
  time()]`` (Llama 3.2 and 4, ToolACE), optionally after ``<|python_start|>``. Values are Python literals (JSON's
  true, false and null are read too); ``**{"a-b": 1}`` gives arguments whose names are not identifiers.

A reply's calls are those written whole, in order, up to the first that does not parse (what follows it is left
out); a reply whose first call does not parse is text (vLLM answers a malformed call as content too). A call is
thus known as soon as it is whole, and a stream sends it then: what comes after cannot take it back.
"""

from __future__ import annotations

import ast
import itertools
import json
import keyword
import math
import re
import secrets
import string
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Call:
    """A function call read from a reply: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict

    def as_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


class CallFormat:
    """A tool-call format: where a reply's calls begin, how they parse, how a transcript writes them."""

    name: str
    example: str  # how a call is written, for a prompt that teaches the format
    models: str  # the models that write calls this way, for help texts
    markers: tuple[str, ...] = ()  # special tokens the calls are written with: kept when a reply is decoded

    def call_id(self) -> str:
        """A new id for a call read in this format (OpenAI's tool_calls carry one; a tool's result names it)."""
        return new_call_id()

    def start(self, text: str) -> int | None:
        """Where the calls begin in a reply's text (so far), or None where they have not begun."""
        raise NotImplementedError

    def held(self, text: str) -> int:
        """How many characters at the end of `text` (without calls yet) may still begin them: a stream holds
        them back."""
        raise NotImplementedError

    def calls(self, text: str, final: bool = True) -> list[Call]:
        """The calls of a reply (so far: `final` False, where a last call still being written does not count) in
        order, up to the first that does not parse."""
        raise NotImplementedError

    def content(self, text: str, at: int) -> str | None:
        """The content of a reply whose calls begin at `at`."""
        return None

    def parse(self, text: str, functions=None) -> tuple[str | None, list[Call]] | None:
        """(the reply's content, its calls) of a whole reply, or None where its first call does not parse (or it
        has none). functions: the names offered; the calls end before the first of another (`offered`)."""
        calls = self.calls(text) if functions is None else offered(self.calls(text), functions)
        return (self.content(text, self.start(text)), calls) if calls else None

    def write(self, calls: list[Call]) -> str:
        """Calls as the model writes them (a conversation's earlier calls, in a transcript)."""
        raise NotImplementedError


def offered(calls: list[Call], functions) -> list[Call]:
    """The calls up to the first naming a function not in `functions` (the server and a Conversation answer
    those and leave the rest of the reply as it is)."""
    return list(itertools.takewhile(lambda c: c.name in functions, calls))


def new_call_id() -> str:
    """A tool call's id, as vLLM makes them."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _call(item) -> Call | None:
    """A Call of one decoded JSON value, or None if it is not {"name": str, "arguments" or "parameters": {...}}."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # arguments written as a JSON string, as OpenAI's own messages hold them
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return Call(item["name"], arguments) if isinstance(arguments, dict) else None


def _decoded(text: str) -> Call | None:
    try:
        return _call(json.loads(text))
    except json.JSONDecodeError:
        return None


def _objects(rest: str, separator: str) -> list[Call]:
    """The calls of the JSON objects written one after another from the start of `rest` with `separator` between
    them, up to the first that does not parse. (A JSON object is whole once it closes, final or not.)"""
    calls, decoder = [], json.JSONDecoder()
    while rest.startswith("{"):
        try:
            item, end = decoder.raw_decode(rest)
        except json.JSONDecodeError:
            break
        call = _call(item)
        if call is None:
            break
        calls.append(call)
        rest = rest[end:].lstrip()
        if not rest.startswith(separator):
            break
        rest = rest[len(separator) :].lstrip()
    return calls


def _held_prefix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is the beginning of `marker`."""
    return next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:n])), 0)


class _AfterContent(CallFormat):
    """A format whose calls begin at MARKER, after any text: the reply's content (hermes, mistral)."""

    MARKER: str

    def start(self, text: str) -> int | None:
        at = text.find(self.MARKER)
        return None if at == -1 else at

    def held(self, text: str) -> int:
        return _held_prefix(text, self.MARKER)

    def content(self, text: str, at: int) -> str | None:
        return text[:at].rstrip() or None


class _WholeReply(CallFormat):
    """A format whose reply is all calls, optionally after TAG, the first beginning with OPENING (llama3_json,
    pythonic)."""

    TAG: str
    OPENING: str

    def start(self, text: str) -> int | None:
        rest = text.lstrip()
        return len(text) - len(rest) if rest.startswith((self.TAG, self.OPENING)) else None

    def held(self, text: str) -> int:
        return len(text) if self.TAG.startswith(text.lstrip()) else 0  # nothing but (the start of) the tag yet

    def _calls_text(self, text: str) -> str:
        """The text of the calls: after the tag, if any; "" where the calls have not begun."""
        return "" if self.start(text) is None else text.lstrip().removeprefix(self.TAG).lstrip()


class Hermes(_AfterContent):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    MARKER = OPEN
    models = "Hermes 2/3, Qwen 2.5 and 3"
    example = '<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>'
    _BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|\Z)", re.DOTALL)  # a reply that ends early leaves one open

    def calls(self, text: str, final: bool = True) -> list[Call]:
        at, calls = self.start(text), []
        if at is None:
            return calls
        for block, close in self._BLOCK.findall(text, at):
            if not (close or final):  # (still being written)
                break
            call = _decoded(block)
            if call is None:
                break
            calls.append(call)
        return calls

    def write(self, calls: list[Call]) -> str:
        return "".join(f'{self.OPEN}{{"name": {json.dumps(c.name, ensure_ascii=False)}, "arguments": {c.as_json()}}}'
                       f"{self.CLOSE}" for c in calls)  # fmt: skip


class Llama3Json(_WholeReply):
    name = "llama3_json"
    TAG, OPENING = "<|python_tag|>", "{"
    example = '{"name": "NAME", "parameters": {...}}'
    models = "Llama 3.1 and later"

    def calls(self, text: str, final: bool = True) -> list[Call]:
        return _objects(self._calls_text(text), ";")

    def write(self, calls: list[Call]) -> str:
        return "; ".join(json.dumps({"name": c.name, "parameters": c.arguments}, ensure_ascii=False) for c in calls)


class Mistral(_AfterContent):
    name = "mistral"
    TAG, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
    MARKER = TAG
    markers = (TAG, ARGS, CALL_ID)
    example = "[TOOL_CALLS]NAME[ARGS]{...}"
    models = "Mistral 7B v0.3, Mixtral 8x22B, Mistral Small 3.1+, Devstral"
    _HEAD = re.compile(r"\s*([\w.-]+)\s*(?:\[CALL_ID\]\s*\w+\s*)?(?:\[ARGS\])?\s*")  # v11: a call up to its arguments
    _ID = string.ascii_letters + string.digits

    def call_id(self) -> str:
        return "".join(secrets.choice(self._ID) for _ in range(9))

    def calls(self, text: str, final: bool = True) -> list[Call]:
        at = self.start(text)
        if at is None:
            return []
        pieces = text[at + len(self.TAG) :].split(self.TAG)
        if pieces[0].lstrip().startswith("["):  # before v11: one JSON array of calls
            return _objects(pieces[0].lstrip()[1:].lstrip(), ",")
        calls, decoder = [], json.JSONDecoder()
        for piece in pieces:  # v11 and later: NAME[ARGS]{...} after each [TOOL_CALLS]
            head = self._HEAD.match(piece)
            if head is None or not piece.startswith("{", head.end()):
                break
            try:
                arguments, end = decoder.raw_decode(piece, head.end())
            except json.JSONDecodeError:
                break
            if not isinstance(arguments, dict):
                break
            calls.append(Call(head[1], arguments))
            if piece[end:].strip():  # text after a call ends the calls
                break
        return calls

    def write(self, calls: list[Call]) -> str:
        return "".join(f"{self.TAG}{c.name}{self.ARGS}{c.as_json()}" for c in calls)


class Pythonic(_WholeReply):
    name = "pythonic"
    TAG, OPENING = "<|python_start|>", "["
    example = "[NAME(ARGUMENT=VALUE, ...)]"
    models = "Llama 3.2 and 4, ToolACE"
    _NAME = re.compile(r"\s*([A-Za-z_]\w*)\s*\(")  # a call's name and opening parenthesis
    _CLOSE = re.compile(r"\)")

    def calls(self, text: str, final: bool = True) -> list[Call]:
        rest = self._calls_text(text)
        calls, i = [], 1
        while rest.startswith("[") and (name := self._NAME.match(rest, i)):
            call = None
            for close in self._CLOSE.finditer(rest, name.end()):  # the first ")" that makes a whole call
                end = close.end()
                call = _python_call(rest[name.start(1) : end])
                if call is not None:
                    break
            if call is None:
                break
            calls.append(call)
            after = rest[end:].lstrip()
            if not after.startswith(","):
                break
            i = len(rest) - len(after) + 1
        return calls

    def write(self, calls: list[Call]) -> str:
        return f"[{', '.join(f'{c.name}({_python_arguments(c.arguments)})' for c in calls)}]"


_JSON_NAMES = {"true": True, "false": False, "null": None}


def _python_call(text: str) -> Call | None:
    """The Call of one Python call expression with keyword arguments of literal values, else None."""
    try:
        node = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    arguments = {}
    try:
        for argument in node.keywords:
            value = _python_value(argument.value)
            if argument.arg is not None:
                arguments[argument.arg] = value
            elif isinstance(value, dict):  # **{...}
                arguments.update(value)
            else:
                return None
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None
    return Call(node.func.id, arguments)


def _python_value(node: ast.expr):
    """A Python literal's value as JSON's (tuples as lists); ValueError for anything JSON cannot hold."""
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_python_value(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):  # {**x}
            raise ValueError("not a literal")
        keys = [_python_value(key) for key in node.keys]
        if not all(isinstance(key, str) for key in keys):
            raise ValueError("a key that is not a string")
        return dict(zip(keys, map(_python_value, node.values), strict=True))
    value = ast.literal_eval(node)
    if value is None or isinstance(value, (bool, int, str)) or isinstance(value, float) and math.isfinite(value):
        return value
    raise ValueError(f"{type(value).__name__} is not a JSON value")


def _python_arguments(arguments: dict) -> str:
    """Keyword arguments written as Python; those whose names are not identifiers in one **{...}."""
    named = [f"{k}={_python(v)}" for k, v in arguments.items() if k.isidentifier() and not keyword.iskeyword(k)]
    others = {k: v for k, v in arguments.items() if not (k.isidentifier() and not keyword.iskeyword(k))}
    return ", ".join(named + ([f"**{_python(others)}"] if others else []))


def _python(value) -> str:
    """A JSON value as a Python literal."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_python(str(k))}: {_python(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_python, value)) + "]"
    return json.dumps(value, ensure_ascii=False)  # a JSON string or number is also a Python literal


FORMATS = {f.name: f for f in (Hermes(), Llama3Json(), Mistral(), Pythonic())}
"""The tool-call formats by their vLLM --tool-call-parser names."""

FORMATS_HELP = "; ".join(f"{f.name} ({f.example}: {f.models})" for f in FORMATS.values())
"""The formats, a line for --tool-call-parser's help."""


def function_of(tool) -> dict | None:
    """The function part ({"name", "description", "parameters"}) of an OpenAI tool ({"type": "function",
    "function": {...}}) or of a bare function dict; None for anything else."""
    if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        tool = tool["function"]
    return tool if isinstance(tool, dict) and isinstance(tool.get("name"), str) else None


def message_calls(message: dict) -> list[Call]:
    """An assistant message's tool_calls (OpenAI's: {"function": {"name", "arguments": JSON text}}) as Calls; a call
    whose arguments are not a JSON object keeps them as {"arguments": text}."""
    calls = []
    for item in message.get("tool_calls") or []:
        function = item.get("function", item) if isinstance(item, dict) else {}
        call = _call(function)
        if call is None:
            call = Call(str(function.get("name", "")), {"arguments": function.get("arguments")})
        calls.append(call)
    return calls
