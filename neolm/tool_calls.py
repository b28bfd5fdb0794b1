"""Tool-call formats: how a model writes the functions it calls into its reply, read back as OpenAI's tool calls.

A chat model fine-tuned for function calling writes its calls in a format of its own, which its chat template
teaches it; a server that answers tool_choice "auto" must find them in the text (vLLM's tool-call parsers, named
by --tool-call-parser). neolm reads two of the common ones, under vLLM's names:

- "hermes": ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks after any text (Hermes 2/3, Qwen 2.5
  and 3 and many fine-tunes); the text before the first block is the reply's content. The plain transcript
  (neolm.chat.Transcript) teaches base models this format.
- "llama3_json": the whole reply is JSON, ``{"name": ..., "parameters": {...}}`` (or "arguments"), several joined by
  ";", optionally after ``<|python_tag|>`` (Llama 3.1 and later).

A reply's calls are those written whole, in order, up to the first that does not parse (what follows it is left
out); a reply whose first call does not parse is text (vLLM answers a malformed call as content too). A call is
thus known as soon as it is whole, and a stream sends it then: what comes after cannot take it back.
"""

from __future__ import annotations

import json
import re
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

    def parse(self, text: str) -> tuple[str | None, list[Call]] | None:
        """(the reply's content, its calls) of a whole reply, or None where its first call does not parse (or it
        has none)."""
        calls = self.calls(text)
        return (self.content(text, self.start(text)), calls) if calls else None

    def write(self, calls: list[Call]) -> str:
        """Calls as the model writes them (a conversation's earlier calls, in a transcript)."""
        raise NotImplementedError


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


def _held_prefix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is the beginning of `marker`."""
    return next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:n])), 0)


class Hermes(CallFormat):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    example = '<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>'
    _BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|\Z)", re.DOTALL)  # a reply that ends early leaves one open

    def start(self, text: str) -> int | None:
        at = text.find(self.OPEN)
        return None if at == -1 else at

    def held(self, text: str) -> int:
        return _held_prefix(text, self.OPEN)

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

    def content(self, text: str, at: int) -> str | None:
        return text[:at].rstrip() or None

    def write(self, calls: list[Call]) -> str:
        return "".join(f'{self.OPEN}{{"name": {json.dumps(c.name, ensure_ascii=False)}, "arguments": {c.as_json()}}}'
                       f"{self.CLOSE}" for c in calls)  # fmt: skip


class Llama3Json(CallFormat):
    name = "llama3_json"
    TAG = "<|python_tag|>"
    example = '{"name": "NAME", "parameters": {...}}'

    def start(self, text: str) -> int | None:
        rest = text.lstrip()
        return len(text) - len(rest) if rest.startswith((self.TAG, "{")) else None

    def held(self, text: str) -> int:
        return len(text) if self.TAG.startswith(text.lstrip()) else 0  # nothing but (the start of) the tag yet

    def calls(self, text: str, final: bool = True) -> list[Call]:
        if self.start(text) is None:
            return []
        rest, calls, decoder = text.lstrip().removeprefix(self.TAG).lstrip(), [], json.JSONDecoder()
        while rest.startswith("{"):  # (a JSON object is whole once it closes: final or not)
            try:
                item, end = decoder.raw_decode(rest)
            except json.JSONDecodeError:
                break
            call = _call(item)
            if call is None:
                break
            calls.append(call)
            rest = rest[end:].lstrip()
            if not rest.startswith(";"):
                break
            rest = rest[1:].lstrip()
        return calls

    def write(self, calls: list[Call]) -> str:
        return "; ".join(json.dumps({"name": c.name, "parameters": c.arguments}, ensure_ascii=False) for c in calls)


FORMATS = {f.name: f for f in (Hermes(), Llama3Json())}
"""The tool-call formats by their vLLM --tool-call-parser names."""


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
