"""Token healing (transformers' `token_healing=True`; the "prompt boundary" problem of Lundberg's guidance): a prompt
that stops inside what the model would write as one token ends on a token it rarely saw there. "The link is
http:" ends on ":", where training text had "://" as one token, so the model, seeing ":", seldom writes "//" next.
Healing takes the prompt's last token back and lets the model choose it again among the tokens whose bytes begin
with its bytes (":", "://", ":/", ...), with a bias that makes one of them certain and slightly favours the
original; generation then goes on from the healed prompt.

As transformers: the prompt's text loses its leading and trailing whitespace and is encoded again first; a prompt
of one token, or whose last token no other token extends, is kept as it is; the choice is greedy, under a bias of
+10 on each candidate (+11 on the original) and no other processing. The candidates are the tokens whose bytes
begin with the last token's bytes (special tokens left out). transformers looks them up by the token's text with
each space written as the tokenizer's token for " ", which GPT-2's and GPT-NeoX's tokenizers do not have (its unknown
token's first character, "<", stands in): its candidates for a last token beginning with a space are the tokens
beginning with "<". neolm does not copy that.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from neolm.generate import generate
from neolm.generation_config import GenerationConfig
from neolm.model import GPT
from neolm.tokenizer import Tokenizer

BIAS = 10.0  # on every candidate for the healed token (transformers' value)
KEEP = 1.0  # and more on the original, "to limit aggressive healing e.g. 'http' -> 'https'"


@dataclass(frozen=True)
class Healed:
    """A prompt after healing: its token ids (the last one chosen again, or none changed), and its text before
    (stripped), so that a continuation can be given as text that follows the prompt."""

    ids: list[int]
    text: str  # the stripped prompt's text

    def continuation(self, tokenizer: Tokenizer, new: list[int]) -> str:
        """The text that follows the prompt: what the healed token adds to it, then the new tokens' text."""
        return self.head(tokenizer) + tokenizer.decode(new)

    def head(self, tokenizer: Tokenizer) -> str:
        healed = tokenizer.decode(self.ids)
        return healed[len(self.text) :] if healed.startswith(self.text) else ""


@functools.lru_cache(maxsize=4)
def _vocabulary(tokenizer: Tokenizer) -> tuple[tuple[int, bytes], ...]:
    """(id, bytes) of every token but the special ones."""
    special = tokenizer.special_ids()
    return tuple((i, tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size) if i not in special)


def candidates(tokenizer: Tokenizer, token: int) -> list[int]:
    """The tokens whose bytes begin with `token`'s (itself included)."""
    head = tokenizer.token_bytes(token)
    return [i for i, b in _vocabulary(tokenizer) if b.startswith(head)] if head else []


def heal(model: GPT, tokenizer: Tokenizer, prompt: list[int]) -> Healed:
    """The prompt (token ids) healed, as the module's doc says."""
    text = tokenizer.decode(prompt).strip()
    ids = tokenizer.encode(text) if text else []
    if len(ids) < 2:
        return Healed(ids or list(prompt), text)
    tail = ids[-1]
    options = candidates(tokenizer, tail)
    if len(options) < 2:
        return Healed(ids, text)
    bias = {(t,): BIAS for t in options}
    bias[(tail,)] += KEEP
    gc = GenerationConfig(max_new_tokens=1, do_sample=False, top_k=None, sequence_bias=bias)
    (chosen,) = generate(model, [ids[:-1]], gc)
    return Healed(ids[:-1] + chosen, text)
