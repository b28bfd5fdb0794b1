"""A structured-output constraint over a tokenizer's vocabulary: which tokens may come next, so that the generated
text is a whole match of a regex (neolm.structured.regex) when the sequence ends.

Each automaton state's allowed tokens are found once, when a sequence first reaches the state: every token's bytes
are walked through the automaton together, one byte position at a time (a numpy gather over the tokens that have
a byte there), and the tokens that do not end in the dead state are allowed. eos is allowed where a match may end.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from neolm.structured.regex import DFA

MASKS_KEPT = 256  # automaton states whose allowed tokens a guide (and each Follower) keeps: 50 KB each with a 50k
# vocabulary, so at most ~13 MB a guide; the compiled-spec cache (neolm.structured) keeps 32 guides


class Vocabulary:
    """A tokenizer's tokens as bytes, for walking them through automata: special tokens and tokens of no bytes are
    never allowed (they stand for no text)."""

    def __init__(self, token_bytes: Sequence[bytes | None]):
        self.size = len(token_bytes)
        self.bytes = list(token_bytes)
        kept = sorted((i for i, b in enumerate(token_bytes) if b), key=lambda i: -len(token_bytes[i]))
        self.order = np.array(kept, dtype=np.int64)  # token ids, longest first
        longest = len(token_bytes[kept[0]]) if kept else 0
        lengths = np.array([len(token_bytes[i]) for i in kept])
        padded = np.zeros((len(kept), longest), dtype=np.uint8)
        for row, i in enumerate(kept):
            padded[row, : len(token_bytes[i])] = np.frombuffer(token_bytes[i], dtype=np.uint8)
        # column j: byte j of the tokens that have one (the first of `order`, as they are longest first)
        self.columns = [np.ascontiguousarray(padded[: int((lengths > j).sum()), j]) for j in range(longest)]

    @classmethod
    def of(cls, tokenizer) -> Vocabulary:
        return _vocabulary(tokenizer)


@functools.lru_cache(maxsize=8)
def _vocabulary(tokenizer) -> Vocabulary:
    special = tokenizer.special_ids()
    return Vocabulary([None if i in special else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)])


class Guide:
    """A compiled constraint (neolm.structured.compile): the automaton of the text allowed, over a vocabulary."""

    def __init__(self, dfa: DFA, vocabulary: Vocabulary, description: str):
        self.dfa, self.vocabulary, self.description = dfa, vocabulary, description
        width = max(dfa.classes) + 1
        self._flat = np.array(dfa.table, dtype=np.int32).reshape(-1)  # state * width + byte class -> state
        classes = np.array(dfa.classes, dtype=np.int32)
        self._columns = [classes[c] for c in vocabulary.columns]  # the vocabulary's bytes as classes
        self._width = width
        self._masks: OrderedDict[int, torch.Tensor] = OrderedDict()  # state -> (vocabulary,) bool, latest use last

    def __repr__(self) -> str:
        return f"Guide({self.description}, {self.dfa.states} states)"

    def allowed(self, state: int) -> torch.Tensor:
        """(vocabulary size,) bool: the tokens that keep a match possible from `state` (eos not included)."""
        mask = self._masks.get(state)
        if mask is not None:
            self._masks.move_to_end(state)
            return mask
        v, flat, width = self.vocabulary, self._flat, self._width
        at = np.full(len(v.order), state, dtype=np.int32)
        for j, column in enumerate(self._columns):  # the tokens with a byte at j are the first len(column)
            n = len(column)
            head = at[:n]
            head[...] = flat[head * width + column]
            if j % 16 == 15 and not head.any():  # the longer tokens are all dead already (whitespace runs, mostly)
                break
        allowed = np.zeros(v.size, dtype=bool)
        allowed[v.order] = at != 0
        mask = torch.from_numpy(allowed)
        self._masks[state] = mask
        if len(self._masks) > MASKS_KEPT:
            self._masks.popitem(last=False)
        return mask

    def advance(self, state: int, token: int) -> int:
        """The state after `token` (0, the dead state, for a token that breaks the match or stands for no text)."""
        data = self.vocabulary.bytes[token] if 0 <= token < self.vocabulary.size else None
        return self.dfa.walk(state, data) if data else 0

    def accepting(self, state: int) -> bool:
        return self.dfa.accepting[state]

    def text_state(self, tokens: Sequence[int]) -> int:
        """The state after these tokens from the start."""
        state = 1
        for token in tokens:
            state = self.advance(state, token)
            if not state:
                break
        return state


class Follower:
    """The logits processor of a guide for one GenerationConfig's rows: each row's automaton state is followed from
    its new tokens (kept between calls for the histories it has seen, which only grow), and every token that would
    break the match gets -inf; eos gets -inf until a match may end. A row left nothing (its state is dead, or
    other processors ruled out all it allows) may only end: eos."""

    def __init__(self, guide: Guide, eos_ids: list[int], vocab: int, device):
        self.guide, self.vocab, self.device = guide, vocab, device
        self.eos = torch.tensor(eos_ids, dtype=torch.long)
        self._rows: dict[int, tuple[Sequence[int], int, int]] = {}  # id(history) -> (history, tokens read, state)
        self._masks: dict[int, torch.Tensor] = {}  # state -> (vocab,) bool: its allowed tokens, eos included

    def mask(self, state: int) -> torch.Tensor:
        """(vocab,) bool: what a row in `state` may generate next, eos included where the match may end."""
        mask = self._masks.get(state)
        if mask is None:
            size = self.guide.vocabulary.size
            allowed = self.guide.allowed(state) if state else torch.zeros(size, dtype=torch.bool)
            mask = torch.zeros(self.vocab, dtype=torch.bool)
            mask[: min(size, self.vocab)] = allowed[: self.vocab]
            if not state or self.guide.accepting(state):
                mask[self.eos] = True
            if len(self._masks) >= MASKS_KEPT:
                self._masks.clear()
            self._masks[state] = mask
        return mask

    def state(self, history: Sequence[int], new: int) -> int:
        """The row's state after its `new` last tokens."""
        held = self._rows.get(id(history))
        start = len(history) - new
        if held is not None and held[0] is history and held[1] <= len(history):
            read, state = held[1], held[2]
        else:
            read, state = start, 1
        for token in history[read:]:
            state = self.guide.advance(state, int(token)) if state else 0
        return state

    def __call__(self, scores: torch.Tensor, tokens: Sequence[Sequence[int]], new: torch.Tensor) -> torch.Tensor:
        rows, masks = {}, []
        for history, n in zip(tokens, new.tolist()):
            state = self.state(history, n)
            rows[id(history)] = (history, len(history), state)
            masks.append(self.mask(state))
        self._rows = rows  # only the rows of this call: finished ones leave
        allowed = torch.stack(masks).to(scores.device)
        scores = scores.masked_fill(~allowed, -float("inf"))
        stuck = torch.isneginf(scores).all(dim=-1)
        if stuck.any():
            scores[stuck.nonzero()[:, :1], self.eos.to(scores.device)] = 0.0
        return scores
