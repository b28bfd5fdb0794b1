"""Regular expressions compiled to deterministic automata over UTF-8 bytes, for structured outputs.

Byte-level BPE tokens are byte strings (a token may hold half a UTF-8 character), so the automaton reads bytes:
a character class becomes the byte sequences of its characters' UTF-8 encodings. The pattern must match the whole
output (as re.fullmatch). The syntax is Python's `re` without what needs more than a finite automaton:

- literals and escapes (\\n \\t \\r \\f \\v \\0 \\xhh \\uhhhh \\U00hhhhhh, \\ before punctuation), `.` (any character
  but a newline), classes `[a-z_]`, `[^"\\\\]`, and \\d \\w \\s (ASCII, as JSON Schema's regexes) with \\D \\W \\S;
- groups `(...)`, `(?:...)`, `(?P<name>...)`, alternation `|`, and `* + ? {n} {n,} {,m} {n,m}` (lazy forms too:
  the set of strings matched is the same);
- `^` at the start and `$` at the end (the match is whole anyway);
- look-aheads `(?=...)` and `(?!...)`, not nested (the automaton runs each as an obligation beside the pattern).

Back-references, look-behinds, word boundaries and inline flags raise NeolmError, as do patterns whose automaton
would pass MAX_STATES states. compile_rules reads several patterns, which call each other with PCRE's `(?&k)`
(grammars and JSON schemas whose rules recurse), into one automaton whose calls neolm.structured.pushdown follows.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

from neolm.errors import NeolmError

MAX_CODE = 0x10FFFF
MAX_STATES = 50_000  # automaton states a pattern may have (a guard against {0,100000}-sized patterns)
MAX_NFA = 400_000  # the nondeterministic automaton's states
CALL = 256  # rule k's call is the symbol CALL + k, after the 256 bytes (compile_rules)
NOTHING = r"[^\s\S]"  # a regex that matches no text

_ANY = ((0, MAX_CODE),)
_DIGIT = ((0x30, 0x39),)
_WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_SPACE = ((0x09, 0x0D), (0x20, 0x20))
_SIMPLE = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}


def _merge(ranges) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint, non-adjacent code point ranges."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _complement(ranges) -> tuple[tuple[int, int], ...]:
    out, start = [], 0
    for lo, hi in _merge(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODE:
        out.append((start, MAX_CODE))
    return tuple(out)


class _Parser:
    """Pattern text -> a tree of tuples: ("set", ranges), ("cat", [nodes]), ("alt", [nodes]), ("rep", node, lo, hi)
    (hi None: no limit), ("look", positive, node) for `(?=...)` / `(?!...)`, and with `rules` ("call", k) for
    `(?&k)`, k < rules (compile_rules)."""

    def __init__(self, pattern: str, rules: int = 0):
        self.p, self.i, self.rules = pattern, 0, rules
        self.looking = False  # inside a look-ahead

    def error(self, what: str) -> NeolmError:
        return NeolmError(f"regex {self.p!r}: {what} at position {self.i}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self):
        node = self.alternation()
        if self.i < len(self.p):
            raise self.error("unbalanced ')'")
        return node

    def alternation(self):
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self):
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            items.append(self.quantified(self.atom()))
        return ("cat", items)

    def quantified(self, node):
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                self.i += 1
            elif c == "{" and (bounds := self.bounds()) is not None:
                lo, hi = bounds
            else:
                return node
            if self.peek() == "?":  # lazy: the same strings
                self.i += 1
            elif self.peek() == "+":
                raise self.error("possessive quantifiers are not supported")
            if node == ("cat", []) or node[0] == "look":
                raise self.error("nothing to repeat")
            node = ("rep", node, lo, hi)

    def bounds(self) -> tuple[int, int | None] | None:
        """{n}, {n,}, {,m}, {n,m} at self.i (consumed), or None where "{" is a literal (as in Python)."""
        end = self.p.find("}", self.i)
        if end < 0:
            return None
        body = self.p[self.i + 1 : end]
        lo, comma, hi = body.partition(",")
        if not (lo.isdigit() or (comma and lo == "")) or not (hi.isdigit() or hi == ""):
            return None
        if not comma:
            hi = lo
        lo_n, hi_n = int(lo or 0), (int(hi) if hi else None)
        if hi_n is not None and hi_n < lo_n:
            raise self.error("a repeat's minimum exceeds its maximum")
        self.i = end + 1
        return lo_n, hi_n

    def atom(self):
        c = self.p[self.i]
        self.i += 1
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i):
                self.i = self.p.index(">", self.i) + 1
            elif self.p.startswith("?&", self.i) and self.rules:
                return self.call()
            elif self.p.startswith(("?=", "?!"), self.i):
                return self.look()
            elif self.peek() == "?":
                raise self.error("look-behinds, inline flags and conditionals are not supported")
            node = self.alternation()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.i += 1
            return node
        if c == "[":
            return ("set", self.cls())
        if c == ".":
            return ("set", _complement([(10, 10)]))
        if c == "\\":
            return ("set", self.escape())
        if c == "^" and self.i == 1:
            return ("cat", [])
        if c == "$" and self.i == len(self.p):
            return ("cat", [])
        if c in "^$":
            raise self.error(f"'{c}' is only supported at the pattern's {'start' if c == '^' else 'end'}")
        if c in "*+?":
            raise self.error("nothing to repeat")
        if c == ")":
            raise self.error("unbalanced ')'")
        return ("set", ((ord(c), ord(c)),))

    def look(self):
        """`(?=X)` or `(?!X)` after its "(" (consumed): ("look", positive, X), which reads nothing but holds where
        some text that follows starts with a match of X (positive), or where none does."""
        if self.looking:
            raise self.error("a look-ahead inside a look-ahead is not supported")
        positive = self.p[self.i + 1] == "="
        self.i += 2
        self.looking = True
        node = self.alternation()
        self.looking = False
        if self.peek() != ")":
            raise self.error("missing ')'")
        self.i += 1
        return ("look", positive, node)

    def call(self):
        """`(?&k)` after its "(" (consumed): rule k read here (PCRE's syntax for a call of a group)."""
        if self.looking:
            raise self.error("a rule's call inside a look-ahead is not supported")
        end = self.p.find(")", self.i)
        name = self.p[self.i + 2 : end] if end > 0 else ""
        if not name.isdigit() or int(name) >= self.rules:
            raise self.error(f"(?&{name}) calls no rule (there are {self.rules})")
        self.i = end + 1
        return ("call", int(name))

    def escape(self) -> tuple[tuple[int, int], ...]:
        """The characters of the escape after a backslash (consumed)."""
        if self.i >= len(self.p):
            raise self.error("a pattern cannot end in a backslash")
        c = self.p[self.i]
        self.i += 1
        classes = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
        if c in classes:
            return classes[c]
        if c.lower() in classes:
            return _complement(classes[c.lower()])
        if c in _SIMPLE and not (c == "0" and self.peek() is not None and self.peek().isdigit()):
            return ((ord(_SIMPLE[c]),) * 2,)
        digits = {"x": 2, "u": 4, "U": 8}.get(c)
        if digits:
            text = self.p[self.i : self.i + digits]
            if len(text) != digits or any(ch not in "0123456789abcdefABCDEF" for ch in text):
                raise self.error(f"\\{c} needs {digits} hex digits")
            self.i += digits
            code = int(text, 16)
            if code > MAX_CODE:
                raise self.error("a code point past U+10FFFF")
            return ((code, code),)
        if c.isalnum():
            raise self.error(f"\\{c} is not supported (back-references, anchors and word boundaries need more "
                             "than a finite automaton)")  # fmt: skip
        return ((ord(c), ord(c)),)

    def cls(self) -> tuple[tuple[int, int], ...]:
        """A [...] class after its "[" (consumed): its code point ranges."""
        negate = self.peek() == "^"
        self.i += negate
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("missing ']'")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            lo = self.class_item()
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                hi = self.class_item()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    raise self.error("a class range needs single characters at its ends")
                if hi[0][0] < lo[0][0]:
                    raise self.error("a class range's end comes before its start")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges.extend(lo)
        return _complement(ranges) if negate else _merge(ranges)

    def class_item(self) -> tuple[tuple[int, int], ...]:
        c = self.p[self.i]
        self.i += 1
        if c == "\\":
            if self.peek() == "b":  # a backspace inside a class
                self.i += 1
                return ((8, 8),)
            return self.escape()
        return ((ord(c), ord(c)),)


def _utf8(code: int) -> bytes:
    return chr(code).encode("utf-8", "surrogatepass")


def utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """The code points lo..hi (surrogates left out) as byte-range sequences: a string of bytes encodes one of them
    exactly when it has some sequence's length and each byte lies in that sequence's range at its place."""
    out, todo = [], [(lo, hi)]
    while todo:
        lo, hi = todo.pop()
        if lo > hi:
            continue
        if lo <= 0xDFFF and hi >= 0xD800:  # no surrogates in UTF-8
            todo += [(lo, 0xD7FF), (0xE000, hi)]
            continue
        split = next((m for m in (0x7F, 0x7FF, 0xFFFF) if lo <= m < hi), None)
        if split is not None:  # one encoded length at a time
            todo += [(lo, split), (split + 1, hi)]
            continue
        for i in (1, 2, 3):  # continuation bytes: the ranges must be whole below the byte that differs
            m = (1 << (6 * i)) - 1
            if lo & ~m != hi & ~m:
                if lo & m:
                    todo += [(lo, lo | m), ((lo | m) + 1, hi)]
                    break
                if hi & m != m:
                    todo += [(lo, (hi & ~m) - 1), (hi & ~m, hi)]
                    break
        else:
            out.append(list(zip(_utf8(lo), _utf8(hi))))
    return out


def _flat(items) -> list:
    """Nodes in sequence, nested concatenations (groups) spelled out."""
    out = []
    for item in items:
        out += _flat(item[1]) if item[0] == "cat" else [item]
    return out


def _repeated_suffix(items: list, i: int, limit: int) -> tuple[list, int] | None:
    """(S, k) where items[i + 1] is (S X)* and X is items[i - k + 1 .. i] (k <= limit; groups spelled out on both
    sides): a separated list `X (S X)*` (JSON's arrays and objects, GBNF's `value ("," ws value)*`), whose repeats
    can loop back into X's copy instead of each building their own; None otherwise. Nested lists then cost one copy
    of their item a level, not two (JSON nested d levels: the automaton grows as 2^d, not 4^d)."""
    following = items[i + 1] if i + 1 < len(items) else None
    if following is None or following[0] != "rep" or following[2:] != (0, None):
        return None
    body = _flat([following[1]])
    x: list = []
    found = None
    for k in range(1, min(i + 1, limit) + 1):  # the longest X: the more the repeats share, the smaller the automaton
        x = _flat([items[i - k + 1]]) + x
        if len(x) > len(body):
            break
        if body[len(body) - len(x) :] == x:
            found = body[: len(body) - len(x)], k
    return found


class _NFA:
    def __init__(self):
        self.edges: list[list[tuple[int, int, int]]] = []  # state -> (byte lo, byte hi, next state)
        self.eps: list[list[int]] = []
        # state -> (positive, X's start, X's end, next state): a move that reads nothing and leaves the look-ahead
        # on X behind it as an obligation on the text that follows (_Looking)
        self.looks: dict[int, list[tuple[bool, int, int, int]]] = {}

    def state(self) -> int:
        if len(self.edges) >= MAX_NFA:
            raise NeolmError(f"the pattern is too large for structured outputs (over {MAX_NFA:,} automaton states)")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def build(self, node) -> tuple[int, int]:
        """States (start, end) of a fragment that reads node's strings."""
        kind = node[0]
        if kind == "call":  # a symbol of its own past the bytes: CALL + k
            start, end = self.state(), self.state()
            self.edges[start].append((CALL + node[1], CALL + node[1], end))
            return start, end
        if kind == "look":
            x_start, x_end = self.build(node[2])  # (reached only through the obligation)
            start, end = self.state(), self.state()
            self.looks.setdefault(start, []).append((node[1], x_start, x_end, end))
            return start, end
        if kind == "set":
            start, end = self.state(), self.state()
            for seq in (s for lo, hi in node[1] for s in utf8_sequences(lo, hi)):
                at = start
                for j, (blo, bhi) in enumerate(seq):
                    nxt = end if j == len(seq) - 1 else self.state()
                    self.edges[at].append((blo, bhi, nxt))
                    at = nxt
            return start, end
        if kind == "cat":
            start = end = self.state()
            items, i = node[1], 0
            starts: list[int] = []  # where each item built since the last shared loop starts
            while i < len(items):
                s, e = self.build(items[i])
                self.eps[end].append(s)
                end = e
                starts.append(s)
                shared = _repeated_suffix(items, i, len(starts))
                if shared:  # X (S X)*, X the last k items: S loops back into X's copy
                    separator, k = shared
                    s2, e2 = self.build(("cat", separator))
                    self.eps[end].append(s2)
                    self.eps[e2].append(starts[-k])
                    starts = []
                    i += 1
                i += 1
            return start, end
        if kind == "alt":
            start, end = self.state(), self.state()
            for branch in node[1]:
                s, e = self.build(branch)
                self.eps[start].append(s)
                self.eps[e].append(end)
            return start, end
        _, item, lo, hi = node  # "rep"
        start = at = self.state()
        for _ in range(lo):
            s, e = self.build(item)
            self.eps[at].append(s)
            at = e
        if hi is None and lo:  # X{lo,}: the last of the lo copies loops back into itself
            self.eps[at].append(s)
            return start, at
        if hi is None:
            loop = self.state()
            self.eps[at].append(loop)
            s, e = self.build(item)
            self.eps[loop].append(s)
            self.eps[e].append(loop)
            return start, loop
        end = self.state()
        for _ in range(hi - lo):
            self.eps[at].append(end)
            s, e = self.build(item)
            self.eps[at].append(s)
            at = e
        self.eps[at].append(end)
        return start, end

    def closure(self, states) -> frozenset[int]:
        seen, todo = set(states), list(states)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)


