"""Structured outputs: generation constrained to text that matches a JSON Schema, a regex or one of a list of
choices (vLLM's structured outputs / guided decoding, OpenAI's response_format).

A spec is a dict with one of vLLM's keys (`structured_outputs=` in generate; the server reads OpenAI's and vLLM's
request fields into it):

    {"json": schema}            a JSON Schema (a dict or its JSON text): the output is JSON that satisfies it
    {"json_object": True}       any JSON object
    {"regex": pattern}          the output is a whole match of the pattern
    {"choice": ["yes", "no"]}   the output is one of the strings
    {"grammar": gbnf}           the output matches a GBNF grammar's root rule (llama.cpp's format; recursion is
                                unrolled a few levels: neolm.structured.grammar)

with, for the JSON kinds, an optional "whitespace_pattern" (a regex; default "[ ]?": compact JSON, a space or none
between its tokens). The spec is compiled against the tokenizer (compile(); LanguageModel.generation_config does it)
into a Guide, a logits processor that rules out every token that would break the match and eos until the text is
whole. The output matches when the sequence ends with eos; a sequence cut short by max_new_tokens is a prefix of
a match.
"""

from __future__ import annotations

import functools
import json
import re

from neolm.errors import NeolmError
from neolm.structured.grammar import grammar_regex
from neolm.structured.guide import Follower, Guide, Vocabulary
from neolm.structured.regex import DFA, compile_regex
from neolm.structured.schema import WHITESPACE, schema_regex

__all__ = ["DFA", "Follower", "Guide", "check_spec", "compile", "compile_regex", "spec_regex"]

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


def spec_regex(spec: dict) -> tuple[str, str]:
    """The regex a spec's output must match, and a short description of the spec."""
    check_spec(spec)
    ws = spec.get("whitespace_pattern") or WHITESPACE
    if spec.get("regex") is not None:
        return spec["regex"], f"regex {spec['regex'][:40]!r}"
    if spec.get("grammar") is not None:
        return grammar_regex(spec["grammar"]), "a GBNF grammar"
    if spec.get("choice") is not None:
        return "(?:" + "|".join(re.escape(c) for c in spec["choice"]) + ")", f"choice of {len(spec['choice'])}"
    if spec.get("json_object"):
        return schema_regex({"type": "object"}, ws), "a JSON object"
    schema = spec["json"]
    text = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=False)
    return schema_regex(schema, ws), f"JSON schema {text[:40]}"


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
    pattern, description = spec_regex(json.loads(key))
    return Guide(compile_regex(pattern), Vocabulary.of(tokenizer), description)
