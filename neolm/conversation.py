"""A chat held with a model, turn by turn: what `neolm chat` and `LanguageModel.chat` run.

Each turn writes the whole conversation in the model's chat format (neolm.chat) and generates the assistant's
reply, streamed as text, with the format's stop strings cut out. Two things make it a conversation rather than
a string of separate prompts:

- The keys and values of the last turn (its prompt and reply) are kept, and the next turn takes from them the
  tokens its prompt shares from the start, the whole conversation so far as a rule: only the new message is
  read (as llama.cpp's conversation mode and vLLM's prefix caching do). That part is read as a chunk after the
  kept ones, so its numbers may round differently from one forward of the whole prompt.
- A conversation that outgrows the context loses its oldest exchanges (system messages are kept) until the
  prompt and the reply's token budget fit; `dropped` counts the messages left out of the last prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from neolm.chat import Reply, check_messages, leading_system, without_oldest_exchange
from neolm.errors import NeolmError
from neolm.generate import DecodeBatch
from neolm.generation_config import GenerationConfig
from neolm.model import KVCache
from neolm.tokenizer import StreamDecoder
from neolm.tool_calls import function_of

log = logging.getLogger(__name__)


class Conversation:
    """The messages so far, answered with `lm` (a neolm.LanguageModel).

    messages: the conversation to start from ({"role", "content"} dicts, as OpenAI's); chat_template_kwargs go
    to the chat template; the other keyword arguments are generation arguments (as LanguageModel.generate's;
    one sequence). send(text) adds a user message and streams the reply; reply() answers the messages as they
    stand, or, when the last is the assistant's (a reply begun for the model), goes on with it. A finished
    reply (or what was streamed of it, when the iterator is closed early) is appended to `messages` as the
    assistant's (or to the begun reply). tools: OpenAI's function tools for the chat template (the plain transcript
    lists them itself). Where the chat format's tool-call format is known (neolm.tool_calls: the transcript's own,
    or a template's set in lm.chat_format.tool_calls), the reply is decoded with the format's markers, and a
    finished reply that calls offered functions is kept as OpenAI's assistant message: the text before the calls
    as its content, the calls as its tool_calls (`calls()`); answer each with add_tool_result() and reply() again.
    keep_cache=False: every turn reads its whole prompt, and no cache is
    held between turns (its memory: the last prompt and reply's keys and values).
    """

    def __init__(self, lm, messages: list[dict] | None = None, chat_template_kwargs: dict | None = None,
                 keep_cache: bool = True, tools: list[dict] | None = None, **generation_kwargs):  # fmt: skip
        self.lm, self.keep_cache = lm, keep_cache
        self.messages = check_messages(messages) if messages else []
        self.template_kwargs = dict(chat_template_kwargs or {}) | ({"tools": tools} if tools else {})
        self.functions = tuple(f["name"] for f in map(function_of, tools or []) if f is not None)  # those offered
        self.generation = generation_kwargs
        if self.generation_config().num_return_sequences != 1:
            raise NeolmError("a conversation has one reply per turn; num_return_sequences must be 1")
        self.dropped = 0  # messages left out of the last turn's prompt to fit the context
        self.reused = 0  # prompt tokens of the last turn taken from the kept cache instead of read
        self._held: tuple[KVCache, list[int]] | None = None  # the last turn's cache and the tokens in its slots

    def generation_config(self) -> GenerationConfig:
        """The model's generation defaults, then this conversation's arguments, plus the format's stop strings."""
        gc = self.lm.generation_config(**self.generation)
        user = gc.stop_strings or []
        gc.stop_strings = user + [s for s in self.lm.chat_format.stop if s not in user] or None
        return gc

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply (as reply())."""
        if not isinstance(text, str) or not text.strip():
            raise NeolmError("the message is empty")
        self.messages.append({"role": "user", "content": text})
        try:
            return self.reply()
        except NeolmError:
            self.messages.pop()  # it cannot be answered: the conversation stays as it was
            raise

    def reply(self) -> Iterator[str]:
        """Stream the assistant's reply to the messages as they stand (the rest of it, when the last message is
        the assistant's). The prompt is made (and fitted to the context) here, so errors raise before anything
        is generated."""
        if not self.messages:
            raise NeolmError("the conversation is empty: send a message first")
        gc = self.generation_config()
        going_on = self.messages[-1]["role"] == "assistant"
        prompt = self._prompt(gc, going_on)
        return self._generate(prompt, gc, going_on)

    @property
    def calling(self):
        """The tool-call format replies' calls are read in (neolm.tool_calls), None: no tools, or not known."""
        return self.lm.chat_format.tool_calls if self.functions else None

    def calls(self) -> list[dict]:
        """The tool calls of the last message, where it is the assistant's (OpenAI's: {"id", "type": "function",
        "function": {"name", "arguments": JSON text}}); [] otherwise."""
        last = self.messages[-1] if self.messages else {}
        return list(last.get("tool_calls") or []) if last.get("role") == "assistant" else []

    def add_tool_result(self, call_id: str, content: str) -> None:
        """Answer a call of the last reply (by its id) with the function's result, as a "tool" message."""
        named = {c["id"]: c["function"]["name"] for m in self.messages if m["role"] == "assistant"
                 for c in m.get("tool_calls") or []}  # fmt: skip
        if call_id not in named:
            raise NeolmError(f"no tool call has the id {call_id!r}")
        if not isinstance(content, str):
            raise NeolmError(f"a tool's result must be a string, got {type(content).__name__}")
        self.messages.append({"role": "tool", "tool_call_id": call_id, "name": named[call_id], "content": content})

    def reset(self, messages: list[dict] | None = None) -> None:
        """Start over from `messages` (default: the system messages this conversation begins with; [] for none)."""
        if messages is None:
            messages = self.messages[: leading_system(self.messages)]
        self.messages = check_messages(messages) if messages else []
        self._held, self.dropped = None, 0

    def undo(self) -> list[dict]:
        """Take back the last exchange (the last user message and everything after it); returns what was removed."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if not users:
            return []
        removed, self.messages = self.messages[users[-1] :], self.messages[: users[-1]]
        return removed

    def _prompt(self, gc: GenerationConfig, going_on: bool) -> list[int]:
        """The conversation's prompt tokens, its oldest exchanges left out while prompt + reply overflow."""
        fmt, n_ctx = self.lm.chat_format, self.lm.config.n_positions
        first = leading_system(self.messages)
        system, rest = self.messages[:first], self.messages[first:]
        dropped = 0
        while True:
            text = fmt.render(system + rest, not going_on, going_on, **self.template_kwargs)
            prompt = self.lm.encode(text)
            if len(prompt) + gc.new_token_budget(len(prompt)) <= n_ctx:
                break
            later = without_oldest_exchange(rest)
            if later is None:  # the last exchange alone overflows
                raise NeolmError(
                    f"the conversation's prompt is {len(prompt)} tokens even without older messages; with "
                    f"{gc.new_token_budget(len(prompt))} new tokens that is more than the model's context of "
                    f"{n_ctx}: send a shorter message or lower max_new_tokens"
                )
            dropped += len(rest) - len(later)
            rest = later
        if dropped > self.dropped:
            log.warning("the conversation outgrew the context of %d tokens: its %d oldest messages are left out",
                        n_ctx, dropped)  # fmt: skip
        self.dropped = dropped
        return prompt

    def _generate(self, prompt: list[int], gc: GenerationConfig, going_on: bool) -> Iterator[str]:
        lm = self.lm
        batch = DecodeBatch(lm.model, lm.tokenizer.decode, compact=False)
        prefill = batch.prefill([prompt], gc, reuse=self._held)
        self.reused = prefill.done
        log.info("turn: %d prompt tokens, %d of them kept from the last turn", len(prompt), self.reused)
        reply = Reply(gc.stop_strings or [], lm.chat_format.lstrip_reply and not going_on)
        decoder = StreamDecoder(lm.tokenizer, keep=self.calling.markers if self.calling else ())
        new, finished = [], False
        try:
            prefill.read_all(lm.model)
            batch.join(prefill)
            while not batch.finished:
                token = batch.step().tokens[0]
                new.append(token)
                piece = reply.push(decoder.push(token))
                if piece:
                    yield piece
            rest = reply.finish(decoder.flush())
            finished = True
            if rest:
                yield rest
        finally:  # finished, or closed early: keep what was said
            said = reply.text[: reply.sent]
            if going_on:
                self.messages[-1] = self.messages[-1] | {"content": self.messages[-1]["content"] + said}
            else:
                self.messages.append(self._message(said) if finished else {"role": "assistant", "content": said})
            # the cache holds the prompt and every new token but the last (never fed back)
            self._held = (batch.cache, prompt + new) if batch.cache is not None and self.keep_cache else None

    def _message(self, text: str) -> dict:
        """A finished reply as the assistant's message: its content and the calls it makes of the functions
        offered, up to the first of another (neolm.tool_calls: as the server reads them)."""
        fmt = self.calling
        found = None if fmt is None else fmt.parse(text, self.functions)
        if found is None:
            return {"role": "assistant", "content": text}
        content, calls = found
        return {"role": "assistant", "content": content or "", "tool_calls": [
            {"id": fmt.call_id(), "type": "function", "function": {"name": c.name, "arguments": c.as_json()}}
            for c in calls]}  # fmt: skip