@dataclass
class DFA:
    """A deterministic automaton over bytes. Bytes fall into classes that every transition treats alike
    (classes[b]); table[s][c] is the state after a byte of class c in state s. State 0 is dead (no string from it
    is accepted, and every byte keeps it there); 1 is the start. accepting[s]: whether a match may end at s.

    Compiled from rules (compile_rules), it is a recursive transition network: rule k starts at starts[k] (rule 0,
    the whole text, at 1), its states are its own, accepting where the rule may end, and call(s, k) is the state
    that rule k's text leads to from s (read from the start of k, whose end then returns there), 0 where s calls
    no k. Bytes never call (neolm.structured.pushdown follows the calls)."""

    classes: list[int]
    table: list[list[int]]
    accepting: list[bool]
    starts: list[int] = field(default_factory=lambda: [1])

    @property
    def states(self) -> int:
        return len(self.table)

    @property
    def rules(self) -> int:
        return len(self.starts)

    @functools.cached_property
    def calls(self) -> bool:
        """Whether any state calls a rule (a DFA whose rules do not is an automaton of bytes alone); found once."""
        return any(self.call(s, k) for s in range(self.states) for k in range(self.rules))

    def step(self, state: int, byte: int) -> int:
        return self.table[state][self.classes[byte]]

    def call(self, state: int, rule: int) -> int:
        return self.table[state][self.classes[CALL + rule]] if CALL + rule < len(self.classes) else 0

    def walk(self, state: int, data: bytes) -> int:
        table, classes = self.table, self.classes
        for b in data:
            state = table[state][classes[b]]
        return state

    def fullmatch(self, data: bytes) -> bool:
        return self.accepting[self.walk(1, data)]

    def left_recursive(self) -> int | None:
        """A rule that can call itself before reading a byte (`a ::= a "x" | "y"`, or through rules that may read
        nothing), which no stack of calls can follow; None where there is none."""
        empty = self.empty_rules()
        first = {k: {j for q in self._unread(s, empty) for j in range(self.rules) if self.call(q, j)}
                 for k, s in enumerate(self.starts)}  # fmt: skip
        for k in range(self.rules):  # k calls itself through the rules it calls first?
            seen, todo = set(), list(first[k])
            while todo:
                j = todo.pop()
                if j == k:
                    return k
                if j not in seen:
                    seen.add(j)
                    todo += first[j]
        return None

    def empty_rules(self) -> set[int]:
        """The rules that may read nothing (and end), found from the ones that end at their start up."""
        empty: set[int] = set()
        while True:
            found = {k for k, s in enumerate(self.starts) if any(self.accepting[q] for q in self._unread(s, empty))}
            if found == empty:
                return empty
            empty = found

    def _unread(self, state: int, empty: set[int]) -> set[int]:
        """The states reached from `state` through calls of rules in `empty` alone (reading nothing)."""
        seen, todo = {state}, [state]
        while todo:
            q = todo.pop()
            for t in (self.call(q, k) for k in empty):
                if t and t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen


