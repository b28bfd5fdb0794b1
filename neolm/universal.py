"""Universal assisted generation: an assistant model with another tokenizer than the model's (transformers'
assistant_model with an assistant_tokenizer), e.g. gpt-neo-125M (GPT-2's vocabulary) guessing for a Pythia
(GPT-NeoX's).

The two token sequences meet in their bytes, which both byte-level vocabularies spell exactly:
  - each round, the model's new tokens become bytes, and their text (whole characters only) is encoded by the
    assistant's tokenizer together with the text of the assistant's last `assistant_lookbehind` tokens, so that
    a word cut at a round's end is joined as the assistant's tokenizer would cut it;
  - the assistant then guesses a few tokens of its own, greedily (stopping early below
    assistant_confidence_threshold, or at its eos, which becomes the model's eos);
  - their bytes are encoded by the model's tokenizer together with the text of the model's last
    `target_lookbehind` tokens; where that leaves those tokens as they are, the rest are the model's guesses,
    else the new bytes are encoded alone.
A window always starts at a character's first byte (byte-level tokenizers split characters over tokens).
These greedy guesses carry no probabilities in the model's vocabulary, so they are checked as prompt lookup's
are: the tokens are the model's greedy tokens.

Sampled, the assistant guesses in the tokens the two vocabularies share (the same bytes, special tokens aside:
most of them for GPT-2's and GPT-NeoX's), each of which is one token of the model's: transformers' universal
speculative decoding (Timor et al. 2025, "Lossless speculative decoding algorithms for heterogeneous
vocabularies"). Its logits are carried over into the model's vocabulary (-inf for the tokens it lacks), go
through the model's processors with the model's histories, and it samples from them; so its probabilities q
are in the model's vocabulary and the guesses are checked by speculative sampling's rejection rule, as a
same-tokenizer assistant's are (lossless). A round's tokenizer work covers a few dozen tokens, whatever the
sequence's length.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from neolm.generate import shared_prefix
from neolm.generation_config import GenerationConfig
from neolm.model import GPT, KVCache, prefill
from neolm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from neolm.speculative import Picker

log = logging.getLogger(__name__)


@dataclass
class Universal:
    """An assistant model with a tokenizer of its own (`tokenizer`), for a model whose tokenizer is
    `target_tokenizer`: what generate's `assistant` takes for universal assisted generation."""

    model: GPT
    tokenizer: Tokenizer
    target_tokenizer: Tokenizer


