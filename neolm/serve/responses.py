"""OpenAI's Responses API (POST /v1/responses, GET and DELETE /v1/responses/{id}), as vLLM serves it: a request is
read as the chat completion it amounts to, answered by the same code (templates, sampling, structured outputs,
function calling), and its answer written as a Response: `output` items (an assistant message of output_text,
function_call items), `status` "incomplete" with incomplete_details when max_output_tokens cut it, usage in
input/output tokens. Streamed, the chat chunks become Responses events (response.created, output_item.added,
output_text.delta, function_call_arguments.delta, ..., response.completed).

Conversation state: with `store` (OpenAI's default: true) a response and the conversation that led to it are kept
(neolm.serve.store: in memory, or in a file), so that `previous_response_id` continues it (its instructions are not
carried over, as OpenAI's), GET /v1/responses/{id} returns it and GET /v1/responses/{id}/input_items the items it
was generated from (earlier turns' included); `conversation` reads and extends one of neolm.serve.conversations
instead. Input items: messages (text content parts), and function_call /
function_call_output items (a call the model made and its result); reasoning items are passed over. With truncation
"auto", a conversation that with its reply would overflow the model's context loses its oldest exchanges (a user
message and what answered it; the instructions and leading system messages stay) until it fits, as OpenAI's drops
items from its beginning; with "disabled" (the default) it is refused. `background` responses:
neolm.serve.background. Hosted tools (web search, file search, ...) are refused.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

from neolm.chat import leading_system, without_oldest_exchange
from neolm.serve import protocol
from neolm.serve.engine import Job
from neolm.serve.errors import ApiError
from neolm.serve.store import Store

log = logging.getLogger(__name__)

LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for the tokens' log-probabilities
FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools",
          "tool_choice", "parallel_tool_calls", "text", "store", "metadata", "previous_response_id", "user",
          "truncation", "include", "top_logprobs", "reasoning", "service_tier", "background", "max_tool_calls",
          "safety_identifier", "prompt_cache_key", "stream_options", "conversation",
          # vLLM's sampling extras, as its chat completions take them
          "seed", "top_k", "min_p", "repetition_penalty", "stop", "min_tokens"}  # fmt: skip
NAMES = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text"}
"""The chat request's fields that a Responses request names otherwise (in errors)."""
PASSED = ("model", "temperature", "top_p", "parallel_tool_calls", "seed", "top_k", "min_p", "repetition_penalty",
          "stop", "min_tokens")  # fmt: skip