def class_text(ranges) -> str:
    """Code point ranges as a regex class (NOTHING where there are none)."""
    if not ranges:
        return NOTHING
    return "[" + "".join(f"\\U{lo:08x}" + (f"-\\U{hi:08x}" if hi > lo else "") for lo, hi in ranges) + "]"


def minus(ranges, taken) -> tuple[tuple[int, int], ...]:
    """The code points of `ranges` that are not in `taken`."""
    return _complement(list(_complement(ranges)) + list(taken))


def rewrite_sets(pattern: str, write_set) -> str:
    """The pattern as regex text in which each set of characters it reads at one place (a literal, a class, `.`,
    an escape) is write_set(its code point ranges): a regex of their encodings, where the pattern is about texts
    that the output holds encoded (a JSON string's characters)."""

    def write(node) -> str:
        kind = node[0]
        if kind == "set":
            return write_set(node[1])
        if kind == "cat":
            return "(?:" + "".join(write(n) for n in node[1]) + ")" if node[1] else ""
        if kind == "alt":
            return "(?:" + "|".join(write(n) for n in node[1]) + ")"
        if kind == "look":
            return ("(?=" if node[1] else "(?!") + write(node[2]) + ")"
        _, item, lo, hi = node  # rep (never of nothing: the parser refuses that)
        return f"(?:{write(item)}){{{lo},{'' if hi is None else hi}}}"

    return write(_Parser(pattern).parse())


