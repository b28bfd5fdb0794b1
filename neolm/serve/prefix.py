"""The server's prefix cache (`neolm serve --prefix-cache MB`): the keys and values of finished sequences, kept
so that a new prompt that begins with one of them (the next turn of a chat, which resends the conversation; a
few-shot context shared by many prompts) reads only the rest, as vLLM's automatic prefix caching does.

Entries are whole sequences (prompt and generated tokens, one row each), the least recently used evicted past
the memory budget, and an entry whose tokens all begin a newer one dropped for it. A prompt starts from a copy of
the entry it shares the most tokens with from the start, if at least MIN_SHARED, and only an entry made with the
same LoRA adapter (neolm.multilora); the entry stays, so requests that run at once with the same system prompt or
few-shot context all start from it. Off by default: the kept slots of generated tokens were written by decode
steps, whose kernels round otherwise than a prompt's forward, so a prompt read this way gets numbers a rounding
away from its own (its tokens can differ at near-ties), where neolm otherwise gives every request exactly what it
would get alone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from itertools import count

from neolm.generate import shared_prefix
from neolm.model import KVCache

MIN_SHARED = 32  # tokens a prompt must share with an entry to take it (fewer are as quick to read again)


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[int, tuple[KVCache, list[int], int]] = OrderedDict()  # oldest use first
        self._keys = count()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, cache: KVCache, tokens: list[int], adapter: int = 0) -> None:
        """Keep a sequence's cache (one row, no padding), the tokens in its slots (more are ignored), and the
        adapter it was made with; entries made with it whose tokens all begin these go."""
        if cache.nbytes > self.max_bytes or cache.length < MIN_SHARED:
            return
        tokens = tokens[: cache.length]
        for key, (old, kept, made_with) in list(self._entries.items()):  # entries the new one holds whole
            if made_with == adapter and len(kept) <= len(tokens) and tokens[: len(kept)] == kept:
                del self._entries[key]
                self.bytes -= old.nbytes
        self._entries[next(self._keys)] = (cache, tokens, adapter)
        self.bytes += cache.nbytes
        while self.bytes > self.max_bytes:
            old = self._entries.popitem(last=False)[1][0]
            self.bytes -= old.nbytes

    def find(self, prompt: Sequence[int], adapter: int = 0) -> tuple[KVCache, list[int]] | None:
        """The entry made with `adapter` that shares the most tokens with `prompt` from its start (at least
        MIN_SHARED; the most recent of equals): (cache, tokens), or None. It stays in the cache, now the most
        recently used, for other prompts too (however many run at once): the finder copies from it and must not
        change it."""
        best, shared = None, MIN_SHARED
        for key, (_, tokens, made_with) in self._entries.items():  # oldest first: of equals, the newest wins
            if made_with != adapter:
                continue
            n = shared_prefix(tokens, prompt)
            if n >= shared:
                best, shared = key, n
        if best is None:
            return None
        self._entries.move_to_end(best)
        cache, tokens, _ = self._entries[best]
        return cache, tokens
