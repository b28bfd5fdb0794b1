"""Function calling in chat completions, as vLLM offers it without a model-specific tool-call parser: `tools` go to
the chat template (as transformers' apply_chat_template(tools=...) passes them), and `tool_choice` decides the
reply:

- "none": text, as without tools;
- a named function ({"type": "function", "function": {"name": ...}}): the reply is that function's arguments, JSON
  held to its `parameters` schema by structured outputs (neolm.structured), answered as one tool call
  (finish_reason "stop", as OpenAI and vLLM answer a named call);
- "required": one or more calls, JSON held to vLLM's schema for them, an array of {"name", "parameters"} (one
  call at most with parallel_tool_calls false), answered as tool calls (finish_reason "tool_calls"); streamed, the
  calls come whole in the choice's last chunk;
- "auto", the default when tools are given: refused, as vLLM refuses it without --enable-auto-tool-choice and a
  parser of the model's own tool-call format, which neolm does not have.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from neolm.serve.errors import ApiError


@dataclass
class ToolChoice:
    """How a request's reply is answered: as a call of `name`, or as the calls of a "required" reply."""

    name: str | None = None  # a named function; None: "required"

    def calls(self, text: str) -> list[dict] | None:
        """OpenAI's tool_calls of a reply's text, or None where the text is not whole (cut by max_tokens)."""
        if self.name is not None:
            return [_call(self.name, text)]
        try:
            calls = json.loads(text)
        except json.JSONDecodeError:
            return None
        return [_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls]

    def open(self) -> list[dict]:
        """A named call's first streamed tool_calls delta: its id and name, no arguments yet."""
        return [_call(self.name, "") | {"index": 0}]


def _call(name: str, arguments: str) -> dict:
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def parse(body: dict) -> tuple[list[dict] | None, ToolChoice | None, dict]:
    """(the tools for the chat template or None, how to answer or None for text, structured_outputs arguments)."""
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
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                           "\"parameters\": {...}}}}", "tools")  # fmt: skip
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        functions[name] = parameters
    if choice is None or choice == "auto":
        raise ApiError(400, 'tool_choice "auto" (the default with tools) needs a parser of the model\'s own tool-call '
                       "format, which neolm does not have (as vLLM without --enable-auto-tool-choice): ask for "
                       '"required", a named function ({"type": "function", "function": {"name": ...}}) or "none"',
                       "tool_choice")  # fmt: skip
    if choice == "none":
        return tools, None, {}
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": parameters},
                  "required": ["name", "parameters"]} for name, parameters in functions.items()]  # fmt: skip
        schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if body.get("parallel_tool_calls") is False:
            schema["maxItems"] = 1
        return tools, ToolChoice(), {"structured_outputs": {"json": schema}}
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if name is None:
        raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                       f'{{"name": ...}}}}, got {choice!r}'[:300], "tool_choice")  # fmt: skip
    if name not in functions:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools ({', '.join(functions)})",
                       "tool_choice")  # fmt: skip
    return tools, ToolChoice(name), {"structured_outputs": {"json": functions[name]}}