def length_range(pattern: str) -> tuple[int, int | None] | None:
    """The fewest and most characters (None: no most) of the texts the pattern matches; None if it matches none
    (as if each look-ahead held: a pattern whose look-aheads never hold has a range too)."""

    def walk(node) -> tuple[int, int | None] | None:
        kind = node[0]
        if kind == "look":
            return (0, 0)
        if kind == "set":
            return (1, 1) if node[1] else None
        if kind == "cat":
            lo, hi = 0, 0
            for item in node[1]:
                part = walk(item)
                if part is None:
                    return None
                lo, hi = lo + part[0], None if hi is None or part[1] is None else hi + part[1]
            return lo, hi
        if kind == "alt":
            parts = [part for part in map(walk, node[1]) if part is not None]
            if not parts:
                return None
            return min(p[0] for p in parts), None if any(p[1] is None for p in parts) else max(p[1] for p in parts)
        _, item, lo, hi = node
        part = walk(item)
        if part is None or hi == 0:  # (read no times: only the empty text)
            return (0, 0) if lo == 0 else None
        return part[0] * lo, None if hi is None or part[1] is None else part[1] * hi

    return walk(_Parser(pattern).parse())


def compile_regex(pattern: str) -> DFA:
    """The pattern's DFA over UTF-8 bytes (NeolmError for what the module docstring lists as unsupported). The last
    32 patterns' automata are kept (do not change them)."""
    if not isinstance(pattern, str):
        raise NeolmError(f"a regex must be a string, got {type(pattern).__name__}")
    return _compiled((pattern,), False)


