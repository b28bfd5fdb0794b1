"""Left recursion taken out of parsed GBNF rules, the language kept: `expr ::= expr "+" term | term` becomes
`expr ::= term ("+" term)*`, so that a stack of calls can follow any depth of it (neolm.structured.pushdown).

Rules are grammar.py's nodes. A rule is left-recursive when it can call itself before reading a character:
directly, through other rules (`a ::= b "x"`, `b ::= a "y" | "z"`), or behind rules and groups that may read nothing
(`a ::= ws a "x" | "y"` with a nullable `ws`). Each group of rules that call one another so is rewritten with the
textbook elimination (Paull's algorithm: number the rules; in each, put the bodies of earlier ones in for the calls
that lead it; then solve the rule's own leading calls, A = A a | b, as A = b a*, Arden's lemma). It needs rules that
cannot read nothing, so first each such rule B of a group gets a partner `B+` that reads the same texts but the
empty one, and B's uses in the group become `B+?`. Every step keeps each rule's language, so the rewritten grammar
matches exactly the texts the written one does.

The rewrite can grow a grammar exponentially in the worst case (long chains of rules that each lead with the next);
past MAX_NODES, `without_left_recursion` gives up and returns None (grammar_rules refuses the grammar).
"""

from __future__ import annotations

EMPTY = ("lit", "")  # the empty text
MAX_NODES = 50_000  # nodes in the rewritten grammar before giving up
MAX_ROUNDS = 4  # rounds of rewriting (each one's new rules may lead with a left-recursive rule of another group)


def _alt(branches: list):
    kept = [b for b in branches if b is not None]
    return None if not kept else kept[0] if len(kept) == 1 else ("alt", kept)


def _seq(items: list):
    if any(item is None for item in items):
        return None
    items = [item for item in items if item not in (EMPTY, ("seq", []))]
    return EMPTY if not items else items[0] if len(items) == 1 else ("seq", items)


def size(node, rules: dict | None = None, sizes: dict | None = None) -> int:
    """How many nodes a node is; with `rules`, about how many once the rules it calls are written out where they
    are called (a rule being measured counts 1 where it meets itself; `sizes` keeps each rule's)."""
    kind = node[0]
    if kind == "ref":
        name = node[1]
        if rules is None or name not in rules:
            return 1
        if name not in sizes:
            sizes[name] = 1  # (while measured)
            sizes[name] = size(rules[name], rules, sizes)
        return sizes[name]
    if kind in ("alt", "seq"):
        return 1 + sum(size(n, rules, sizes) for n in node[1])
    return 1 + size(node[1], rules, sizes) if kind == "rep" else 1