class Turn:
    """A Responses request read as a chat completion: `chat` is that request's body; `messages` the conversation
    (earlier turns' included) without the instructions, kept with the answer when stored."""

    def __init__(self, body, store: Store):
        protocol.known_fields(body, FIELDS)
        for name, allowed in (("background", (False, True)), ("truncation", ("disabled", "auto"))):
            if body.get(name) is not None and body[name] not in allowed:
                raise ApiError(400, f"'{name}': {body[name]!r} is not supported", name)
        calls = body.get("max_tool_calls")  # OpenAI's limit on built-in tool calls: neolm has none, so no effect
        if calls is not None and (not isinstance(calls, int) or isinstance(calls, bool) or calls < 1):
            raise ApiError(400, f"'max_tool_calls' must be a positive integer, got {calls!r}", "max_tool_calls")
        self.background = body.get("background") is True
        if self.background and body.get("store") is False:
            raise ApiError(400, "'background' responses are stored and polled (GET /v1/responses/{id}): they need "
                           "store", "background")  # fmt: skip
        self.body, self.id, self.created = body, f"resp_{uuid.uuid4().hex}", int(time.time())
        self.truncation = body.get("truncation") or "disabled"
        self.dropped = 0  # messages truncation "auto" left out of the prompt
        self.store = body.get("store") is not False
        earlier, items = [], []
        self.conversation = _conversation_id(body)  # (neolm.serve.conversations)
        if body.get("previous_response_id") is not None:
            response, earlier, items = store.get(body["previous_response_id"], "previous_response_id")
            if response["status"] in ("queued", "in_progress"):
                raise ApiError(400, f"response {response['id']!r} is still being generated (background): continue "
                               "it once it has ended", "previous_response_id")  # fmt: skip
            items = items + response["output"]  # (the earlier turns' items, then what answered them)
        elif self.conversation is not None:
            items = store.conversation(self.conversation, "conversation")[1]
            earlier = _messages(items) if items else []
        if "input" not in body:
            raise ApiError(400, "'input' is required: a string or a list of input items", "input")
        self.messages = earlier + _messages(body["input"])
        self.added = _input_items(body["input"])  # (the request's items: a conversation gets them once answered)
        self.items = items + self.added  # the conversation's items: GET .../input_items lists them
        instructions = protocol.field_of(body, "instructions", (str,))
        system = [{"role": "system", "content": instructions}] if instructions else []
        chat = {k: body[k] for k in PASSED if body.get(k) is not None}
        chat |= {"messages": system + self.messages, "stream": bool(body.get("stream"))}
        if body.get("max_output_tokens") is not None:
            chat["max_completion_tokens"] = body["max_output_tokens"]
        if chat["stream"]:
            chat["stream_options"] = {"include_usage": True}  # the usage goes into response.completed
        if body.get("tools"):
            chat["tools"] = [_tool(t, i) for i, t in enumerate(body["tools"])] if isinstance(body["tools"], list) \
                else body["tools"]  # fmt: skip  (a bad value: the chat request's error)
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = _tool_choice(body["tool_choice"])
        chat |= _text_format(body.get("text"))
        include = protocol.field_of(body, "include", (list,), [])
        if LOGPROBS in include or body.get("top_logprobs"):
            chat |= {"logprobs": True, "top_logprobs": body.get("top_logprobs") or 0}
        self.chat = chat

    def drop_oldest(self) -> bool:
        """Leave the oldest exchange out of the chat request's messages (truncation "auto"); False when only one
        is left."""
        messages = self.chat["messages"]
        first = leading_system(messages)
        later = without_oldest_exchange(messages[first:])
        if later is None:
            return False
        self.dropped += len(messages) - first - len(later)
        self.chat["messages"] = messages[:first] + later
        return True

    def response(self, model: str, output: list[dict], usage: dict | None, reason: str | None, gc) -> dict:
        """The Response: `output` items, `usage` (chat's), `reason` the chat choice's finish_reason (None:
        still in progress)."""
        body = self.body
        status = "in_progress" if reason is None else "incomplete" if reason == "length" else "completed"
        temperature = body.get("temperature", gc.temperature if gc.do_sample else 0.0)
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": model, "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"), "reasoning": body.get("reasoning"),
            "store": self.store, "temperature": temperature, "top_p": body.get("top_p", gc.top_p),
            "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "truncation": self.truncation, "user": body.get("user"),
            "metadata": body.get("metadata") or {}, "usage": None if usage is None else _usage(usage),
            "background": self.background, "max_tool_calls": body.get("max_tool_calls"),
            "conversation": None if self.conversation is None else {"id": self.conversation},
        }  # fmt: skip

    def answer(self, chat_answer: dict, gc) -> dict:
        """The whole Response of a whole chat completion."""
        (choice,) = chat_answer["choices"]
        message = choice["message"]
        entries = (choice.get("logprobs") or {}).get("content")  # the tokens' log-probabilities, if asked for
        output = []
        if message.get("content") is not None or not message.get("tool_calls"):
            part = _text_part(message.get("content") or "", entries)
            status = "incomplete" if choice["finish_reason"] == "length" else "completed"
            output.append(_message(f"msg_{uuid.uuid4().hex}", [part], status))
        output += [_function_call(f"fc_{uuid.uuid4().hex}", c, "completed") for c in message.get("tool_calls") or []]
        return self.response(chat_answer["model"], output, chat_answer["usage"], choice["finish_reason"], gc)

    def keep(self, response: dict, store: Store) -> None:
        """Store the response (with the conversation it ends), if the request asked for it; add the request's items
        and the response's output to its `conversation` (an answer, whole or cut short: not a failed one)."""
        if self.store:
            store.put(response, self.messages + _replies(response["output"]), self.items)
        if self.conversation is not None and response["status"] in ("completed", "incomplete"):
            added = self.added + response["output"]
            try:
                store.edit_conversation(self.conversation, lambda _, items: items.extend(added))
            except ApiError:  # (deleted while the response was generated)
                log.warning("conversation %s was deleted before response %s ended: its items are not kept",
                            self.conversation, response["id"])  # fmt: skip


def failed(response: dict, error: dict) -> dict:
    """The response as failed with `error` (an ApiError's body["error"]): status "failed" and OpenAI's error."""
    return response | {"status": "failed", "error": {"code": str(error.get("code")), "message": error["message"]}}


