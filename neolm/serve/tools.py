"""Function calling in chat completions, as vLLM offers it: `tools` go to the chat template (as transformers'
apply_chat_template(tools=...) passes them; the plain transcript lists them itself), and `tool_choice` decides the
reply:

- "auto", the default when tools are given: the model writes text or calls as it likes, and its calls are read
  from the text in its chat format's tool-call format (neolm.tool_calls: the plain transcript's own, or a
  template's named by --tool-call-parser, as vLLM's --enable-auto-tool-choice --tool-call-parser); a template
  without one is refused. Calls found are answered as tool_calls (finish_reason "tool_calls") and the text before
  them as content; a reply whose calls do not parse is text. Streamed, the content streams and the calls come
  whole in the choice's last chunk;
- "none": text, as without tools;
- a named function ({"type": "function", "function": {"name": ...}}): the reply is that function's arguments, JSON
  held to its `parameters` schema by structured outputs (neolm.structured), answered as one tool call
  (finish_reason "stop", as OpenAI and vLLM answer a named call);
- "required": one or more calls, JSON held to vLLM's schema for them, an array of {"name", "parameters"} (one
  call at most with parallel_tool_calls false), answered as tool calls (finish_reason "tool_calls"); streamed, the
  calls come whole in the choice's last chunk.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from neolm.serve.errors import ApiError
from neolm.tool_calls import CallFormat, function_of


@dataclass
class ToolChoice:
    """How a request's reply is answered: as a call of `name`, as the calls of a "required" reply, or as the calls
    the model chose to write in format `auto` ("auto")."""

    name: str | None = None  # a named function
    auto: CallFormat | None = None  # "auto": the format the model's calls are read in
    functions: tuple[str, ...] = ()  # the functions the request offers
    parallel: bool = True  # "auto": more than one call is answered (parallel_tool_calls)

    def answer(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(content, OpenAI's tool_calls) of a reply's whole text; tool_calls None: the reply is text (no call in
        it, or not whole: cut by max_tokens)."""
        if self.name is not None:
            return None, [_call(self.name, text)]
        if self.auto is not None:
            parsed = self.auto.parse(text)
            if parsed is None or not parsed[1] or any(c.name not in self.functions for c in parsed[1]):
                return text, None
            content, calls = parsed
            return content, [_call(c.name, c.as_json()) for c in calls[: None if self.parallel else 1]]
        try:
            calls = json.loads(text)
        except json.JSONDecodeError:
            return text, None
        return None, [_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls]

    def open(self) -> list[dict]:
        """A named call's first streamed tool_calls delta: its id and name, no arguments yet."""
        return [_call(self.name, "") | {"index": 0}]


class Held:
    """A streamed reply of tool_choice "required" or "auto", whose calls are known only once it is whole: push()
    gives the text that can go out as content now (for "auto", the text before its calls begin, less the
    whitespace at its end; for "required", nothing), end() the rest of the content and the calls."""

    def __init__(self, choice: ToolChoice):
        self.choice, self.text, self.sent = choice, "", 0

    def push(self, piece: str) -> str:
        self.text += piece
        fmt = self.choice.auto
        if fmt is None:
            return ""
        at = fmt.start(self.text)
        upto = at if at is not None else len(self.text) - fmt.held(self.text)
        upto = len(self.text[:upto].rstrip())  # whitespace before calls is not content: hold it until text follows
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : upto], upto
        return out

    def end(self) -> tuple[str, list[dict] | None]:
        """(the content not sent yet, the tool calls or None)."""
        content, calls = self.choice.answer(self.text)
        return (content or "")[self.sent :], calls


def _call(name: str, arguments: str) -> dict:
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def parse(body: dict, auto: CallFormat | None) -> tuple[list[dict] | None, ToolChoice | None, dict]:
    """(the tools for the chat template or None, how to answer or None for text, structured_outputs arguments);
    `auto`: the chat format's tool-call format (None: tool_choice "auto" is refused)."""
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
        return tools, ToolChoice(auto=auto, functions=tuple(functions), parallel=parallel), {}
    if choice == "none":
        return tools, None, {}
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": parameters},
                  "required": ["name", "parameters"]} for name, parameters in functions.items()]  # fmt: skip
        schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if body.get("parallel_tool_calls") is False:
            schema["maxItems"] = 1
        return tools, ToolChoice(functions=tuple(functions)), {"structured_outputs": {"json": schema}}
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if name is None:
        raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                       f'{{"name": ...}}}}, got {choice!r}'[:300], "tool_choice")  # fmt: skip
    if name not in functions:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools ({', '.join(functions)})",
                       "tool_choice")  # fmt: skip
    return tools, ToolChoice(name, functions=tuple(functions)), {"structured_outputs": {"json": functions[name]}}