class _Rewriter:
    """Nodes are grammar.py's tuples; None stands for no text at all (an empty language)."""

    def __init__(self, rules: dict):
        self.rules = dict(rules)
        self.nullable_rules: set[str] = set()
        while True:  # the rules that may read nothing, to a fixpoint
            found = {name for name, body in self.rules.items() if self.nullable(body)}
            if found == self.nullable_rules:
                break
            self.nullable_rules = found

    def nullable(self, node) -> bool:
        kind = node[0]
        if kind == "lit":
            return node[1] == ""
        if kind == "cls":
            return False
        if kind == "ref":
            return node[1] in self.nullable_rules
        if kind == "alt":
            return any(self.nullable(b) for b in node[1])
        if kind == "seq":
            return all(self.nullable(item) for item in node[1])
        return node[2] == 0 or node[3] == 0 or self.nullable(node[1])  # rep

    def leading(self, node) -> set[str]:
        """The rules a node may call before reading a character."""
        kind = node[0]
        if kind == "ref":
            return {node[1]}
        if kind == "alt":
            return set().union(*(self.leading(b) for b in node[1]))
        if kind == "seq":
            out: set[str] = set()
            for item in node[1]:
                out |= self.leading(item)
                if not self.nullable(item):
                    break
            return out
        if kind == "rep":
            return self.leading(node[1]) if node[3] != 0 else set()
        return set()

    def left_recursive(self) -> list[list[str]]:
        """The groups of rules that call one another before reading (each in the grammar's order)."""
        first = {name: self.leading(body) for name, body in self.rules.items()}
        reach = {}
        for name in self.rules:
            seen, todo = set(), list(first[name])
            while todo:
                other = todo.pop()
                if other not in seen and other in first:
                    seen.add(other)
                    todo += first[other]
            reach[name] = seen
        groups: list[list[str]] = []
        for name in self.rules:
            if name in reach[name] and not any(name in g for g in groups):
                groups.append([other for other in self.rules if other in reach[name] and name in reach[other]])
        return groups

    # ---- the texts of a node but the empty one ----
    def plus(self, name: str) -> str:
        """The name of a rule that reads what `name` reads, the empty text left out (made on first use)."""
        partner = name + "+"  # (not a GBNF name: no clash with the grammar's own)
        if partner not in self.rules:
            self.rules[partner] = EMPTY  # (placeholder while its body is written: it may refer to itself)
            self.rules[partner] = self.nonempty(self.rules[name]) or ("alt", [])
        return partner

    def nonempty(self, node):
        if not self.nullable(node):
            return node
        kind = node[0]
        if kind == "lit":
            return None
        if kind == "ref":
            return ("ref", self.plus(node[1]))
        if kind == "alt":
            return _alt([self.nonempty(b) for b in node[1]])
        if kind == "seq":  # (x1 rest): (x1+ rest) | rest+, x1 being nullable
            if not node[1]:
                return None
            head, rest = node[1][0], ("seq", node[1][1:])
            return _alt([_seq([self.nonempty(head), rest]), self.nonempty(rest)])
        _, item, _, hi = node  # rep, nullable: a first non-empty round, then up to hi - 1 more
        if hi == 0:
            return None
        return _seq([self.nonempty(item), ("rep", item, 0, None if hi is None else hi - 1)])

    # ---- a node as A d | r, r no longer leading with a call of A ----
    def split(self, node, a: str):
        """(d, r) with node's texts = A's texts then d's, or r's; r does not call A before reading. Either may be
        None (no text). Calls to rules that may read nothing must have been made non-empty where they lead."""
        kind = node[0]
        if kind == "ref" and node[1] == a:
            return EMPTY, None
        if kind in ("lit", "cls", "ref"):
            return None, node
        if kind == "alt":
            parts = [self.split(b, a) for b in node[1]]
            return _alt([d for d, _ in parts]), _alt([r for _, r in parts])
        if kind == "seq":
            if not node[1]:
                return None, EMPTY
            head, rest = node[1][0], ("seq", node[1][1:])
            d1, r1 = self.split(head, a)
            if r1 is None or not self.nullable(r1):
                return _seq([d1, rest]), _seq([r1, rest])
            d2, r2 = self.split(rest, a)  # r1 may read nothing: then rest leads
            return _alt([_seq([d1, rest]), d2]), _alt([_seq([self.nonempty(r1), rest]), r2])
        _, item, lo, hi = node  # rep
        if hi == 0:
            return None, EMPTY
        more = None if hi is None else hi - 1
        if self.nullable(item) or lo == 0:  # ε, or a first non-empty round and up to hi - 1 more
            tail = ("rep", item, 0, more)
            d1, r1 = self.split(self.nonempty(item) or ("alt", []), a)
            return _seq([d1, tail]), _alt([EMPTY, _seq([r1, tail])])
        tail = ("rep", item, lo - 1, more)
        d1, r1 = self.split(item, a)
        return _seq([d1, tail]), _seq([r1, tail])

    # ---- the elimination ----
    def rename(self, node, names: dict):
        """node with calls of the rules in `names` replaced by names[rule] (a node)."""
        kind = node[0]
        if kind == "ref":
            return names.get(node[1], node)
        if kind in ("alt", "seq"):
            return (kind, [self.rename(n, names) for n in node[1]])
        if kind == "rep":
            return ("rep", self.rename(node[1], names), node[2], node[3])
        return node

    def eliminate(self, group: list[str]) -> None:
        # rules that may read nothing: B's uses in the group read B+ or nothing
        empty = [name for name in group if name in self.nullable_rules]
        names = {name: ("rep", ("ref", self.plus(name)), 0, 1) for name in empty}
        order = [name for name in group if name not in self.nullable_rules] + [name + "+" for name in empty]
        for name in order:
            self.rules[name] = self.rename(self.rules[name], names)
        for name in empty:
            self.rules[name] = ("rep", ("ref", name + "+"), 0, 1)
        for i, name in enumerate(order):
            body = self.rules[name]
            others = sum(size(b) for other, b in self.rules.items() if other != name)
            for earlier in order[:i]:  # calls of earlier rules that lead: their bodies instead
                d, r = self.split(body, earlier)
                if d is not None:
                    body = _alt([_seq([self.rules[earlier], d]), r]) or ("alt", [])
                    if others + size(body) > MAX_NODES:
                        raise OverflowError
            d, r = self.split(body, name)  # A = A d | r  ->  A = r d*
            if d is not None:
                body = _seq([r, ("rep", d, 0, None)]) if r is not None else ("alt", [])
            if others + size(body) > MAX_NODES:
                raise OverflowError
            self.rules[name] = body


def without_left_recursion(rules: dict) -> dict | None:
    """The rules (grammar.py's {name: node}) with left recursion taken out, the same texts matched; the rules
    themselves where there is none; None where the rewrite would pass MAX_NODES. A rule that can never end (no
    text at all) becomes ("alt", []), which matches nothing."""
    rewriter = _Rewriter(rules)
    for _ in range(MAX_ROUNDS):
        groups = rewriter.left_recursive()  # (a round's new `B+` rules may make new groups)
        if not groups:
            return rewriter.rules
        try:
            for group in groups:
                rewriter.eliminate(group)
        except OverflowError:
            return None
    return None
