"""Structured outputs whose rules recurse (neolm.structured.pushdown): rules compiled to one automaton with calls,
the allowed tokens against independent checks (a bracket counter; llama.cpp's json.gbnf unrolled deeper than any
text it is shown; the `regex` module's recursive patterns, matched partially), against each token walked alone, JSON
nested far past the unrolled limits, and generation."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import numpy as np
import pytest
import regex as partial_re  # matches partially, and follows recursive patterns: (?&name)
from test_structured import JSON_GBNF

from neolm.errors import NeolmError
from neolm.structured import PushdownGuide, compile, compile_regex, spec_automaton
from neolm.structured import grammar as grammar_module
from neolm.structured.grammar import grammar_regex
from neolm.structured.guide import Guide, Vocabulary
from neolm.structured.regex import compile_rules
from neolm.tokenizer import Tokenizer

TREE = {
    "$defs": {"node": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["name", "children"]}},
    "$ref": "#/$defs/node",
}  # fmt: skip


def walk(guide, tokenizer, text: str) -> int:
    """The guide's state after the text's tokens, each checked to be allowed where it comes (0: one was not)."""
    state = 1
    for token in tokenizer.encode(text):
        if not guide.allowed(state)[token]:
            return 0
        state = guide.advance(state, token)
    return state


def test_rules_compile_to_one_automaton_of_calls():
    dfa = compile_rules([r"a(?&1)b|c", r"x(?&0)y|z"])  # rule 0 and rule 1 call each other
    assert dfa.rules == 2 and dfa.starts == [1, 2] and dfa.calls and dfa.left_recursive() is None
    after_a = dfa.step(1, ord("a"))
    assert dfa.call(after_a, 1) and not dfa.call(after_a, 0) and not dfa.call(1, 1)
    assert dfa.accepting[dfa.step(1, ord("c"))] and dfa.accepting[dfa.step(dfa.call(after_a, 1), ord("b"))]
    assert compile_rules([r"(?&0)x|y"]).left_recursive() == 0
    assert compile_rules([r"(?&1)x", r"(?&2)y|", r"(?&0)|q"]).left_recursive() is not None  # through an empty rule
    assert compile_rules([r"(?&1)x", r"(?&2)y|", r"r(?&0)|q"]).left_recursive() is None
    assert compile_rules([r"(?&1)x", r"y|"]).empty_rules() == {1}
    # a rule no finite text matches is dropped, with every call of it
    dfa = compile_rules([r"a(?&1)|b", r"x(?&1)"])
    assert not dfa.calls and dfa.step(1, ord("a")) == 0 and dfa.fullmatch(b"b")
    with pytest.raises(NeolmError, match="matches no string"):
        compile_rules([r"a(?&0)"])
    with pytest.raises(NeolmError, match="not supported"):  # a user's regex does not call
        compile_regex(r"a(?&0)?b")
    with pytest.raises(NeolmError, match="calls no rule"):
        compile_rules([r"a(?&3)"])
    with pytest.raises(NeolmError, match="not supported"):  # nor does a schema's pattern, set inside the rules
        spec_automaton({"json": {"type": "string", "pattern": "(?&0)"}})
    assert spec_automaton({"json": {"type": "string", "pattern": r"\(?&"}})[0].fullmatch(b'"&"')


def test_balanced_brackets_against_a_counter():
    """S ::= ("(" S ")")*: every state's allowed tokens and whether it may end, against a depth counter."""
    tokens = [b"(", b")", b"((", b"))", b"()", b")(", b"(()", b"())", b"x", b"(x", b")))", b"((((", b"()()", b"((()))"]
    guide = PushdownGuide(compile_rules([r"(?:\((?&0)\))*"]), Vocabulary(tokens), "brackets")

    def depth(text: str) -> int | None:  # None: no balanced text starts with it
        d = 0
        for c in text:
            d += {"(": 1, ")": -1}.get(c, -(10**9))
            if d < 0:
                return None
        return d

    rng = random.Random(0)
    for _ in range(200):
        text, state = "", 1
        for _ in range(rng.randint(0, 14)):
            expected = [depth(text + t.decode()) is not None for t in tokens]
            assert guide.allowed(state).tolist() == expected, text
            assert guide.accepting(state) == (depth(text) == 0), text
            token = rng.choice([i for i, ok in enumerate(expected) if ok])
            text, state = text + tokens[token].decode(), guide.advance(state, token)
    assert walk_bytes(guide, b"((((((((((()))))))))))") and not walk_bytes(guide, b"(()))")