def cancelled(response: dict) -> dict:
    """The response as cancelled (a background one, stopped): status "cancelled", its output items incomplete."""
    output = [item | {"status": "incomplete"} for item in response["output"]]
    return response | {"status": "cancelled", "incomplete_details": None, "output": output}


def input_items(store: Store, rid: str, query: dict[str, list[str]]) -> dict:
    """GET /v1/responses/{id}/input_items: the items the stored response was generated from (with
    previous_response_id, the earlier turns' input and output items first, then its request's), a page of them."""
    items = store.get(rid)[2]
    protocol.known_params(query, {"order", "limit", "after", "before", "include"})
    return page(items, query, f"response {rid!r}")


def page(items: list[dict], query: dict[str, list[str]], where: str) -> dict:
    """A page of items (those of `where`) as OpenAI's list: `order` asc or desc (the default), `limit` 1-100 (20),
    `after` / `before` an item id."""
    order = query.get("order", ["desc"])[-1]
    if order not in ("asc", "desc"):
        raise ApiError(400, f"order must be 'asc' or 'desc', got {order!r}", "order")
    limit = query.get("limit", ["20"])[-1]
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise ApiError(400, f"limit must be an integer from 1 to 100, got {limit!r}", "limit")
    items = items if order == "asc" else items[::-1]
    for name in ("after", "before"):  # the items after (before) the one with this id, in this order
        if name in query:
            ids, at = [item["id"] for item in items], query[name][-1]
            if at not in ids:
                raise ApiError(400, f"{name}: no item {at!r} in {where}", name)
            items = items[ids.index(at) + 1 :] if name == "after" else items[: ids.index(at)]
    return listing(items[: int(limit)], has_more=len(items) > int(limit))


def listing(items: list[dict], has_more: bool = False) -> dict:
    """Items as OpenAI lists them: data, the first and last ids, and whether more follow."""
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}  # fmt: skip


def _conversation_id(body) -> str | None:
    """The request's `conversation` (its id, or {"id": its id}); None without one."""
    given = body.get("conversation")
    if given is None:
        return None
    if body.get("previous_response_id") is not None:
        raise ApiError(400, "'conversation' and 'previous_response_id' cannot both be given: a conversation holds "
                       "its earlier turns", "conversation")  # fmt: skip
    cid = given.get("id") if isinstance(given, dict) else given
    if not isinstance(cid, str):
        raise ApiError(400, f"'conversation' must be a conversation's id or {{\"id\": its id}}, got {given!r}"[:200],
                       "conversation")  # fmt: skip
    return cid


def check_items(given: list, param: str) -> list[dict]:
    """Items given under `param` (a conversation's), checked as a request's input is, with ids."""
    try:
        _messages(given)
    except ApiError as e:
        e.message, e.param = e.message.replace("input[", f"{param}["), param
        raise
    return _input_items(given)


def _input_items(given) -> list[dict]:
    """A request's `input` as items with ids (a string: one user message; a message's string content: a text
    part), as OpenAI lists them."""
    items = [{"type": "message", "role": "user", "content": given}] if isinstance(given, str) else given
    out = []
    for item in items:
        item = {"type": "message"} | item
        prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}.get(item["type"], "item")
        if item["type"] == "message":
            kind = "output_text" if item.get("role") == "assistant" else "input_text"
            if isinstance(item.get("content"), str):
                item["content"] = [{"type": kind, "text": item["content"]}]
            item.setdefault("status", "completed")
        out.append({"id": f"{prefix}_{uuid.uuid4().hex}"} | item)
    return out


def parse(turn: Turn, lm) -> protocol.Request:
    """The chat request a Responses request amounts to; its errors name the Responses fields. With truncation
    "auto", its oldest exchanges are left out while its prompt and reply overflow the context (a prompt that still
    does once one exchange is left is refused as without truncation)."""
    n_ctx = lm.config.n_positions
    while True:
        try:
            request = _chat(turn, lm)
        except protocol.ContextFull:
            if turn.truncation != "auto" or not turn.drop_oldest():
                raise
            continue
        prompt = request.prompts[0]
        if turn.truncation == "auto" and len(prompt) + request.gc.new_token_budget(len(prompt)) > n_ctx \
                and turn.drop_oldest():  # fmt: skip
            continue
        if turn.dropped:
            log.info("truncation auto: the %d oldest input messages are left out to fit the context of %d tokens",
                     turn.dropped, n_ctx)  # fmt: skip
        return request