@functools.lru_cache(maxsize=8)
def shared_tokens(assistant: Tokenizer, target: Tokenizer, a_vocab: int,
                  t_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The tokens both vocabularies have, matched by their bytes (special tokens aside): (to_target (a_vocab,),
    each assistant token's id in the target's vocabulary or -1; to_assistant (t_vocab,), the other way)."""
    ids: dict[bytes, int] = {}
    special = target.special_ids()
    for token in range(min(t_vocab, target.vocab_size)):
        if token not in special:
            ids.setdefault(target.token_bytes(token), token)
    to_target = torch.full((a_vocab,), -1, dtype=torch.long)
    to_assistant = torch.full((t_vocab,), -1, dtype=torch.long)
    special = assistant.special_ids()
    for token in range(min(a_vocab, assistant.vocab_size)):
        t = ids.get(assistant.token_bytes(token), -1) if token not in special else -1
        if t >= 0 and to_assistant[t] < 0:
            to_target[token], to_assistant[t] = t, token
    log.info("universal speculative decoding: the vocabularies share %d of the assistant's %d tokens",
             int((to_target >= 0).sum()), a_vocab)  # fmt: skip
    return to_target, to_assistant


def whole_chars(data: bytes | bytearray) -> int:
    """How many leading bytes of UTF-8 `data` end with a whole character (data less an unfinished last one).
    Bytes that are no UTF-8 count as whole: they will not become whole later."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        lead = data[n - back]
        if lead & 0xC0 != 0x80:  # a character's first byte
            size = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
            return n - back if back < size else n
    return n


def _continues(data: bytes | bytearray, at: int) -> bool:
    """Whether data[at] is inside a character (a UTF-8 continuation byte)."""
    return at < len(data) and data[at] & 0xC0 == 0x80


class TextGuesser:
    """Guesses, in the model's tokens, from an assistant with another tokenizer (the module's doc). Made for one
    sequence, whose tokens only grow from round to round."""

    def __init__(self, universal: Universal, gc: GenerationConfig, eos_ids: list[int], vocab: int, max_len: int,
                 picker: Picker | None = None):  # fmt: skip
        """picker: the model's processors and pick, with which a sampled generation's assistant samples its
        guesses in the shared tokens (greedy generations guess through bytes and need none)."""
        self.model, self.a_tok, self.t_tok = universal.model, universal.tokenizer, universal.target_tokenizer
        self.device = self.model.ln_f.weight.device
        c = self.model.config
        length = min(c.n_positions, 2 * max_len + 64)  # its tokens per byte are about the model's; past: no guesses
        self.cache = KVCache(c, 1, length, self.model.cache_dtype, self.device)
        self.a_vocab = min(c.vocab_size, self.a_tok.vocab_size)  # (a model's rows past its tokenizer's are padding)
        a_eos = c.eos_token_id if c.eos_token_id is not None else self.a_tok.eos_token_id
        self.a_eos, self.a_special = a_eos, self.a_tok.special_ids()
        self.t_eos = eos_ids[0] if eos_ids else None
        self.t_vocab = vocab
        self.k = gc.num_assistant_tokens
        self.adapt = gc.num_assistant_tokens_schedule != "constant"
        self.threshold = gc.assistant_confidence_threshold or 0.0
        self.a_behind, self.t_behind = gc.assistant_lookbehind, gc.target_lookbehind
        self.chunk = gc.prefill_chunk_size
        self.text = bytearray()  # the model's sequence's bytes
        self.t_ends: list[int] = []  # where each of its tokens ends in them
        self.a_tokens: list[int] = []  # the assistant's tokens of text[:whole_chars(text)]
        self.a_ends: list[int] = []  # where each ends in `text` (clamped where the text was no UTF-8)
        self.fed: list[int] = []  # the tokens in the assistant's cache
        self._spelled: dict[Tokenizer, dict[int, bytes]] = {self.a_tok: {}, self.t_tok: {}}
        self.picker = picker if gc.do_sample else None
        if self.picker is not None:
            to_target, to_assistant = shared_tokens(self.a_tok, self.t_tok, self.a_vocab, vocab)
            shared = (to_target >= 0).nonzero()[:, 0]
            self.shared = shared.to(picker.device)  # the assistant's tokens that the model has
            self.shared_ids = to_target[shared].to(picker.device)  # their ids in the model's vocabulary
            self.to_assistant = to_assistant.tolist()
            self.a_eos_to_t = self.a_eos is not None and self.a_eos < self.a_vocab and self.t_eos is not None

    def spell(self, tokenizer: Tokenizer, token: int) -> bytes:
        """tokenizer.token_bytes(token), remembered."""
        table = self._spelled[tokenizer]
        if token not in table:
            table[token] = tokenizer.token_bytes(token)
        return table[token]

    def read(self, seq: list[int]) -> None:
        """Take the model's tokens added since the last round into `text`, then encode the assistant's tail again
        over the whole characters they complete."""
        for token in seq[len(self.t_ends) :]:
            self.text += self.spell(self.t_tok, token)
            self.t_ends.append(len(self.text))
        whole = whole_chars(self.text)
        if whole <= (self.a_ends[-1] if self.a_ends else 0):
            return
        i = max(0, len(self.a_tokens) - self.a_behind)
        while i and _continues(self.text, self.a_ends[i - 1]):
            i -= 1
        start = self.a_ends[i - 1] if i else 0
        new = self.a_tok.encode(bytes(self.text[start:whole]).decode("utf-8", "replace"))
        ends, at = [], start
        for token in new:
            at += len(self.spell(self.a_tok, token))
            ends.append(min(at, whole))
        if ends:
            ends[-1] = whole
        self.a_tokens[i:], self.a_ends[i:] = new, ends

    def _logits(self, tokens: list[int]) -> torch.Tensor:
        """The assistant's next-token logits (V of its tokenizer,) fp32 after feeding `tokens` to its cache."""
        x = torch.tensor([tokens], device=self.device)
        self.fed += tokens
        return prefill(self.model, x, self.cache, chunk=self.chunk, last_only=True)[0, -1, : self.a_vocab].float()

    def _first_logits(self, limit: int) -> torch.Tensor | None:
        """The assistant's logits after a_tokens, its cache kept where it still holds them; None where `limit`
        more tokens would not fit in its cache."""
        n = len(self.a_tokens)
        if n == 0 or n + limit > self.cache.max_len:
            return None
        self.cache.length = min(shared_prefix(self.fed, self.a_tokens), n - 1)
        self.fed = self.fed[: self.cache.length]
        return self._logits(self.a_tokens[self.cache.length :])

    def assistant_tokens(self, limit: int) -> tuple[list[int], bool]:
        """Up to `limit` greedy tokens of the assistant after a_tokens, and whether it ended the text (its eos)."""
        logits = self._first_logits(limit)
        if logits is None:
            return [], False
        new: list[int] = []
        while True:
            p = logits.softmax(dim=-1)
            token = int(p.argmax())
            if token in self.a_special:
                return new, token == self.a_eos
            new.append(token)
            if len(new) == limit or float(p[token]) < self.threshold:
                return new, False
            logits = self._logits([token])

    def to_target(self, seq: list[int], new: list[int], ended: bool, limit: int) -> list[int]:
        """The model's tokens for the bytes the assistant's `new` tokens add to its sequence `seq` (+ its eos if
        the assistant `ended`), at most `limit`."""
        whole = self.a_ends[-1]
        held = bytes(self.text[whole:])  # an unfinished character of the model's, which the assistant must finish
        added = b"".join(self.spell(self.a_tok, t) for t in new)
        if not added.startswith(held):
            return []
        added = added[len(held) :]  # the bytes past the model's sequence

        def inside(at: int) -> bool:  # whether byte `at` of text + added is inside a character
            return _continues(self.text, at) if at < len(self.text) else _continues(added, at - len(self.text))

        j = max(0, len(seq) - self.t_behind)
        while j and inside(self.t_ends[j - 1]):
            j -= 1
        base = bytes(self.text[self.t_ends[j - 1] if j else 0 :])
        context = base + added
        cut = whole_chars(context)
        guesses: list[int] = []
        if cut > len(base):
            encoded = self.t_tok.encode(context[:cut].decode("utf-8", "replace"))
            if encoded[: len(seq) - j] == seq[j:]:
                guesses = encoded[len(seq) - j :]
            elif not _continues(added, 0):  # the model's tokens would be cut otherwise: the new bytes alone
                guesses = self.t_tok.encode(added[: whole_chars(added)].decode("utf-8", "replace"))
        if ended and cut == len(context) and self.t_eos is not None:
            guesses.append(self.t_eos)
        valid = next((i for i, t in enumerate(guesses) if t >= self.t_vocab), len(guesses))
        return guesses[: min(limit, valid)]

    def sampled(self, seq: list[int], limit: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to `limit` of the model's tokens, sampled by the assistant in the shared tokens from its logits
        carried into the model's vocabulary and processed as the model's, and their probabilities q (c, V)."""
        if self.a_ends[-1:] != [len(self.text)]:  # an unfinished character of the model's: its tokens cannot go on
            return [], None
        logits = self._first_logits(limit)
        guesses: list[int] = []
        probs: list[torch.Tensor] = []
        while logits is not None:
            logits = logits.to(self.picker.device)
            carried = logits.new_full((1, self.t_vocab), -float("inf"))  # (1, V) in the model's vocabulary
            carried[0, self.shared_ids] = logits.index_select(0, self.shared)
            if self.a_eos_to_t:
                carried[0, self.t_eos] = logits[self.a_eos]
            scores = self.picker.scores(carried, seq, guesses)
            if not bool(torch.isfinite(scores).any()):  # the processors allow none of the shared tokens
                break
            token = self.picker.pick(scores)[0]
            p = scores.softmax(dim=-1)[0]
            guesses.append(token)
            probs.append(p)
            a = -1 if token in self.picker.processors.eos_ids else self.to_assistant[token]
            if len(guesses) == limit or a < 0 or float(p[token]) < self.threshold:
                break  # (a < 0: an eos, or a token a processor forced outside the shared ones)
            logits = self._logits([a])
        return guesses, torch.stack(probs) if probs else None

    def guess(self, seq: list[int], limit: int) -> tuple[list[int], torch.Tensor | None]:
        limit = min(limit, self.k)
        if limit <= 0:
            return [], None
        self.read(seq)
        if self.picker is not None:
            return self.sampled(seq, limit)
        new, ended = self.assistant_tokens(limit)
        if not new and not ended:
            return [], None
        return self.to_target(seq, new, ended, limit), None

    def update(self, kept: int, guessed: int) -> None:
        if self.adapt:  # transformers' "heuristic" schedule
            self.k = self.k + 2 if kept == guessed else max(1, self.k - 1)
