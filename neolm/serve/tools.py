"""Function calling in chat completions, as vLLM offers it: `tools` go to the chat template (as transformers'
apply_chat_template(tools=...) passes them; the plain transcript lists them itself), and `tool_choice` decides the
reply:

- "auto", the default when tools are given: the model writes text or calls as it likes, and its calls are read
  from the text in its chat format's tool-call format (neolm.tool_calls: the plain transcript's own, or a
  template's named by --tool-call-parser, as vLLM's --enable-auto-tool-choice --tool-call-parser); a template
  without one is refused. Calls found are answered as tool_calls (finish_reason "tool_calls") and the text before
  them as content: the calls that parse, up to the first that does not or that names a function not offered; a
  reply whose first call is such is text. Streamed, the content streams, and each call is sent whole (id, name
  and arguments in one delta) as soon as it is written whole;
- "none": text, as without tools;
- a named function ({"type": "function", "function": {"name": ...}}): the reply is that function's arguments, JSON
  held to its `parameters` schema by structured outputs (neolm.structured), answered as one tool call
  (finish_reason "stop", as OpenAI and vLLM answer a named call);
- "required": one or more calls, JSON held to vLLM's schema for them, an array of {"name", "parameters"} (one
  call at most with parallel_tool_calls false), answered as tool calls (finish_reason "tool_calls"), each call's
  arguments the text the model wrote for its parameters; streamed, each call opens (its id and name) once its name
  is written and its arguments follow as they are written, as OpenAI streams calls (a reply cut short by
  max_tokens then ends with finish_reason "length" after the calls' beginnings, where the whole answer is text).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from neolm.serve.errors import ApiError
from neolm.tool_calls import Call, CallFormat, function_of, new_call_id, offered


@dataclass
class ToolChoice:
    """How a request's reply is answered: as a call of `name`, as the calls of a "required" reply, or as the calls
    the model chose to write in format `auto` ("auto")."""

    name: str | None = None  # a named function
    auto: CallFormat | None = None  # "auto": the format the model's calls are read in
    functions: tuple[str, ...] = ()  # the functions the request offers
    parallel: bool = True  # "auto": more than one call is answered (parallel_tool_calls)
    ids: CallFormat | None = None  # the chat format's tool-call format, which makes the calls' ids (None: vLLM's)

    def answer(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(content, OpenAI's tool_calls) of a reply's whole text; tool_calls None: the reply is text (no call in
        it, or not whole: cut by max_tokens)."""
        if self.name is not None:
            return None, [_call(self.name, text, self.ids)]
        if self.auto is not None:
            content, calls = self.read(text)
            return content, [_call(c.name, c.as_json(), self.ids) for c in calls] if calls else None
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return text, None
        written = CallStream(self.ids)
        written.push(text)
        return None, [_call(name, arguments, self.ids) for name, arguments in written.calls]

    def read(self, text: str) -> tuple[str | None, list[Call]]:
        """"auto": (the content, the calls answered) of a whole reply; without calls, the reply is text."""
        found = self.auto.parse(text, self.functions)
        if found is None:
            return text, []
        content, calls = found
        return content, self._answered(calls)

    def offered(self, calls: list[Call]) -> list[Call]:
        """"auto": the calls answered of those the model wrote, those up to the first naming a function not offered
        (the first only without parallel_tool_calls)."""
        return self._answered(offered(calls, self.functions))

    def _answered(self, calls: list[Call]) -> list[Call]:
        return calls if self.parallel else calls[:1]

    def open(self) -> list[dict]:
        """A named call's first streamed tool_calls delta: its id and name, no arguments yet."""
        return [_call(self.name, "", self.ids) | {"index": 0}]