def compile_rules(patterns) -> DFA:
    """The DFA of rules (a recursive transition network: see DFA): patterns[k] is rule k's regex, in which `(?&j)`
    reads a text of rule j. Rule 0 is the whole text. A rule whose every text would need endless calls (`a ::= "x"
    a`) matches nothing, and so do its calls. Kept as compile_regex's automata are."""
    return _compiled(tuple(patterns), True)


@functools.lru_cache(maxsize=32)
def _compiled(patterns: tuple[str, ...], calls: bool) -> DFA:
    nfa = _NFA()
    fragments = [nfa.build(_Parser(p, len(patterns) if calls else 0).parse()) for p in patterns]
    top = CALL + len(patterns) if calls else CALL
    cuts = sorted({0, top} | {b for edges in nfa.edges for lo, hi, _ in edges for b in (lo, hi + 1)})
    spans = list(itertools.pairwise(cuts))  # symbols that every edge treats alike: [lo, hi)
    classes = [c for c, (lo, hi) in enumerate(spans) for _ in range(lo, hi)]
    ends = {end for _, end in fragments}
    subsets = _Looking(nfa) if nfa.looks else _Subsets(nfa)
    order = [frozenset()] + [subsets.first(start) for start, _ in fragments]
    sets: dict[frozenset, int] = {states: i for i, states in enumerate(order)}
    table: list[list[int]] = [[0] * len(spans)]
    while len(table) < len(order):  # each state's row, as states are found
        states, row = order[len(table)], [0] * len(spans)
        for c, (lo, _) in enumerate(spans):
            target = subsets.move(states, lo)
            if target is None:
                continue
            if target not in sets:
                if len(order) >= MAX_STATES:
                    raise NeolmError(f"the pattern is too large for structured outputs (over {MAX_STATES:,} "
                                     "automaton states): bound fewer repeats, or shorten it")  # fmt: skip
                sets[target] = len(order)
                order.append(target)
            row[c] = sets[target]
        table.append(row)
    accepting = [subsets.accepts(states, ends) for states in order]
    starts = list(range(1, len(patterns) + 1))
    _prune_calls(table, accepting, [classes[CALL + k] if CALL + k < len(classes) else None for k in range(len(starts))],
                 starts)  # fmt: skip
    if table[1] == [0] * len(spans) and not accepting[1]:
        if not calls:
            raise NeolmError(f"regex {patterns[0]!r} matches no string")
        raise NeolmError("the rules' root matches no string (each of its texts would need calls without end, or it has "
                         "none)")  # fmt: skip
    return DFA(classes, table, accepting, starts)


