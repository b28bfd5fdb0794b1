"""GBNF grammars (llama.cpp's format, which vLLM's guided_grammar also takes) as rules for structured outputs.

    root   ::= answer " because " reason
    answer ::= "yes" | "no"
    reason ::= [a-z ]+   # comments run to the end of the line

Rules are `name ::= ...`; the text must match `root`. Supported: "literals" (with \\n \\t \\r \\" \\\\ \\xHH \\uHHHH
\\UHHHHHHHH), character classes [a-z] [^"\\\\], `.` (any character), rule names, ( groups ), alternatives |, and
* + ? {m} {m,} {m,n} {,n}. Each rule is written as a regex where it is used (grammar_rules), except a rule that
refers to itself (through others or directly, as JSON's value does): a grammar is context-free and an automaton is
not, so such a rule is a regex of its own that the others call (neolm.structured.pushdown follows the calls with a
stack). A rule that calls itself before reading anything (left recursion: `expr ::= expr "+" term | term`) cannot
be followed so: such rules are first rewritten into rules that read the same texts without it (neolm.structured.
leftrec: `expr ::= term ("+" term)*`), or refused where that would grow too large. grammar_regex writes a grammar
with its recursion unrolled MAX_DEPTH times instead, its recursive alternatives left out past that. Token references
(<[id]>, <think>) raise NeolmError.
"""

from __future__ import annotations

import re

from neolm.errors import NeolmError
from neolm.structured import leftrec
from neolm.structured.regex import NOTHING

MAX_DEPTH = 3  # times a recursive rule is unrolled
INLINE_MAX = 2_000  # nodes of a rule written out where it is used: past that, it is called (`(?&k)`) instead
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "[": "[", "]": "]", "-": "-", "^": "^"}


