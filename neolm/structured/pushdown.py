"""Structured outputs past a finite automaton: rules that recurse (a grammar's JSON `value`, a schema's recursive
$ref) followed with a stack of calls, so the text may nest as deep as it likes.

The rules are one DFA (regex.compile_rules): each rule has states of its own, and from a state that calls rule k
the text goes on at k's start, with the state after the call pushed, to return to wherever k may end. A guide
state is a set of (automaton state, stack) pairs: the readings of the text so far (a rule that may end may also go
on, as a number's digits do). The sets themselves are the guide's states (frozensets: nothing is kept per text
read), with 0 for the empty set (dead) and 1 for the start as a DFA guide's, so a PushdownGuide is a Guide to the
Follower.

Allowed tokens, split as xgrammar splits them: what a token does inside the rule of a state (its bytes, the calls
it makes and their returns) depends on that state alone, so a state's walk of the whole vocabulary is done once,
all tokens at once as the DFA guide's (each with a stack of its own calls), and kept. A token whose walk leaves the
rule (it may end, and the token has bytes left) is noted with where it left; only those are walked on, one by
one, from the returns the actual stack holds.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from neolm.errors import NeolmError
from neolm.structured.guide import MASKS_KEPT, Guide, Vocabulary
from neolm.structured.regex import DFA

WALKS_KEPT = 1 << 16  # token ends walked on from a stack whose answer a guide keeps
_BITS = 21  # a walk's threads are keyed as (token, state, stack) in 64 bits: states and stacks below 2**21


class PushdownGuide(Guide):
    """A Guide over rules that call each other (DFA.rules > 1, or a rule that calls itself)."""

    def __init__(self, dfa: DFA, vocabulary: Vocabulary, description: str):
        rule = dfa.left_recursive()
        if rule is not None:
            raise NeolmError(f"rule {rule} calls itself before reading anything (left recursion), which a stack of "
                             "calls cannot follow: write it as a repeat (`a ::= b (\"x\" b)*`)")  # fmt: skip
        if dfa.states >= 1 << _BITS:
            raise NeolmError(f"the rules are too large for structured outputs ({dfa.states:,} automaton states)")
        super().__init__(dfa, vocabulary, description)
        # state -> [(start of the rule it calls, state to return to)]; a call after which the rule can only end (a
        # tail call: `ws ::= [ ] ws | `) returns where its caller would, and pushes nothing (its return state: 0)
        final = [dfa.accepting[s] and not any(row) for s, row in enumerate(dfa.table)]
        self._calls = [[(dfa.starts[k], 0 if final[r] else r) for k in range(dfa.rules) if (r := dfa.call(s, k))]
                       for s in range(dfa.states)]  # fmt: skip
        self._calling = np.array([bool(c) for c in self._calls])
        self._ending = np.array(dfa.accepting)
        # without rules that may read nothing, every call reads before its rule returns: a walk's closure (calls
        # down, returns up) cannot come back to a thread it had, and needs no check for those (with them, from its
        # third round on: the first two are most of a closure, and repeats there only cost a little work)
        self._cycles = bool(dfa.empty_rules())
        self._up, self._back = [0], [0]  # stack n: the stack under its top (n=0: empty), the state its top returns to
        self._stacks: dict[tuple[int, int], int] = {}
        self._insides: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()
        self._went: OrderedDict[tuple[frozenset, bytes], bool] = OrderedDict()  # _goes_on's answers, oldest first

    def __repr__(self) -> str:
        return f"PushdownGuide({self.description}, {self.dfa.states} states, {self.dfa.rules} rules)"

    # the stacks and the sets of readings

    def _closure(self, pairs) -> set[tuple[int, int]]:
        """The readings `pairs` stand for before their next byte: every return of a rule that may end, and every
        call from a state that makes one."""
        out, todo = set(pairs), list(pairs)
        while todo:
            state, stack = todo.pop()
            more = [(start, self._push(stack, back)) for start, back in self._calls[state]]
            if stack and self.dfa.accepting[state]:
                more.append((self._back[stack], self._up[stack]))
            for pair in more:
                if pair not in out:
                    out.add(pair)
                    todo.append(pair)
        return out

    def _push(self, stack: int, back: int) -> int:
        return _push(self._up, self._back, self._stacks, stack, back)

    def _walk(self, pairs, data: bytes) -> frozenset:
        table, classes = self.dfa.table, self.dfa.classes
        for b in data:
            c = classes[b]
            pairs = {(t, stack) for state, stack in self._closure(pairs) if (t := table[state][c])}
            if not pairs:
                break
        return frozenset(pairs)

    def _goes_on(self, pairs: frozenset, rest: bytes) -> bool:
        """Whether the readings `pairs` can read `rest` (kept: tokens share their ends, `",` `]]` `}\\n`, and texts
        return to the same stacks)."""
        key = (pairs, rest)
        found = self._went.get(key)
        if found is None:
            found = self._went[key] = bool(self._walk(pairs, rest))
            if len(self._went) > WALKS_KEPT:
                self._went.popitem(last=False)
        return found

    def _readable(self, pairs) -> np.ndarray:
        """(byte classes,) bool: the classes of the bytes that the readings `pairs` may read next."""
        states = np.array([s for s, _ in self._closure(pairs)], dtype=np.int64)
        return (self._flat.reshape(-1, self._width)[states] != 0).any(axis=0)

    # the Guide's interface

    def advance(self, state: frozenset | int, token: int) -> frozenset | int:
        data = self.vocabulary.bytes[token] if 0 <= token < self.vocabulary.size else None
        return (self._walk(_pairs(state), data) or 0) if data and state else 0

    def accepting(self, state: frozenset | int) -> bool:
        return any(stack == 0 and self.dfa.accepting[s] for s, stack in self._closure(_pairs(state)))

    def fullmatch(self, data: bytes) -> bool:
        """Whether the rules match `data` whole (as DFA.fullmatch)."""
        return self.accepting(self._walk(START, data) or 0)

    def allowed(self, state: frozenset | int) -> torch.Tensor:
        mask = self._masks.get(state)
        if mask is not None:
            self._masks.move_to_end(state)
            return mask
        v = self.vocabulary
        allowed = np.zeros(v.size, dtype=bool)
        # every reading, with its returns and calls: a walk notes the tokens that leave its rule from their second
        # byte on, so a return before the first byte (a called rule that may read nothing ending) is a reading here
        for s, stack in self._closure(_pairs(state)):
            inside, tokens, at, then = self._inside(s)
            allowed |= inside
            if not stack:
                continue
            back = frozenset({(self._back[stack], self._up[stack])})
            go_on = self._readable(back)[then] & ~allowed[tokens]  # (most fail at their next byte: filtered at once)
            for token, j in zip(tokens[go_on].tolist(), at[go_on].tolist()):
                if not allowed[token]:
                    allowed[token] = self._goes_on(back, v.bytes[token][j:])
        mask = torch.from_numpy(allowed)
        self._masks[state] = mask
        if len(self._masks) > MASKS_KEPT:
            self._masks.popitem(last=False)
        return mask

    # one state's walk of the whole vocabulary

    def _inside(self, state: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(allowed, tokens, at, then): the tokens read whole from `state` without leaving its rule ((vocabulary,)
        bool); and the tokens (ids) that may leave it after their first `at` bytes, and the class of the byte they
        go on with."""
        found = self._insides.get(state)
        if found is not None:
            self._insides.move_to_end(state)
            return found
        v, flat, width = self.vocabulary, self._flat, self._width
        up, back, stacks = [0], [0], {}  # the walk's own stacks, as the guide's
        tok = np.arange(len(v.order))  # each thread's token (its place in v.order), state and stack
        st = np.full(len(tok), state, dtype=np.int64)
        sk = np.zeros(len(tok), dtype=np.int64)
        allowed = np.zeros(v.size, dtype=bool)
        left_tok, left_at, left_then = [], [], []
        for j, column in enumerate(self._columns):  # the tokens with a byte at j are the first len(column)
            if j:
                whole = tok >= len(column)  # tokens read whole by a live thread
                allowed[v.order[tok[whole]]] = True
                tok, st, sk = tok[~whole], st[~whole], sk[~whole]
            tok, st, sk, out = self._close(tok, st, sk, up, back, stacks)
            if j and len(out):
                left_tok.append(v.order[out])
                left_at.append(np.full(len(out), j))
                left_then.append(column[out])
            st = flat[st * width + column[tok]]
            live = st != 0
            tok, st, sk = tok[live], st[live], sk[live]
            if not len(tok):
                break
        allowed[v.order[tok]] = True  # (the longest tokens, if any thread is left)
        found = (
            allowed,
            *(np.concatenate(x) if x else np.zeros(0, dtype=np.int64) for x in (left_tok, left_at, left_then)),
        )
        self._insides[state] = found
        if len(self._insides) > MASKS_KEPT:
            self._insides.popitem(last=False)
        return found

    def _close(self, tok, st, sk, up: list, back: list, stacks: dict):
        """The threads and their closure before the next byte: the calls they make, and returns to stacks of the
        walk's own (up, back, stacks: as the guide's); and the tokens of threads that may leave the rule (their
        stack is empty and the rule may end)."""
        t, s, k = tok, st, sk
        parts, out, seen, rounds = [], [], None, 0
        while True:
            parts.append((t, s, k))
            more = []
            ending = self._ending[s]
            if ending.any():
                pop = ending & (k > 0)
                if pop.any():
                    more.append((t[pop], np.array(back)[k[pop]], np.array(up)[k[pop]]))
                out.append(t[ending & (k == 0)])
            calling = self._calling[s]
            if calling.any():
                for u in np.unique(s[calling]).tolist():
                    at = s == u
                    kids, inverse = np.unique(k[at], return_inverse=True)
                    for start, ret in self._calls[u]:
                        pushed = np.array([_push(up, back, stacks, x, ret) for x in kids.tolist()], dtype=np.int64)
                        more.append((t[at], np.full(len(inverse), start, dtype=np.int64), pushed[inverse]))
            if not more:
                break
            if len(up) >= 1 << _BITS:
                raise NeolmError("structured outputs: a token's walk nests its rules too deep")
            t, s, k = (np.concatenate(x) for x in zip(*more))
            rounds += 1
            if self._cycles and rounds > 2:  # a rule that may read nothing can come back to where its call began
                key, first = np.unique((t << (2 * _BITS)) | (s << _BITS) | k, return_index=True)
                if seen is None:
                    seen = (tok << (2 * _BITS)) | (st << _BITS) | sk
                new = ~np.isin(key, seen)
                seen = np.concatenate([seen, key[new]])
                t, s, k = t[first[new]], s[first[new]], k[first[new]]
            if not len(t):
                break
        if len(parts) > 1:
            tok, st, sk = (np.concatenate(x) for x in zip(*parts))
        if not out:
            return tok, st, sk, tok[:0]
        leaving = np.zeros(len(self.vocabulary.order), dtype=bool)
        for t in out:
            leaving[t] = True
        return tok, st, sk, np.flatnonzero(leaving)


START = frozenset({(1, 0)})  # the start state's reading: the root rule's start, on the empty stack


def _pairs(state: frozenset | int) -> frozenset:
    """A state's readings (1 and 0: the start and dead states' ints, as the DFA guide's)."""
    return START if state == 1 else frozenset() if state == 0 else state


def _push(up: list, back: list, stacks: dict, stack: int, ret: int) -> int:
    """The stack `stack` with `ret` pushed, interned in (up, back, stacks); a tail call (ret 0) pushes nothing."""
    if not ret:
        return stack
    key = (stack, ret)
    found = stacks.get(key)
    if found is None:
        found = stacks[key] = len(up)
        up.append(stack)
        back.append(ret)
    return found