class _Subsets:
    """The subset construction: a state of the DFA is a set of NFA states, closed under ε-moves."""

    def __init__(self, nfa: _NFA):
        self.nfa = nfa

    def first(self, start: int) -> frozenset[int]:
        return self.nfa.closure([start])

    def move(self, states: frozenset[int], symbol: int) -> frozenset[int] | None:
        """The DFA state after reading `symbol` (None: no NFA state reads it)."""
        moved = self._step(states, symbol)
        return self.nfa.closure(moved) if moved else None

    def _step(self, states: frozenset[int], symbol: int) -> frozenset[int]:
        """The NFA states a symbol leads to from `states` (no ε-moves)."""
        return frozenset(t for s in states for lo, hi, t in self.nfa.edges[s] if lo <= symbol <= hi)

    def accepts(self, states: frozenset[int], ends: set[int]) -> bool:
        return not ends.isdisjoint(states)


class _Looking(_Subsets):
    """The subset construction where the pattern has look-aheads. An obligation (positive, X's end, X's NFA states
    so far) is a look-ahead on X still undecided by the text read since it was passed: a positive one holds once X
    reaches its end (and fails where X can read no further, or the text ends first); a negative one fails once X
    reaches its end, and holds where X can read no further or the text ends. A state of the DFA is a set of pairs
    (obligations, NFA states): the pattern's paths that have passed look-aheads with those obligations, none of
    them failed yet."""

    def __init__(self, nfa: _NFA):
        super().__init__(nfa)
        self._closures: dict[frozenset[int], frozenset[int]] = {}
        self._steps: dict[tuple[frozenset[int], int], frozenset[int]] = {}
        self._lookers = set(nfa.looks)  # the states a look-ahead leaves from

    def _step(self, states: frozenset[int], symbol: int) -> frozenset[int]:
        """_Subsets._step, kept: the same sets recur at every count of a bounded length."""
        key = (states, symbol)
        if key not in self._steps:
            self._steps[key] = super()._step(states, symbol)
        return self._steps[key]

    def _closure(self, states: frozenset[int]) -> frozenset[int]:
        if states not in self._closures:
            self._closures[states] = self.nfa.closure(states)
        return self._closures[states]

    def first(self, start: int) -> frozenset:
        return self.closure({frozenset(): {start}})

    def closure(self, paths: dict) -> frozenset:
        """paths (obligations -> NFA states) and what ε-moves reach from them; passing a look-ahead adds its
        obligation."""
        done: dict[frozenset, set[int]] = {}
        while paths:
            obligations, states = paths.popitem()
            new = frozenset(states - done.get(obligations, set()))
            if not new:
                continue
            reached = self._closure(new)
            done.setdefault(obligations, set()).update(reached)
            for s in self._lookers.intersection(reached):
                for positive, x_start, x_end, t in self.nfa.looks[s]:
                    x = self._closure(frozenset([x_start]))
                    if x_end not in x:
                        paths.setdefault(obligations | {(positive, x_end, x)}, set()).add(t)
                    elif positive:  # X matches the empty text: it holds at once (a negative one fails at once)
                        paths.setdefault(obligations, set()).add(t)
        return frozenset((obligations, frozenset(states)) for obligations, states in done.items())

    def move(self, state: frozenset, symbol: int) -> frozenset | None:
        """The DFA state after reading `symbol` (None: no path lives)."""
        paths: dict[frozenset, set[int]] = {}
        for obligations, states in state:
            moved = self._step(states, symbol)
            if not moved:
                continue
            if obligations and symbol >= CALL:
                raise NeolmError("a look-ahead must be decided before a rule is called (it reads only its own "
                                 "pattern's text)")  # fmt: skip
            kept = self._obligations(obligations, symbol)
            if kept is not None:
                paths.setdefault(kept, set()).update(moved)
        return self.closure(paths) if paths else None

    def accepts(self, state: frozenset, ends: set[int]) -> bool:
        """Whether the text may end here: a path at an end with no positive look-ahead left undecided."""
        return any(not any(o[0] for o in obligations) and not ends.isdisjoint(states) for obligations, states in state)

    def _obligations(self, obligations: frozenset, symbol: int) -> frozenset | None:
        """The obligations still undecided after `symbol`; None if one has failed."""
        kept = set()
        for positive, x_end, x in obligations:
            after = self._closure(self._step(x, symbol))
            if x_end in after:  # X has matched: a positive look-ahead holds, a negative one fails
                if not positive:
                    return None
            elif not after:  # X can match no more
                if positive:
                    return None
            else:
                kept.add((positive, x_end, after))
        return frozenset(kept)