def walk_bytes(guide, data: bytes) -> bool:
    """Whether the guide, fed data one byte-token at a time, may end there."""
    byte_token = {t: i for i, t in enumerate(guide.vocabulary.bytes)}
    state = 1
    for b in data:
        state = guide.advance(state, byte_token[bytes([b])])
    return bool(state) and guide.accepting(state)


def nesting(data: bytes, deepest: bool = True) -> int:
    """The deepest bracket nesting in JSON text, or (deepest=False) the brackets open at its end (strings
    skipped)."""
    most = depth = 0
    quoted = escaped = False
    for c in data.decode("utf-8", "replace"):
        if quoted:
            quoted, escaped = (c != '"' or escaped), (c == "\\" and not escaped)
        elif c == '"':
            quoted = True
        elif c in "[{":
            depth += 1
            most = max(most, depth)
        elif c in "]}":
            depth -= 1
    return most if deepest else depth


def test_json_grammar_allows_what_a_deeper_unrolled_automaton_allows(monkeypatch):
    """llama.cpp's json.gbnf with calls, against the same grammar unrolled six levels (a regex guide, itself checked
    against brute force in test_structured): along JSON texts nested at most three deep, every token that cannot
    take the text past four levels is allowed exactly when the unrolled guide allows it, and every token the
    unrolled guide allows is allowed."""
    tokenizer = Tokenizer.builtin("gpt-neox-20b")
    vocabulary = Vocabulary.of(tokenizer)
    guide = compile({"grammar": JSON_GBNF}, tokenizer)
    assert isinstance(guide, PushdownGuide) and guide.dfa.rules == 3  # root, object and value
    monkeypatch.setattr(grammar_module, "MAX_DEPTH", 6)
    unrolled = Guide(compile_regex(grammar_regex(JSON_GBNF)), vocabulary, "json.gbnf unrolled")
    assert unrolled.dfa.fullmatch(json.dumps({"a": [[[[{"b": 1}]]]]}).encode())  # six levels
    opens = np.array([sum(piece.count(c) for c in b"[{") if piece else 0 for piece in vocabulary.bytes])
    texts = ['{"a": [1, {"b": null}], "c": "x\\"y"}', '{\n "k": [[], {}],\n "q": -2.5e3}', '{"s": "[{"}']
    checked = 0
    for text in texts:
        state, data = 1, b""
        for token in tokenizer.encode(text):
            allowed, reference = guide.allowed(state).numpy(), unrolled.allowed(unrolled.dfa.walk(1, data)).numpy()
            strict = depth(data) + opens <= 4  # (a token's brackets all opening, strings or not)
            assert (allowed[strict] == reference[strict]).all(), data
            assert (allowed | ~reference).all(), data
            checked += int(strict.sum())
            state, data = guide.advance(state, token), data + vocabulary.bytes[token]
        assert guide.accepting(state), text
    assert checked > 1_000_000


def depth(data: bytes) -> int:
    """How many brackets are open at the end of JSON text (strings skipped)."""
    return nesting(data, deepest=False)


def test_recursive_schemas_and_untyped_values_nest_without_limit():
    tokenizer = Tokenizer.builtin("gpt-neox-20b")
    tree = compile({"json": TREE}, tokenizer)
    assert isinstance(tree, PushdownGuide)
    node: dict = {"name": "leaf", "children": []}
    for i in range(12):  # past the three levels a recursive $ref was unrolled to
        node = {"name": f"n{i}", "children": [node, {"name": "x", "children": []}] if i % 2 else [node]}
    text = json.dumps(node)
    jsonschema.validate(node, TREE)
    state = walk(tree, tokenizer, text)
    assert state and tree.accepting(state)
    broken = text.replace('"x", "children": []', '"x"', 1)  # a required member left out, deep inside
    state = walk(tree, tokenizer, broken)
    assert not state or not tree.accepting(state)
    any_object = compile({"json_object": True}, tokenizer)
    deep = {"a": [[[[[[[[[[{"b": [{"c": [[1, "two", None]]}]}]]]]]]]]]]}  # 16 levels, past MAX_DEPTH's 5
    for text in (json.dumps(deep), json.dumps(deep, separators=(",", ":"))):
        state = walk(any_object, tokenizer, text)
        assert state and any_object.accepting(state), text
    for text in ('{"a": [[1]}', '{"a": [}', "[1]"):
        state = walk(any_object, tokenizer, text)
        assert not state or not any_object.accepting(state), text
    assert any_object.dfa.states < 300  # (2,265 unrolled five levels)