class Held:
    """A streamed reply of tool_choice "required" or "auto": push() gives the delta that can go out now (for "auto",
    the content before its calls begin, less the whitespace at its end, and each call once it is written whole; for
    "required", its calls as they are written: CallStream), end() the last delta (the rest of the content and,
    "auto", the calls not sent yet) and whether the reply is answered as calls."""

    def __init__(self, choice: ToolChoice):
        self.choice, self.text, self.sent, self.calls = choice, "", 0, 0  # (content characters, calls sent)
        self.stream = CallStream(choice.ids) if choice.auto is None else None

    def push(self, piece: str) -> dict:
        self.text += piece
        if self.stream is not None:
            deltas = self.stream.push(piece)
            return {"tool_calls": deltas} if deltas else {}
        fmt, delta = self.choice.auto, {}
        at = fmt.start(self.text)
        upto = at if at is not None else len(self.text) - fmt.held(self.text)
        upto = len(self.text[:upto].rstrip())  # whitespace before calls is not content: hold it until text follows
        if upto > self.sent:
            delta["content"], self.sent = self.text[self.sent : upto], upto
        if at is not None:  # (a call written whole stays a call, whatever follows)
            delta |= self._calls(self.choice.offered(fmt.calls(self.text, final=False)))
        return delta

    def end(self) -> tuple[dict, bool]:
        """(the last delta: content not sent yet and calls not sent yet, whether the reply is answered as calls)."""
        if self.stream is not None:  # its calls went out as they came
            return {}, self.choice.answer(self.text)[1] is not None
        content, calls = self.choice.read(self.text)
        rest = (content or "")[self.sent :]
        return ({"content": rest} if rest else {}) | self._calls(calls), bool(calls)

    def _calls(self, calls: list[Call]) -> dict:
        """The delta of the calls not sent yet."""
        new = [_call(c.name, c.as_json(), self.choice.ids) | {"index": k}
               for k, c in enumerate(calls[self.calls :], self.calls)]  # fmt: skip
        self.calls = len(calls)
        return {"tool_calls": new} if new else {}


_NAME = re.compile(r'[\s\[,}]*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")')  # a call's opening, up to its whole name
_PARAMETERS = re.compile(r'\s*,\s*"parameters"\s*:\s*')


class CallStream:
    """The calls of a "required" reply as its JSON grows: [{"name": ..., "parameters": ...}, ...], the properties in
    that order as its schema's regex writes them. push() gives the tool_calls deltas of each piece: a call's id and
    name once its name is whole, then its parameters' text as it comes; `calls` holds (name, arguments text)."""

    def __init__(self, ids: CallFormat | None = None):
        self.ids = ids  # the format whose ids the calls get (None: vLLM's)
        self.text, self.calls = "", []
        self._at, self._stage = 0, "name"  # where the text is read from, and what comes there
        self._value: _Value | None = None

    def push(self, piece: str) -> list[dict]:
        self.text += piece
        deltas = []
        while True:
            if self._stage == "name":
                m = _NAME.match(self.text, self._at)
                if m is None:
                    return deltas
                self.calls.append((json.loads(m[1]), ""))
                deltas.append(_call(self.calls[-1][0], "", self.ids) | {"index": len(self.calls) - 1})
                self._at, self._stage = m.end(), "parameters"
            elif self._stage == "parameters":
                m = _PARAMETERS.match(self.text, self._at)
                if m is None or m.end() == len(self.text):  # (its value's first character not yet written)
                    return deltas
                self._at, self._stage, self._value = m.end(), "value", _Value(m.end())
            else:
                end = self._value.read(self.text)
                upto = self._value.at if end is None else end
                if upto > self._at:
                    name, arguments = self.calls[-1]
                    written = self.text[self._at : upto]
                    self.calls[-1] = (name, arguments + written)
                    deltas.append({"index": len(self.calls) - 1, "function": {"arguments": written}})
                    self._at = upto
                if end is None:
                    return deltas
                self._stage = "name"


class _Value:
    """Where a JSON value that begins at `start` ends, read as its text grows (strings and nesting followed)."""

    def __init__(self, start: int):
        self.at, self.depth, self.quoted, self.escaped = start, 0, False, False

    def read(self, text: str) -> int | None:
        """The end of the value (exclusive) once written, else None (`at`: how far it is read)."""
        for i in range(self.at, len(text)):
            c = text[i]
            self.at = i + 1
            if self.quoted:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.quoted = False
                    if self.depth == 0:  # a string value
                        return i + 1
            elif c == '"':
                self.quoted = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]" and self.depth > 0:
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
            elif self.depth == 0 and c in ",}] \t\n\r":  # the end of a number, true, false or null
                self.at = i
                return i
        return None