def _chat(turn: Turn, lm) -> protocol.Request:
    try:
        return protocol.parse("chat", turn.chat, lm)
    except ApiError as e:
        for chat, name in NAMES.items():
            e.message = e.message.replace(chat, name)
        e.param = NAMES.get(e.param, e.param)
        raise


class Events:
    """A streamed chat completion's chunks as Responses events."""

    def __init__(self, turn: Turn, model: str, gc, store: Store):
        self.turn, self.model, self.gc, self.store = turn, model, gc, store
        self.number = 0
        self.output: list[dict] = []
        self.open: dict | None = None  # the output item being written
        self.logprobs: list[dict] = []  # the open message's tokens' log-probabilities
        self.reason = self.usage = self.error = None
        self.stopped = False  # a cancelled background response

    def stream(self, chunks: Iterator[dict], job: Job) -> Iterator[dict]:
        """The events of the job's chunks, from response.created to the end (the job cancelled: response.incomplete,
        "cancelled")."""
        yield from self.start()
        for chunk in chunks:
            yield from self.feed(chunk)
        yield from self.end(job.cancelled.is_set())

    def start(self) -> list[dict]:
        """response.created and response.in_progress (background: response.queued between them)."""
        response = self.turn.response(self.model, [], None, None, self.gc)
        if not self.turn.background:
            return [self._event("response.created", response=response),
                    self._event("response.in_progress", response=response)]  # fmt: skip
        queued = response | {"status": "queued"}
        return [self._event("response.created", response=queued), self._event("response.queued", response=queued),
                self._event("response.in_progress", response=response)]  # fmt: skip

    def feed(self, chunk: dict) -> list[dict]:
        """The events of one chat chunk (a choice's delta or end, the usage, or an error)."""
        if "error" in chunk:
            self.error = chunk["error"]
            return [self._event("error", code=str(chunk["error"].get("code")), message=chunk["error"]["message"],
                                param=chunk["error"].get("param"))]  # fmt: skip
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        events = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                entries = (choice.get("logprobs") or {}).get("content") or []
                events += self._text(delta["content"], entries)
            for call in delta.get("tool_calls") or []:
                events += self._call(call)
            if choice.get("finish_reason"):
                self.reason = choice["finish_reason"]
                events += self._close()
        return events

    def end(self, stopped: bool = False) -> list[dict]:
        """The last events: the open item closed, then response.completed / incomplete / failed (`stopped`: a
        cancelled background response, response.incomplete with status "cancelled"). The response is stored, a
        failed one only in the background (where it is polled)."""
        self.stopped = stopped
        empty = not self.output and self.error is None  # (an empty reply: one empty message, as unstreamed)
        events = [*(self._open_message() if empty else []), *self._close()]
        response = self.turn.response(self.model, self.output, self.usage, self.reason or "stop", self.gc)
        if self.error is not None:
            response = failed(response, self.error)
            if self.turn.background:
                self.turn.keep(response, self.store)
            return [*events, self._event("response.failed", response=response)]
        response = cancelled(response) if stopped else response
        self.turn.keep(response, self.store)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return [*events, self._event(kind, response=response)]

    def _event(self, kind: str, **fields) -> dict:
        self.number += 1
        return {"type": kind, "sequence_number": self.number - 1} | fields

    def _at(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.output) - 1}

    def _open_message(self) -> list[dict]:
        """A new assistant message opened: its output_item.added and content_part.added."""
        events = self._close()
        self._add(_message(f"msg_{uuid.uuid4().hex}", [_text_part("", None)], "in_progress"))
        return [*events, self._event("response.output_item.added", output_index=len(self.output) - 1,
                                     item=self.open | {"content": []}),
                self._event("response.content_part.added", **self._at(), content_index=0,
                            part=_text_part("", None))]  # fmt: skip

    def _text(self, text: str, entries: list[dict]) -> list[dict]:
        events = self._open_message() if self.open is None or self.open["type"] != "message" else []
        self.open["content"][0]["text"] += text
        self.logprobs += entries
        return [*events, self._event("response.output_text.delta", **self._at(), content_index=0, delta=text,
                                     logprobs=entries)]  # fmt: skip

    def _call(self, call: dict) -> list[dict]:
        events, arguments = [], call.get("function", {}).get("arguments") or ""
        if call.get("id"):  # a new call: its id and name (its arguments follow, or come with it whole)
            events += self._close()
            self._add(_function_call(f"fc_{uuid.uuid4().hex}", call | {"function": call["function"] | {
                "arguments": ""}}, "in_progress"))  # fmt: skip
            events.append(self._event("response.output_item.added", output_index=len(self.output) - 1,
                                      item=dict(self.open)))  # fmt: skip
        if arguments:
            self.open["arguments"] += arguments
            events.append(self._event("response.function_call_arguments.delta", **self._at(), delta=arguments))
        return events

    def _close(self) -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        at = {"item_id": item["id"], "output_index": self.output.index(item)}
        item["status"] = "incomplete" if self.reason == "length" or self.stopped else "completed"
        if item["type"] == "message":
            part = item["content"][0]
            if self.turn.chat.get("logprobs"):
                part["logprobs"] = self.logprobs
            return [self._event("response.output_text.done", **at, content_index=0, text=part["text"],
                                logprobs=self.logprobs),
                    self._event("response.content_part.done", **at, content_index=0, part=part),
                    self._event("response.output_item.done", output_index=at["output_index"], item=item)]  # fmt: skip
        return [self._event("response.function_call_arguments.done", **at, arguments=item["arguments"]),
                self._event("response.output_item.done", output_index=at["output_index"], item=item)]  # fmt: skip

    def _add(self, item: dict) -> None:
        self.output.append(item)
        self.open = item


