"""Structured outputs: generation constrained to text that matches a JSON Schema, a regex or one of a list of
choices (vLLM's structured outputs / guided decoding, OpenAI's response_format).

A spec is a dict with one of vLLM's keys (`structured_outputs=` in generate; the server reads OpenAI's and vLLM's
request fields into it):

    {"json": schema}            a JSON Schema (a dict or its JSON text): the output is JSON that satisfies it
    {"json_object": True}       any JSON object
    {"regex": pattern}          the output is a whole match of the pattern
    {"choice": ["yes", "no"]}   the output is one of the strings
    {"grammar": gbnf}           the output matches a GBNF grammar's root rule (llama.cpp's format:
                                neolm.structured.grammar)

with, for the JSON kinds, an optional "whitespace_pattern" (a regex; default "[ ]?": compact JSON, a space or none
between its tokens). The spec is compiled against the tokenizer (compile(); LanguageModel.generation_config does it)
into a Guide, a logits processor that rules out every token that would break the match and eos until the text is
whole. Grammars and schemas whose rules refer to themselves (JSON's values, a recursive $ref), and the values a
schema leaves untyped, compile to rules that call each other, followed with a stack (neolm.structured.pushdown):
the text nests as deep as it likes. The output matches when the sequence ends with eos; a sequence cut short by
max_new_tokens is a prefix of a match.
"""

from __future__ import annotations

import functools
import json
import logging
import re

from neolm.errors import NeolmError
from neolm.structured.grammar import grammar_regex, grammar_rules
from neolm.structured.guide import Follower, Guide, Vocabulary
from neolm.structured.pushdown import PushdownGuide
from neolm.structured.regex import DFA, compile_regex, compile_rules
from neolm.structured.schema import WHITESPACE, schema_regex, schema_rules

__all__ = ["DFA", "Follower", "Guide", "PushdownGuide", "check_spec", "compile", "compile_regex", "compile_rules",
           "spec_automaton", "spec_regex"]  # fmt: skip

log = logging.getLogger(__name__)

KINDS = ("json", "json_object", "regex", "choice", "grammar")


def check_spec(spec) -> None:
    """Raise NeolmError unless spec is a Guide or a dict with exactly one of KINDS (and a valid value for it)."""
    if isinstance(spec, Guide):
        return
    if not isinstance(spec, dict):
        raise NeolmError(f"structured_outputs must be a dict with one of {', '.join(KINDS)}, got {type(spec).__name__}")
    given = [k for k in KINDS if spec.get(k) not in (None, False)]
    unknown = set(spec) - set(KINDS) - {"whitespace_pattern"}
    if unknown:
        raise NeolmError(f"unknown structured_outputs keys {sorted(unknown)} (known: {', '.join(KINDS)}, "
                         "whitespace_pattern)")  # fmt: skip
    if len(given) != 1:
        raise NeolmError(f"structured_outputs needs exactly one of {', '.join(KINDS)}, got {given or 'none'}")
    choice = spec.get("choice")
    if choice is not None and not (isinstance(choice, list) and choice and all(isinstance(c, str) for c in choice)):
        raise NeolmError("structured_outputs' choice must be a non-empty list of strings")
    for kind in ("regex", "grammar"):
        if spec.get(kind) is not None and not isinstance(spec[kind], str):
            raise NeolmError(f"structured_outputs' {kind} must be a string")
    ws = spec.get("whitespace_pattern")
    if ws is not None and not isinstance(ws, str):
        raise NeolmError("structured_outputs' whitespace_pattern must be a regex string")


def spec_automaton(spec: dict) -> tuple[DFA, str]:
    """The automaton a spec's output must match (rules that call each other for grammars and JSON schemas, see
    compile_rules), and a short description of the spec. Rules that call themselves before reading anything (left
    recursion: `expr ::= expr "+" term | term`) cannot be followed with a stack: grammar_rules rewrites them; a
    schema's ($ref: a, in a's anyOf) has its recursion unrolled a few levels instead (spec_regex)."""
    check_spec(spec)
    ws = spec.get("whitespace_pattern") or WHITESPACE
    if spec.get("grammar") is not None:
        rules = grammar_rules(spec["grammar"])
    elif spec.get("json_object"):
        rules = schema_rules({"type": "object"}, ws)
    elif spec.get("json") is not None:
        rules = schema_rules(spec["json"], ws)
    else:
        pattern, description = spec_regex(spec)
        return compile_regex(pattern), description
    dfa = compile_rules(rules)
    rule = dfa.left_recursive() if dfa.calls else None
    if rule is not None:
        log.info("structured outputs: rule %d calls itself before reading anything; its recursion is unrolled", rule)
        return compile_regex(spec_regex(spec)[0]), describe(spec)
    return dfa, describe(spec)


def spec_regex(spec: dict) -> tuple[str, str]:
    """The regex a spec's output must match, with recursion unrolled a few levels (see spec_automaton), and a short
    description of the spec."""
    check_spec(spec)
    ws = spec.get("whitespace_pattern") or WHITESPACE
    if spec.get("regex") is not None:
        pattern = spec["regex"]
    elif spec.get("grammar") is not None:
        pattern = grammar_regex(spec["grammar"])
    elif spec.get("choice") is not None:
        pattern = "(?:" + "|".join(re.escape(c) for c in spec["choice"]) + ")"
    else:
        pattern = schema_regex({"type": "object"} if spec.get("json_object") else spec["json"], ws)
    return pattern, describe(spec)


def describe(spec: dict) -> str:
    """A short description of a spec, for logs and reprs."""
    if spec.get("regex") is not None:
        return f"regex {spec['regex'][:40]!r}"
    if spec.get("grammar") is not None:
        return "a GBNF grammar"
    if spec.get("choice") is not None:
        return f"choice of {len(spec['choice'])}"
    if spec.get("json_object"):
        return "a JSON object"
    schema = spec["json"]
    return f"JSON schema {(schema if isinstance(schema, str) else json.dumps(schema, sort_keys=False))[:40]}"


def compile(spec, tokenizer) -> Guide:
    """The Guide of a spec (see the module docstring) over the tokenizer's vocabulary. Specs that are equal compile
    once (the last 32 are kept), so requests with one schema share a guide and its found tokens."""
    if isinstance(spec, Guide):
        return spec
    check_spec(spec)
    key = json.dumps(spec)  # (in the spec's order: an object's properties are written in it)
    return _compiled(key, tokenizer)


@functools.lru_cache(maxsize=32)
def _compiled(key: str, tokenizer) -> Guide:
    dfa, description = spec_automaton(json.loads(key))
    return (PushdownGuide if dfa.calls else Guide)(dfa, Vocabulary.of(tokenizer), description)