def _call(name: str, arguments: str, ids: CallFormat | None) -> dict:
    return {
        "id": new_call_id() if ids is None else ids.call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def required_schema(functions: dict[str, dict], parallel: bool = True) -> dict:
    """vLLM's schema for tool_choice "required": an array of {"name", "parameters"} objects, each one tool's name and
    its parameters (one item only without `parallel`). A tool's parameters may refer to their own `$defs` (as
    Pydantic writes them) or to themselves ("#"): those move to the array's `$defs`, under names of each tool's own
    (two tools may each have an "Item"), and its $refs are written to match."""
    defs, calls = {}, []
    for i, (name, parameters) in enumerate(functions.items()):
        moved = {}  # a $ref in this tool's parameters -> where it points in the array's schema
        for key in ("definitions", "$defs"):
            for def_name in parameters.get(key) or {}:
                moved[f"#/{key}/{def_name}"] = f"#/$defs/tool{i}-{key.strip('$')}-{def_name}"
        moved["#"] = f"#/$defs/tool{i}"
        own = {k: v for k, v in parameters.items() if k not in ("definitions", "$defs")}
        for key in ("definitions", "$defs"):
            for def_name, sub in (parameters.get(key) or {}).items():
                defs[moved[f"#/{key}/{def_name}"].removeprefix("#/$defs/")] = _refs_moved(sub, moved)
        own = _refs_moved(own, moved)
        if _refers(parameters, "#"):
            defs[f"tool{i}"] = own
        calls.append({"type": "object", "properties": {"name": {"const": name}, "parameters": own},
                      "required": ["name", "parameters"]})  # fmt: skip
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _refs_moved(node, moved: dict[str, str]):
    """A copy of a schema (part) with each "$ref" that `moved` names written as it says."""
    if isinstance(node, list):
        return [_refs_moved(x, moved) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _refs_moved(v, moved) for k, v in node.items()}
    if isinstance(node.get("$ref"), str):
        out["$ref"] = moved.get(node["$ref"], node["$ref"])
    return out


def _refers(node, ref: str) -> bool:
    if isinstance(node, list):
        return any(_refers(x, ref) for x in node)
    return isinstance(node, dict) and (node.get("$ref") == ref or any(_refers(v, ref) for v in node.values()))


def parse(body: dict, auto: CallFormat | None) -> tuple[list[dict] | None, ToolChoice | None, dict]:
    """(the tools for the chat template or None, how to answer or None for text, structured_outputs arguments);
    `auto`: the chat format's tool-call format (None: tool_choice "auto" is refused), which also makes the calls'
    ids."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return None, None, {}
    if not isinstance(tools, list) or not tools:
        raise ApiError(400, '\'tools\' must be a non-empty list of {"type": "function", "function": {...}}', "tools")
    functions = {}
    for i, tool in enumerate(tools):
        function = function_of(tool) if isinstance(tool, dict) and tool.get("type") == "function" else None
        if function is None or not function["name"]:
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                           "\"parameters\": {...}}}}", "tools")  # fmt: skip
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        functions[function["name"]] = parameters
    if choice is None or choice == "auto":
        if auto is None:
            raise ApiError(400, 'tool_choice "auto" (the default with tools) reads the calls the model writes, in its '
                           "chat template's format, which neolm is not told: serve with --tool-call-parser (as vLLM's "
                           '--enable-auto-tool-choice), or ask for "required", a named function ({"type": '
                           '"function", "function": {"name": ...}}) or "none"', "tool_choice")  # fmt: skip
        parallel = body.get("parallel_tool_calls") is not False
        return tools, ToolChoice(auto=auto, functions=tuple(functions), parallel=parallel, ids=auto), {}
    if choice == "none":
        return tools, None, {}
    if choice == "required":
        schema = required_schema(functions, parallel=body.get("parallel_tool_calls") is not False)
        return tools, ToolChoice(functions=tuple(functions), ids=auto), {"structured_outputs": {"json": schema}}
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if name is None:
        raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                       f'{{"name": ...}}}}, got {choice!r}'[:300], "tool_choice")  # fmt: skip
    if name not in functions:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools ({', '.join(functions)})",
                       "tool_choice")  # fmt: skip
    choice = ToolChoice(name, functions=tuple(functions), ids=auto)
    return tools, choice, {"structured_outputs": {"json": functions[name]}}
