"""Chat formats: how a conversation (a list of {role, content} messages) becomes the text a model continues.

A checkpoint fine-tuned for chat carries Hugging Face's chat template: a Jinja template in the file
``chat_template.jinja``, or in the ``chat_template`` field of ``tokenizer_config.json`` (a string, or a list of
named templates of which "default" is used). neolm renders it as ``transformers``' ``apply_chat_template``
does: a sandboxed Jinja environment with trim_blocks and lstrip_blocks, the variables ``messages``,
``add_generation_prompt``, ``tools`` and ``documents`` (None) and the special tokens named in the tokenizer's
config files (``bos_token``, ``eos_token``, ...), the helpers ``raise_exception``, ``strftime_now`` and a
``tojson`` that does not escape HTML; extra keyword arguments are passed to the template. The rendered text is
then tokenized as any prompt (special tokens written in it become their ids, nothing is added).

Base models (every EleutherAI release, the bundled model) have no template. Their chats are written as a plain
transcript that they continue well: the system message, one "User: ..." / "Assistant: ..." line per message,
then "Assistant:"; the reply stops where the model starts a new "User:" line (`Transcript.stop`).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import ClassVar

from neolm.errors import NeolmError
from neolm.tool_calls import FORMATS, CallFormat, function_of, message_calls

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool")
"""The message roles a conversation may hold ("developer" is OpenAI's newer name for "system"; "tool": a function's
result, answering an assistant message's tool_calls)."""
SYSTEM_ROLES = ("system", "developer")
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def check_messages(messages) -> list[dict]:
    """The conversation as plain {"role", "content"} dicts with string content (OpenAI's text content parts
    are joined), an assistant's tool_calls and a tool's tool_call_id and name kept for templates; NeolmError naming
    the first bad message."""
    if not isinstance(messages, list) or not messages:
        raise NeolmError("'messages' must be a non-empty list of {role, content}")
    plain = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise NeolmError(f"messages[{i}]: role must be one of {', '.join(ROLES)}, got {role!r}")
        content = message.get("content")
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            raise NeolmError(f"messages[{i}]: tool_calls must be a list of calls")
        if content is None and calls:
            content = ""
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise NeolmError(f"messages[{i}]: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise NeolmError(f"messages[{i}]: content must be a string, got {content!r}"[:300])
        extra = {k: message[k] for k in ("tool_calls", "tool_call_id", "name") if message.get(k) is not None}
        plain.append({"role": role, "content": content} | extra)
    return plain


def leading_system(messages: list[dict]) -> int:
    """How many messages at the start are system (or developer) messages."""
    return next((i for i, m in enumerate(messages) if m["role"] not in SYSTEM_ROLES), len(messages))


def without_oldest_exchange(messages: list[dict]) -> list[dict] | None:
    """The messages from the second user message on: the oldest exchange (a user message and all that answers it,
    tool calls and results included) left out, to fit a context; None when there is only one. `messages` has no
    leading system messages (those stay: leading_system)."""
    later = next((i for i, m in enumerate(messages) if m["role"] == "user" and i > 0), None)
    return None if later is None else messages[later:]


CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
"""Appended to the final message to find where it ends in the rendered text (transformers' marker)."""


class ChatFormat:
    """What every chat format does: render a conversation, to be answered or to be continued."""

    name: str
    stop: tuple[str, ...]  # text that ends a reply (cut out of it)
    lstrip_reply: bool  # a reply's leading whitespace is not part of it
    tool_calls: CallFormat | None  # how the model writes tool calls (neolm.tool_calls), None: not known

    def render(self, messages, add_generation_prompt: bool = True, continue_final_message: bool = False,
               **kwargs) -> str:  # fmt: skip
        """The prompt text for `messages`: ending with the opening of the assistant's turn when
        add_generation_prompt, or, with continue_final_message, ending inside the final message, for the model
        to go on writing it (a reply begun for it, say). As transformers: the final message is marked, rendered,
        and the text is cut where the mark is (and right-stripped when the format strips the message). Extra
        keyword arguments go to a template. NeolmError for bad messages or a template that refuses them."""
        messages = check_messages(messages)
        if not continue_final_message:
            return self._render(messages, add_generation_prompt, kwargs)
        if add_generation_prompt:
            raise NeolmError("continue_final_message and add_generation_prompt exclude each other: the first goes on "
                             "with the final message, the second opens a new assistant message")  # fmt: skip
        final = messages[-1]["content"]
        text = self._render(messages[:-1] + [messages[-1] | {"content": final + CONTINUE_TAG}], False, kwargs)
        at = text.rfind(CONTINUE_TAG.strip())
        if at == -1 or final.strip() not in text:
            raise NeolmError(f"continue_final_message: the {self.name} leaves (part of) the final message out, so "
                             "the text cannot end inside it")  # fmt: skip
        return text[:at] if text.startswith(CONTINUE_TAG, at) else text[:at].rstrip()

    def _render(self, messages: list[dict], add_generation_prompt: bool, kwargs: dict) -> str:
        raise NotImplementedError


class Transcript(ChatFormat):
    """The plain "User: ... / Assistant: ..." format for models without a chat template. Given tools, it lists their
    functions after the system messages and teaches its tool-call format (hermes: <tool_call>{...}</tool_call>);
    earlier calls are written in that format and their results as "Tool:" lines."""

    name = "plain transcript (User: / Assistant:)"
    source = None  # no template text
    stop = ("\nUser:", "\nTool:")  # where a base model starts writing the user's next line, or a call's result
    lstrip_reply = True  # the reply comes after "Assistant:" and a space, which is not part of it
    SPEAKERS: ClassVar[dict] = {"system": None, "developer": None, "user": "User", "assistant": "Assistant",
                                "tool": "Tool"}  # fmt: skip

    def __init__(self):
        self.tool_calls = FORMATS["hermes"]

    def _render(self, messages: list[dict], add_generation_prompt: bool, kwargs: dict) -> str:
        """The transcript of `messages`, ending with "Assistant:" when add_generation_prompt (keyword arguments
        other than tools are for templates and are ignored here)."""
        lines = []
        for message in messages:
            content = message["content"].strip()
            if message.get("tool_calls"):
                content = f"{content} {self.tool_calls.write(message_calls(message))}".strip()
            speaker = self.SPEAKERS[message["role"]]
            lines.append(f"{content}\n" if speaker is None else f"{speaker}: {content}\n")
        if kwargs.get("tools"):  # after the system messages
            lines.insert(leading_system(messages), self._functions(kwargs["tools"]))
        return "".join(lines) + ("Assistant:" if add_generation_prompt else "")

    def _functions(self, tools) -> str:
        """The tools' functions, one JSON line each, and how to call them."""
        functions = [f for tool in tools if (f := function_of(tool)) is not None]
        if len(functions) != len(tools):
            raise NeolmError('tools must be functions: {"type": "function", "function": {"name": ..., ...}}')
        listed = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in functions)
        return (f"Functions the assistant can call (JSON schemas):\n{listed}To call one, the assistant writes "
                f"{self.tool_calls.example}; its result comes back on a Tool: line.\n")  # fmt: skip


class Template(ChatFormat):
    """A Hugging Face chat template (Jinja), rendered as transformers' apply_chat_template renders it."""

    stop = ()  # a chat model ends its turn with its eos token, which generation stops at anyway
    lstrip_reply = False  # the reply is the model's text as it comes (as vLLM's)

    def __init__(self, text: str, special_tokens: dict[str, str] | None = None, name: str = "chat template"):
        self.tool_calls = None  # the format its model writes tool calls in: unknown unless told (--tool-call-parser)
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source, self.name = text, name
        self.special_tokens = dict(special_tokens or {})
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_generation_tag(), "jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
        try:
            self._template = env.from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise NeolmError(f"{name} does not parse: {e.message} (line {e.lineno})") from None

    def _render(self, messages: list[dict], add_generation_prompt: bool, kwargs: dict) -> str:
        import jinja2

        context = self.special_tokens | kwargs
        try:
            return self._template.render(**({"tools": None, "documents": None} | context), messages=messages,
                                         add_generation_prompt=add_generation_prompt)  # fmt: skip
        except jinja2.TemplateError as e:  # raise_exception, undefined attributes, sandbox violations
            raise NeolmError(f"the {self.name} refused the conversation: {e}") from None


class Reply:
    """A reply's text as it grows: decoded text with stop strings cut out (text that may begin a stop string is
    held back until it is clear), without leading whitespace if asked (the plain transcript's replies). The
    server's choices and Conversation's replies are read through one."""

    def __init__(self, stops: list[str], strip_leading: bool):
        self.stops, self.strip = stops, strip_leading
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text, self.sent = "", 0
        self.stopped = False  # a stop string was found: nothing after it counts

    def push(self, piece: str) -> str:
        """Add decoded text; return the part that can be sent now."""
        if self.stopped:
            return ""
        self.text += piece
        if self.strip:
            self.text = self.text.lstrip()
            self.strip = not self.text
        cuts = [i for s in self.stops if (i := self.text.find(s, max(self.sent - len(s) + 1, 0))) != -1]
        if cuts:
            self.stopped = True
            self.text = self.text[: min(cuts)]
            return self._take(len(self.text))
        return self._take(len(self.text) - self.hold)

    def finish(self, rest: str) -> str:
        """The decoder's last text; return everything not sent yet."""
        out = self.push(rest) if rest else ""
        return out + self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : upto], upto
        return out