class _Parser:
    """GBNF text -> {rule name: node}; nodes are tuples ("alt", [nodes]), ("seq", [nodes]), ("lit", text),
    ("cls", regex class text), ("ref", name), ("rep", node, lo, hi)."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def error(self, what: str) -> NeolmError:
        line = self.s.count("\n", 0, self.i) + 1
        return NeolmError(f"grammar, line {line}: {what}")

    def space(self, newlines: bool) -> None:
        """Skip spaces and comments (and newlines when `newlines`: between rules, or inside parentheses)."""
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "#":
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end
            elif c in " \t" or (newlines and c in "\r\n"):
                self.i += 1
            else:
                return

    def rules(self) -> dict:
        rules = {}
        self.space(True)
        while self.i < len(self.s):
            name = self.name()
            self.space(False)
            if not self.s.startswith("::=", self.i):
                raise self.error(f"expected '::=' after rule name {name!r}")
            self.i += 3
            if name in rules:
                raise self.error(f"rule {name!r} is defined twice")
            rules[name] = self.alternatives(nested=False)
            self.space(True)
        return rules

    def name(self) -> str:
        m = _NAME.match(self.s, self.i)
        if not m:
            raise self.error(f"expected a rule name, got {self.s[self.i : self.i + 10]!r}")
        self.i = m.end()
        return m.group()

    def at_rule_start(self) -> bool:
        """Whether a new rule (name ::=) begins at the current position."""
        m = _NAME.match(self.s, self.i)
        return bool(m) and re.match(r"[ \t]*::=", self.s[m.end() :]) is not None

    def alternatives(self, nested: bool):
        branches = [self.sequence(nested)]
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            branches.append(self.sequence(nested))
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self, nested: bool):
        """Items up to "|", ")", the end, or the next rule: a rule goes on over newlines until a line begins with
        `name ::=` (llama.cpp needs a line to end in "|" or to be inside parentheses; this reads those too)."""
        items = []
        while True:
            self.space(True)
            if self.i >= len(self.s) or self.s[self.i] in "|)" or (not nested and self.at_rule_start()):
                return ("seq", items)
            items.append(self.repeated(self.atom()))

    def atom(self):
        c = self.s[self.i]
        if c == '"':
            return ("lit", self.literal())
        if c == "[":
            return ("cls", self.char_class())
        if c == ".":
            self.i += 1
            return ("cls", r"[\s\S]")
        if c == "(":
            self.i += 1
            node = self.alternatives(nested=True)
            self.space(True)
            if self.i >= len(self.s) or self.s[self.i] != ")":
                raise self.error("missing ')'")
            self.i += 1
            return node
        if c == "<":
            raise self.error("token references (<[id]>, <name>) are not supported")
        return ("ref", self.name())

    def repeated(self, node):
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in "*+?":
                self.i += 1
                node = ("rep", node, *{"*": (0, None), "+": (1, None), "?": (0, 1)}[c])
            elif c == "{":
                m = re.compile(r"\{\s*(\d*)\s*(,)?\s*(\d*)\s*\}").match(self.s, self.i)
                if not m or (not m.group(1) and not m.group(2)):
                    raise self.error("a repeat must be {m}, {m,}, {m,n} or {,n}")
                lo = int(m.group(1) or 0)
                hi = int(m.group(3)) if m.group(3) else (None if m.group(2) else lo)
                self.i = m.end()
                node = ("rep", node, lo, hi)
            else:
                return node
        return node

    def escape(self) -> str:
        """The character of the escape after a backslash (consumed)."""
        c = self.s[self.i]
        self.i += 1
        digits = {"x": 2, "u": 4, "U": 8}.get(c)
        if digits:
            text = self.s[self.i : self.i + digits]
            if len(text) != digits or not all(ch in "0123456789abcdefABCDEF" for ch in text):
                raise self.error(f"\\{c} needs {digits} hex digits")
            self.i += digits
            return chr(int(text, 16))
        if c not in _ESCAPES:
            raise self.error(f"unknown escape \\{c}")
        return _ESCAPES[c]

    def next_char(self, inside: str) -> str:
        """The next character of a literal or class (consumed); it must close on its own line."""
        if self.i >= len(self.s) or self.s[self.i] == "\n":
            raise self.error(f"{inside} is not closed")
        self.i += 1
        return self.s[self.i - 1]

    def literal(self) -> str:
        self.i += 1  # the opening quote
        out = []
        while True:
            c = self.next_char("a literal")
            if c == '"':
                return "".join(out)
            out.append(self.escape() if c == "\\" else c)

    def char_class(self) -> str:
        """[...] as the regex class of the same characters."""
        self.i += 1
        parts = ["["]
        if self.i < len(self.s) and self.s[self.i] == "^":
            parts.append("^")
            self.i += 1
        first = len(parts)  # where the class's characters begin
        while True:
            c = self.next_char("a character class")
            if c == "]":
                return "".join(parts + ["]"])
            if c == "-" and len(parts) > first and self.s[self.i : self.i + 1] not in ("]", ""):
                parts.append("-")
                continue
            parts.append(_class_char(self.escape() if c == "\\" else c))


def _class_char(c: str) -> str:
    """A character as it is written inside a regex class."""
    return f"\\U{ord(c):08x}" if c in "\\]^-[" or not c.isprintable() else c


def _parse(text: str) -> dict:
    if not isinstance(text, str):
        raise NeolmError(f"a grammar must be GBNF text, got {type(text).__name__}")
    rules = _Parser(text).rules()
    if "root" not in rules:
        raise NeolmError("the grammar has no root rule (root ::= ...)")
    return rules


def grammar_rules(text: str) -> list[str]:
    """The GBNF grammar as compile_rules reads it: the root rule's regex first, then one for each rule that refers
    to itself (directly or through others, as JSON's value), called with `(?&k)` from inside itself and wherever
    it is used once found, and so is one too long to copy (INLINE_MAX); every other rule is written out where it is
    used. Left recursion is rewritten first (neolm.structured.leftrec)."""
    rules = leftrec.without_left_recursion(_parse(text))
    if rules is None:
        raise NeolmError(f"the grammar's left recursion is too large to rewrite (over {leftrec.MAX_NODES:,} nodes): "
                         "let its recursive rules read something before they call one another")  # fmt: skip
    writer = _Writer(rules, calls=True)
    out: list[str] = []
    while len(out) < len(writer.frames):  # (writing one may find more)
        name = list(writer.frames)[len(out)]
        writer.expanding.append(name)
        body = writer.write(rules[name])
        out.append(NOTHING if body is None else body)
        writer.expanding.pop()
    return out


def grammar_regex(text: str) -> str:
    """The regex of the texts the GBNF grammar's root rule matches, with recursion unrolled MAX_DEPTH times
    (spec_regex's plain regex of a grammar; generation uses grammar_rules, whose calls follow any depth)."""
    rules = _parse(text)
    out = _Writer(rules, calls=False).write(rules["root"])
    if out is None:
        raise NeolmError(f"the grammar's root matches nothing within {MAX_DEPTH} levels of recursion")
    return out


class _Writer:
    """Parsed rules written as regexes. With calls, a rule that refers to itself is called (`(?&k)`, k its place
    in `frames`) from where that is found on; without, recursion is unrolled MAX_DEPTH times, and a node that can
    only recurse deeper is written as None (no text)."""

    def __init__(self, rules: dict, calls: bool):
        self.rules, self.expanding = rules, []  # (the rules being written out, outermost first)
        self.frames: dict[str, int] | None = {"root": 0} if calls else None
        sizes: dict[str, int] = {}
        self.large = {name for name in rules if calls and leftrec.size(("ref", name), rules, sizes) > INLINE_MAX}

    def write(self, node) -> str | None:
        kind = node[0]
        if kind == "lit":
            return re.escape(node[1])
        if kind == "cls":
            return node[1]
        if kind == "ref":
            return self.ref(node[1])
        if kind == "seq":
            parts = [self.write(item) for item in node[1]]
            return None if None in parts else "(?:" + "".join(parts) + ")" if any(parts) else ""
        if kind == "alt":
            kept = [p for p in (self.write(branch) for branch in node[1]) if p is not None]
            return "(?:" + "|".join(kept) + ")" if kept else None
        _, item, lo, hi = node  # rep
        body = self.write(item)
        if body is None:
            return "" if lo == 0 else None
        if not body:  # (the empty text, however often)
            return ""
        return f"(?:{body}){{{lo},{'' if hi is None else hi}}}"

    def ref(self, name: str) -> str | None:
        if name not in self.rules:
            raise NeolmError(f"the grammar refers to rule {name!r}, which it does not define")
        if self.frames is not None:
            if (name in self.expanding or name in self.large) and name not in self.frames:  # called from here on
                self.frames[name] = len(self.frames)  # (it refers to itself, or is too long to copy everywhere)
            if name in self.frames:
                return f"(?&{self.frames[name]})"
        elif self.expanding.count(name) >= MAX_DEPTH:
            return None
        self.expanding.append(name)
        try:
            return self.write(self.rules[name])
        finally:
            self.expanding.pop()