def _prune_calls(table: list[list[int]], accepting: list[bool], columns: list[int | None], starts: list[int]) -> None:
    """_prune, with the calls of rules that can never end (no text of theirs is finite: `a ::= "x" a`) cut too:
    the rules that end are found from the ones that end without calls up (a least fixed point); `columns[k]` is
    the class of rule k's call (None: no state calls it)."""
    ending: set[int] = set()
    cut = [c for c in columns if c is not None]
    calling = [s for s, row in enumerate(table) if any(row[c] for c in cut)]  # (the rows a cut changes)
    while cut:
        view = list(table)
        for s in calling:
            view[s] = [0 if c in cut else t for c, t in enumerate(table[s])]
        live = _live(view, accepting)
        found = {k for k, s in enumerate(starts) if s in live}
        if found == ending:
            break
        ending = found
        cut = [c for k, c in enumerate(columns) if c is not None and k not in ending]
    for row in table:
        for c in cut:
            row[c] = 0
    _prune(table, accepting)


def _live(table: list[list[int]], accepting: list[bool]) -> set[int]:
    """The states from which an accepting state can be reached."""
    back: list[set[int]] = [set() for _ in table]
    for s, row in enumerate(table):
        for t in set(row):
            back[t].add(s)
    live = {s for s, a in enumerate(accepting) if a}
    todo = list(live)
    while todo:
        for s in back[todo.pop()]:
            if s not in live:
                live.add(s)
                todo.append(s)
    return live


def _prune(table: list[list[int]], accepting: list[bool]) -> None:
    """Send every transition into a state from which no accepting state can be reached to the dead state 0."""
    live = _live(table, accepting)
    for s, row in enumerate(table):
        if any(t not in live for t in row):
            table[s] = [t if t in live else 0 for t in row]