def _raise_exception(message):
    import jinja2

    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """JSON as the template writes it into the prompt (Jinja's own tojson escapes <, > and & for HTML)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _generation_tag():
    """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's tokens with it (for training
    masks); rendering keeps the body as it is."""

    import jinja2.ext

    class Generation(jinja2.ext.Extension):
        tags: ClassVar[set] = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return Generation


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise NeolmError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(folder: Path) -> dict[str, str]:
    found = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config's values win, as transformers'
        path = folder / name
        if path.is_file():
            data = _read_json(path)
            found |= {k: t for k in SPECIAL_TOKENS if (t := _token_text(data.get(k))) is not None}
    return found


def _folder_template(folder: Path) -> tuple[str, str] | None:
    """(template text, where it came from) from a checkpoint folder, or None."""
    path = folder / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = _read_json(config).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            log.warning("%s has chat templates named %s but none named 'default'; using none", config, list(named))
    if template is None:
        return None
    if not isinstance(template, str):
        raise NeolmError(f"{config}: chat_template must be a string or a list of named templates")
    return template, f"{config} (chat_template)"


def load_chat_format(folder=None, override: str | None = None) -> ChatFormat:
    """The chat format for a checkpoint folder: `override` (a template file's path, or the template itself)
    if given, else the folder's template (chat_template.jinja, else tokenizer_config.json's chat_template),
    else the plain transcript. The folder's special tokens are given to the template either way."""
    folder = Path(folder) if folder is not None else None
    special = _special_tokens(folder) if folder is not None else {}
    if override is not None:
        path = Path(override).expanduser()
        if "{" not in override and "\n" not in override:
            if not path.is_file():
                raise NeolmError(f"chat template file not found: {override} (pass a file, or the template itself)")
            return Template(path.read_text(encoding="utf-8"), special, f"chat template {path}")
        return Template(override, special, "chat template given")
    found = _folder_template(folder) if folder is not None else None
    if found is None:
        return Transcript()
    text, where = found
    log.info("chat template: %s", where)
    return Template(text, special, f"chat template of {where}")