def _messages(items) -> list[dict]:
    """Input items as chat messages (checked further by the chat request)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise ApiError(400, "'input' must be a string or a non-empty list of input items", "input")
    messages = []
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _content(item.get("content"), i)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}  # fmt: skip
            if messages and messages[-1]["role"] == "assistant":  # the calls of a message with text
                messages[-1]["tool_calls"] = [*(messages[-1].get("tool_calls") or []), call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _content(item.get("output"), i)})  # fmt: skip
        elif kind != "reasoning":  # a reasoning model's items, sent back: neolm's models write none
            raise ApiError(400, f"input[{i}]: items of type {kind!r} are not supported (messages, function_call and "
                           "function_call_output are)", "input")  # fmt: skip
    return messages


def _content(content, i: int):
    """A message's content: a string, or text parts (input_text, output_text) joined."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else part
            raise ApiError(400, f"input[{i}]: only text content parts are supported, got {kind!r}", "input")
        texts.append(part.get("text", ""))
    return "".join(texts)


def _tool(tool, i: int) -> dict:
    """A Responses function tool ({"type": "function", "name", "parameters", ...}) in chat's form."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else tool
        raise ApiError(400, f"tools[{i}]: only function tools are supported, got {kind!r}", "tools")
    function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _text_format(text) -> dict:
    """text.format as the chat request's response_format."""
    if text is None:
        return {}
    form = text.get("format") if isinstance(text, dict) else None
    kind = form.get("type") if isinstance(form, dict) else None
    if form is None or kind == "text":
        return {}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if kind == "json_schema":
        schema = {"name": form.get("name", "schema"), "schema": form.get("schema")}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    raise ApiError(400, f"text.format must be {{\"type\": \"text\"}}, json_object or json_schema, got {form!r}"[:300],
                   "text")  # fmt: skip


def _text_part(text: str, logprobs: list | None) -> dict:
    return {"type": "output_text", "text": text, "annotations": []} | ({} if logprobs is None else
                                                                       {"logprobs": logprobs})  # fmt: skip


def _message(mid: str, parts: list[dict], status: str) -> dict:
    return {"type": "message", "id": mid, "status": status, "role": "assistant", "content": parts}


def _function_call(fid: str, call: dict, status: str) -> dict:
    return {"type": "function_call", "id": fid, "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": status}  # fmt: skip


def _usage(usage: dict) -> dict:
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}  # fmt: skip


def _replies(output: list[dict]) -> list[dict]:
    """A response's output items as the chat messages a later turn reads."""
    return _messages([_input(item) for item in output]) if output else []


def _input(item: dict) -> dict:
    if item["type"] == "message":
        return {"type": "message", "role": "assistant", "content": "".join(p["text"] for p in item["content"])}
    return {k: item[k] for k in ("type", "call_id", "name", "arguments")}
