"""Left-recursive GBNF grammars (neolm.structured.leftrec): rewritten so that a stack of calls follows them to any
depth, matching exactly the texts the written grammar matches. The check is a recognizer of its own that reads the
written grammar as it is (each rule's end positions from each start, grown to a fixpoint, which left recursion does
not trouble), on random grammars with direct, indirect and hidden (behind empty rules) left recursion."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from neolm.errors import NeolmError
from neolm.structured import PushdownGuide, leftrec, spec_automaton
from neolm.structured.grammar import MAX_DEPTH, _parse, grammar_rules
from neolm.structured.guide import Vocabulary
from neolm.structured.regex import compile_rules

ARITHMETIC = """
root   ::= expr
expr   ::= expr ("+" | "-") term | term
term   ::= term ("*" | "/") factor | factor
factor ::= [0-9]+ | "(" expr ")" | "-" factor
"""


def recognizes(rules: dict, text: str) -> bool:
    """Whether grammar.py's parsed rules match the text: for every rule and start, the set of positions where it can
    end, grown from nothing until nothing changes (the least fixpoint: the grammar's own meaning)."""
    n = len(text)
    ends_of = {(name, i): frozenset() for name in rules for i in range(n + 1)}

    def ends(node, i: int) -> set[int]:
        kind = node[0]
        if kind == "lit":
            return {i + len(node[1])} if text.startswith(node[1], i) else set()
        if kind == "cls":
            return {i + 1} if i < n and re.fullmatch(node[1], text[i]) else set()
        if kind == "ref":
            return set(ends_of[(node[1], i)])
        if kind == "alt":
            return set().union(*(ends(b, i) for b in node[1]))
        if kind == "seq":
            at = {i}
            for item in node[1]:
                at = set().union(*(ends(item, j) for j in at))
            return at
        _, item, lo, hi = node
        at = {i}
        for _ in range(lo):
            at = set().union(*(ends(item, j) for j in at))
        out, frontier, rounds = set(at), at, 0
        while frontier and (hi is None or rounds < hi - lo):
            frontier = set().union(*(ends(item, j) for j in frontier)) - (out if hi is None else set())
            out |= frontier
            rounds += 1
        return out

    changed = True
    while changed:
        changed = False
        for (name, i), old in list(ends_of.items()):
            new = old | ends(rules[name], i)
            changed |= new != old
            ends_of[(name, i)] = new
    return n in ends_of[("root", 0)]


def random_grammar(rng: random.Random) -> str:
    """GBNF text of 1-3 rules over the letters a and b, calling one another anywhere (often first)."""
    names = ["root", "x", "y"][: rng.randint(1, 3)]

    def node(depth: int) -> str:
        r = rng.random()
        if depth > 2 or r < 0.3:
            return rng.choice([rng.choice(names)] * 9 + ['""'] * 2 + ["[ab]"] * 2 + ['"a"', '"b"', '"ab"', '"ba"'] * 2)
        if r < 0.6:
            return "(" + " ".join(node(depth + 1) for _ in range(rng.randint(1, 3))) + ")"
        if r < 0.85:
            return "(" + " | ".join(node(depth + 1) for _ in range(rng.randint(2, 3))) + ")"
        lo = rng.choice([0, 0, 1, 2])
        hi = rng.choice(["", str(lo), str(lo + 1), str(lo + 2)])
        return f"({node(depth + 1)}){{{lo},{hi}}}"

    return "\n".join(f"{name} ::= {node(0)}" for name in names)


def matcher(text: str):
    """A function telling whether a grammar (compiled as spec_automaton compiles it) matches a text; None where
    its root matches no string."""
    try:
        dfa = compile_rules(grammar_rules(text))
    except NeolmError as e:
        assert "matches no string" in str(e)
        return None
    assert not dfa.calls or dfa.left_recursive() is None  # rewritten: no unrolling needed
    if not dfa.calls:
        return lambda s: dfa.fullmatch(s.encode())
    guide = PushdownGuide(dfa, Vocabulary([b"a"]), "random")
    return lambda s: guide.fullmatch(s.encode())


def test_rewritten_grammars_match_what_they_are_written_to_match():
    texts = [""] + ["".join(p) for n in range(1, 6) for p in itertools.product("ab", repeat=n)]
    left_recursive = 0
    for seed in range(150):
        grammar = random_grammar(random.Random(seed))
        rules = _parse(grammar)
        left_recursive += bool(leftrec._Rewriter(rules).left_recursive())
        want = [t for t in texts if recognizes(rules, t)]
        match = matcher(grammar)
        got = [] if match is None else [t for t in texts if match(t)]
        assert got == want, (seed, grammar)
    assert left_recursive >= 80  # (most random grammars call a rule first: the case under test)


@pytest.mark.parametrize(
    "grammar, deep",
    [
        (ARITHMETIC, "1" + "+2*3" * 40 + "-(" * 12 + "4/-5" + ")" * 12),
        ('root ::= a\na ::= b "x" | "y"\nb ::= a "z" | "w"', "w" + "xz" * 30 + "x"),  # indirect
        ('root ::= ws root "x" | "y"\nws ::= " "*', " y" + " x" * 0 + "x" * 20),  # behind a rule that may read nothing
        ('root ::= "[" items? "]"\nitems ::= items "," item | item\nitem ::= [a-z]+ | root', "[" * 9 + "a,b" + "]" * 9),
        ('root ::= root? "a" | root root "b"', "aab" * 10),  # root behind itself, which may read nothing
    ],
)
def test_left_recursion_is_followed_to_any_depth(grammar, deep):
    rules = _parse(grammar)
    assert leftrec._Rewriter(rules).left_recursive()
    match = matcher(grammar)  # (the indirect one is regular once rewritten: an automaton without calls)
    assert recognizes(rules, deep) and match(deep)  # deeper than MAX_DEPTH: not unrolled
    for broken in (deep[:-1], deep + "+", "+" + deep, deep.replace("x", "", 1)):
        assert match(broken) == recognizes(rules, broken), broken


def test_arithmetic_states_stay_few():
    dfa, _ = spec_automaton({"grammar": ARITHMETIC})
    assert dfa.rules <= 3 and dfa.states < 60  # expr's and term's loops, factor's call of expr


def test_a_rewrite_too_large_is_refused(monkeypatch):
    monkeypatch.setattr(leftrec, "MAX_NODES", 10)
    assert leftrec.without_left_recursion(_parse(ARITHMETIC)) is None
    with pytest.raises(NeolmError, match="too large to rewrite"):
        spec_automaton({"grammar": ARITHMETIC})


def test_rules_too_long_to_copy_are_called():
    # seven rules that each lead with every other: the rewrite copies bodies into bodies (38,370 nodes), and
    # writing every rule out where it is used would be over 400,000 automaton states
    names = [f"r{i}" for i in range(7)]
    rules = [f'{name} ::= ' + " | ".join([f'{other} "{other}"' for other in names if other != name] + [f'"{name}"'])
             for name in names]  # fmt: skip
    grammar = "root ::= r0\n" + "\n".join(rules)
    match, parsed = matcher(grammar), _parse(grammar)
    deep = "r3r3" + "r1r2r4r5r6" * 20  # (r0's texts: a first token twice, then no token twice in a row, nor r0 last)
    for text in (deep, deep + "r6", deep + "r0", "r0", "r1", "r2r2r1", "r3r3r0", "r0r1r2"):
        assert match(text) == recognizes(parsed, text), text
    assert match(deep)


def test_rules_that_never_end_still_refused():
    with pytest.raises(NeolmError, match="matches no string"):
        spec_automaton({"grammar": 'root ::= root "x"'})  # no way out of the recursion
    with pytest.raises(NeolmError, match="matches no string"):
        spec_automaton({"grammar": 'root ::= a\na ::= b "x"\nb ::= a "y"'})


def test_generation_follows_a_left_recursive_grammar_past_the_old_unrolling(lm):
    grammar = 'root ::= sum "="\nsum ::= sum "+" digit | digit\ndigit ::= [1-9]'
    plus = [i for i in range(lm.tokenizer.vocab_size) if lm.tokenizer.token_bytes(i) == b"+"]
    texts = lm.generate(["1+2+3+4+5="] * 2, structured_outputs={"grammar": grammar}, do_sample=True, seed=0,
                        max_new_tokens=40, sequence_bias={(i,): 6.0 for i in plus})  # fmt: skip
    for text in texts:
        assert re.fullmatch(r"[1-9](\+[1-9])*[+=]?", text), text  # (cut short at max_new_tokens, or ended)
        assert text.count("+") > MAX_DEPTH, text  # the unrolled grammar stopped at MAX_DEPTH additions