def test_the_guide_refuses_left_recursion():
    # (grammars have theirs rewritten first, or unrolled: tests/test_leftrec.py)
    with pytest.raises(NeolmError, match="left recursion"):
        PushdownGuide(compile_rules([r"(?&0)x|y"]), Vocabulary([b"x", b"y"]), "left")
    with pytest.raises(NeolmError, match="matches no string"):
        spec_automaton({"grammar": 'root ::= x\nx ::= "a" x'})


def test_generation_follows_recursive_schemas(lm):
    schema = {"$defs": {"node": {"type": "object", "properties": {
        "name": {"enum": ["king", "queen"]},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["name", "kids"]}},
        "$ref": "#/$defs/node"}  # fmt: skip
    spec = {"json": schema}
    texts = lm.generate(["KING. Who rules?\n"] * 3, structured_outputs=spec, do_sample=True, seed=1,
                        max_new_tokens=400)  # fmt: skip
    texts += lm.generate("QUEEN.", structured_outputs=spec, num_beams=2, num_return_sequences=2, max_new_tokens=400)
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert isinstance(json.loads(lm.generate("KING.", structured_outputs={"json_object": True}, do_sample=False,
                                             max_new_tokens=400)), dict)  # fmt: skip
    # a list in a list ... until a 0: the default model nests it 6 to 19 deep (past the three levels a recursive
    # $ref was unrolled to) when the 0 is made likelier (it would nest past its token budget otherwise)
    nested = {"$defs": {"n": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1,
                                         "maxItems": 1}, {"const": 0}]}}, "$ref": "#/$defs/n"}  # fmt: skip
    zero = [i for i in range(lm.tokenizer.vocab_size) if lm.tokenizer.token_bytes(i) in (b"0", b" 0")]
    texts = lm.generate(["A"] * 4, structured_outputs={"json": nested}, do_sample=True, seed=0, max_new_tokens=200,
                        sequence_bias={(i,): 4.0 for i in zero})  # fmt: skip
    for text in texts:
        jsonschema.validate(json.loads(text), nested)
    assert min(nesting(t.encode()) for t in texts) >= 6, texts


WS_GRAMMAR = r"""
root  ::= "[" ws (value ("," ws value)*)? "]" ws
value ::= ("[" ws (value ("," ws value)*)? "]" | "{" ws (str ":" ws value ("," ws str ":" ws value)*)? "}" | str
          | [0-9]+) ws
str   ::= "\"" [a-z ]* "\""
ws    ::= ([ \t\n] ws)?
"""  # whitespace as a rule that calls itself (as llama.cpp's json_arr.gbnf has it): a tail call, and empty
LOOP_GRAMMAR = r"""
root ::= item* "."
item ::= "(" root ")" | opt
opt  ::= "x"?
"""  # a repeat of a rule that may read nothing: its call returns to where it began


@pytest.mark.parametrize(
    "spec",
    [{"json_object": True, "whitespace_pattern": r"[ \n]?"}, {"grammar": WS_GRAMMAR}, {"grammar": LOOP_GRAMMAR}],
    ids=["json_object", "recursive-ws", "empty-loop"],
)
def test_pushdown_masks_match_single_token_walks(spec):
    """The vocabulary's walk at once (calls on stacks of its own, tokens that leave their rule walked on from the
    actual stack) against each token walked alone, along random paths that go deep and come back."""
    tokenizer = Tokenizer.builtin("gpt2")
    guide = compile(spec, tokenizer)
    assert isinstance(guide, PushdownGuide)
    rng = random.Random(3)
    structural = set(b'{}[]()",:.x0123456789 \n\t')
    sample = rng.sample(range(guide.vocabulary.size), 2000)  # and every token made of these bytes alone
    sample += [t for t, piece in enumerate(guide.vocabulary.bytes) if piece and set(piece) <= structural]
    for _ in range(2):
        state, text = 1, b""
        for steps in range(30):
            allowed = guide.allowed(state).numpy()
            for t in sample:
                piece = guide.vocabulary.bytes[t]
                assert allowed[t] == (bool(piece) and guide.advance(state, t) != 0), (text, piece)
            if not allowed.any():  # the text is whole: eos alone
                assert guide.accepting(state)
                break
            ids = np.flatnonzero(allowed)
            plain = set(b'{["(:x1 ' if steps < 20 else b'{["(:x1 ]}),.')  # deeper first, then back up
            going = set(b"{[(" if steps < 20 else b"]}).")
            kinds = [[t for t in ids if set(guide.vocabulary.bytes[t]) <= plain], list(ids)]
            kinds.insert(0, [t for t in kinds[0] if going & set(guide.vocabulary.bytes[t])])
            token = rng.choice(next(k for k in kinds if k))
            state, text = guide.advance(state, int(token)), text + guide.vocabulary.bytes[token]
        assert nesting(text.replace(b"(", b"[").replace(b")", b"]")) >= 4, text


@pytest.mark.parametrize("grammar", [WS_GRAMMAR, LOOP_GRAMMAR, JSON_GBNF], ids=["recursive-ws", "empty-loop", "json"])
def test_allowed_tokens_match_the_regex_modules_recursive_partial_match(grammar):
    """An independent check of the calls and the stack: the grammar's rules as one pattern of the `regex` module
    (its (?&name) calls, partial=True: whether the text can still become a match), against the allowed tokens and
    whether the guide may end, along texts that nest; tokens that are not whole UTF-8 are left out."""
    from neolm.structured.grammar import grammar_rules

    rules = grammar_rules(grammar)
    named = [re.sub(r"\(\?&(\d+)\)", r"(?&r\1)", rule) for rule in rules]
    oracle = partial_re.compile("(?(DEFINE)" + "".join(f"(?<r{k}>{r})" for k, r in enumerate(named)) + ")(?&r0)")
    tokenizer = Tokenizer.builtin("gpt2")
    guide = compile({"grammar": grammar}, tokenizer)
    texts = {
        WS_GRAMMAR: '[ {"ab": [1, [[ ]], {"c":{"d": [7 ]} }]},\n  "x y" ]  ',
        LOOP_GRAMMAR: "x(x((.)x.)(.).)xx.",
        JSON_GBNF: '{"a": [{"b": [[{"c": [[]]}]]}, -2.5e3, "x\\"y"]}',
    }[grammar]
    pieces = {}
    for t, piece in enumerate(guide.vocabulary.bytes):
        try:
            pieces[t] = piece.decode("utf-8") if piece else None
        except UnicodeDecodeError:
            pass
    structural = [
        t for t, text in pieces.items() if text and len(text) <= 3 and set(text) <= set('{}[]()",:.x0123456789 \n')
    ]
    sample = structural + random.Random(5).sample(sorted(pieces), 200)
    state, done, checked = 1, "", 0
    for token in tokenizer.encode(texts):
        allowed = guide.allowed(state)
        for t in sample:
            if pieces.get(t):
                expected = oracle.fullmatch(done + pieces[t], partial=True) is not None
                assert bool(allowed[t]) == expected, (done, pieces[t])
                checked += 1
        assert guide.accepting(state) == (oracle.fullmatch(done) is not None), done
        state, done = guide.advance(state, token), done + pieces[token]
    assert guide.accepting(state) and checked > 10_000


def test_counted_items_and_recursive_refs_are_called_not_copied():
    """An array of at least 30 and at most 40 objects has one copy of the object's states, which each count calls
    (13,368 states written out for bench/structured.py's 50 records, 483 called); a recursive $ref is called
    wherever it is used, its first use included."""
    from neolm.structured.schema import schema_rules

    record = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"]}  # fmt: skip
    schema = {"type": "array", "items": record, "minItems": 30, "maxItems": 40}
    rules = schema_rules(schema, whitespace="")
    assert len(rules) == 2 and "(?&1)" in rules[0] and '"name"' not in rules[0] and '"name"' in rules[1]
    guide = PushdownGuide(compile_rules(rules), Vocabulary([bytes([b]) for b in range(256)]), "records")
    assert guide.dfa.states < 1000
    for n in (29, 30, 35, 40, 41):
        text = json.dumps([{"name": f"n{i}", "age": i} for i in range(n)], separators=(",", ":"))
        assert guide.fullmatch(text.encode()) == (30 <= n <= 40), n
    assert not guide.fullmatch(json.dumps([{"name": "toolongname", "age": 1}] * 30, separators=(",", ":")).encode())
    tree = schema_rules({"type": "array", "items": TREE["$defs"]["node"], "minItems": 5, "$defs": TREE["$defs"]})
    assert '"name"' not in tree[0] and len(tree[0]) < 100  # each item a call
