"""Structured outputs (neolm.structured): the regex automata against Python's re, JSON Schema's regexes against
jsonschema's verdicts, the allowed tokens against a brute-force check of every token, and generation (library,
command line, server) that only ever produces text of the requested shape."""

from __future__ import annotations

import itertools
import json
import random
import re
from decimal import Decimal

import jsonschema
import pytest
import regex as partial_re  # the `regex` module matches partially: whether a text can still become a match
import torch
from conftest import NAME
from test_cli import assert_one_line_error, cli
from test_serve import call

import neolm
from neolm.errors import NeolmError
from neolm.structured import PushdownGuide, compile, compile_regex, compile_rules, spec_regex
from neolm.structured.guide import Guide, Vocabulary
from neolm.structured.ranges import MAX_LISTED, decimal_range, int_range, multiples
from neolm.structured.regex import length_range
from neolm.structured.schema import schema_regex, schema_rules
from neolm.tokenizer import Tokenizer

PATTERNS = [
    r"a|b", r"(ab)*c?", r"[a-c]{2,4}x", r"\d+(\.\d+)?", r'[^"\\]*', r"é+ü?", r"(?:foo|bar){1,3}", r"\w+@\w+\.com",
    r".{0,3}", r"[\u0100-\u07ff\u4e00-\u9fff]+", r"(a|ab)(c|bcd)(d*)", r"x{3}", r"[^a-z]+", r"-?(0|[1-9][0-9]*)",
    r"\s*\S", "[😀-🙏]x", r"^(?P<word>[a-z]+)-{,2}$", r"[]a]+", r"[-a-c]", r"a{2,}?b", r"\x41\u00e9\t\.",
    # separated lists, whose repeats loop back into the item's first copy (regex._repeated_suffix)
    r"a(,a)*", r"(?:ab|c)(?:-(?:ab|c))*x", r"ab(?:,ab)*", r"(?:ab)(?:,a(?:b))*", r"a?(,a?)*", r"x(?:x)*y",
    r"(a|b){2,}c", r"(?:\[(?:a(?:,a)*)?\])(?:;\[(?:a(?:,a)*)?\])*", r"d(ab)(?:,ab)*", r"ab(,b)*",
    # look-aheads (regex._Looking)
    r"(?=.*\d)(?=.*[A-Z])[A-Za-z0-9]{4,8}", r"(?:(?!ab).)*", r"x(?!a)[a-c]*", r"(?:a(?=b)|b(?!a)|c)*",
    r"(?=[a-z]{2,4}x)[a-z]+x", r"(?!é)\w*é?", r"(?=(?:a|b){3})[abc]+", r"(?=a|)(?!)|a*",
]  # fmt: skip
ALPHABET = list('abcdx.@-é ü"\\0123456789foobarç中文😀🙂\n\tĀ߿ࠀA]')


def sample(dfa, rng: random.Random, max_len: int = 12, stop: float = 0.3) -> bytes | None:
    """A random string the automaton accepts (a walk that stops at an accepting state with probability `stop`), or
    None."""
    state, out = 1, bytearray()
    for _ in range(max_len * 4):
        if dfa.accepting[state] and rng.random() < stop:
            return bytes(out)
        moves = [b for b in range(256) if dfa.step(state, b)]
        if not moves:
            break
        b = rng.choice(moves)
        out.append(b)
        state = dfa.step(state, b)
    return bytes(out) if dfa.accepting[state] else None


@pytest.mark.parametrize("pattern", PATTERNS)
def test_automaton_accepts_what_re_fullmatch_accepts(pattern):
    dfa, expected = compile_regex(pattern), re.compile(pattern, re.ASCII)
    rng = random.Random(pattern)
    for _ in range(2000):  # random strings: mostly non-matches
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6)))
        assert dfa.fullmatch(text.encode()) == bool(expected.fullmatch(text)), text
    walks = [s for s in (sample(dfa, rng) for _ in range(300)) if s is not None]
    assert walks
    for data in walks:  # the automaton's own strings: every one is valid UTF-8 and matches
        assert expected.fullmatch(data.decode("utf-8")), data


@pytest.mark.parametrize("pattern, needle", [
    (r"(?<=a)b", "look-behinds"), (r"(?=(?=a))a", "inside a look-ahead"), (r"(?=a)*a", "nothing to repeat"),
    (r"(?=a)b", "matches no string"), (r"(a)\1", "back-references"), (r"\bword", "word boundaries"),
    ("(a", "missing ')'"),
    ("a)", "unbalanced"), ("*a", "nothing to repeat"), ("[a", "missing ']'"), ("a{3,1}", "minimum exceeds"),
    (r"[z-a]", "comes before"), ("a^b", "'^'"), ("a++", "possessive"), ("a{0,100000}", "too large"), ("[^\\x00-\\U0010ffff]", "no string"),
])  # fmt: skip
def test_unsupported_or_bad_patterns_are_refused(pattern, needle):
    with pytest.raises(NeolmError, match=re.escape(needle)):
        compile_regex(pattern)


def test_integer_ranges_match_exactly_the_integers_in_range():
    for lo, hi in [(0, 0), (0, 9), (3, 117), (15, 42), (-5, 5), (-120, -7), (None, 10), (-3, None), (7, None),
                   (99, 1001), (None, -10), (None, None)]:  # fmt: skip
        pattern = re.compile(int_range(lo, hi))
        for n in range(-1300, 1300):
            assert bool(pattern.fullmatch(str(n))) == ((lo is None or n >= lo) and (hi is None or n <= hi)), (lo, hi, n)
        assert not any(pattern.fullmatch(s) for s in ["01", "-0", "00", "+1", "1.0", ""]), (lo, hi)


def test_decimal_ranges_match_exactly_the_numbers_in_range():
    """Every plain decimal (no exponent) of a set of integer parts and fractions, with and without a sign, matches
    exactly when it lies in the range; a negative zero never does (zero is written unsigned)."""
    texts = {f"{whole}{fraction}" for whole in ("0", "1", "2", "3", "9", "10", "12", "99")
             for fraction in ("", ".0", ".00", ".05", ".1", ".10", ".15", ".25", ".4999", ".5", ".50", ".5001",
                              ".75", ".9", ".95", ".999")}  # fmt: skip
    texts |= {"-" + t for t in texts}
    bounds = [None, *map(Decimal, ("0", "0.5", "1", "-1", "-0.25", "2.75", "0.05", "0.15", "10", "-12.5", "9.99"))]
    for lo, hi in itertools.product(bounds, bounds):
        for lo_open, hi_open in itertools.product((False, True), (False, True)):
            if (lo is None and lo_open) or (hi is None and hi_open):
                continue
            if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_open or hi_open))):
                with pytest.raises(NeolmError, match="no number lies"):
                    decimal_range(lo, lo_open, hi, hi_open)
                continue
            pattern = re.compile(decimal_range(lo, lo_open, hi, hi_open))
            for text in texts:
                x = Decimal(text)
                inside = ((lo is None or (x > lo if lo_open else x >= lo))
                          and (hi is None or (x < hi if hi_open else x <= hi)))  # fmt: skip
                expected = inside and not (text.startswith("-") and x == 0)
                assert bool(pattern.fullmatch(text)) == expected, (lo, lo_open, hi, hi_open, text)
            assert not any(pattern.fullmatch(t) for t in ["01", "1.", ".5", "1e2", "+1", ""]), (lo, hi)


def test_multiples_match_exactly_the_multiples_in_range():
    """For steps that divide a power of ten (any bounds) and others (both bounds), every plain decimal of a set of
    integer parts and fractions, signed or not, matches exactly when it is an exact multiple of the step within the
    bounds, written with at most the step's fraction digits (trailing zeros too); never as negative zero."""
    texts = {f"{whole}{fraction}" for whole in ("0", "1", "2", "3", "5", "6", "8", "9", "10", "12", "15", "16", "24",
                                                "25", "45", "99", "100", "125", "1000", "1024", "12345")
             for fraction in ("", ".0", ".00", ".000", ".01", ".05", ".1", ".10", ".125", ".2", ".25", ".3", ".5",
                              ".50", ".75", ".99")}  # fmt: skip
    texts |= {"-" + t for t in texts}
    steps = [Decimal(x) for x in ("1", "0.5", "0.25", "0.01", "0.125", "5", "8", "25", "100", "3", "0.3", "15")]
    bounds = [None, *map(Decimal, ("0", "-1", "1", "2.5", "10", "0.25", "100", "-12.5", "25"))]
    for step in steps:
        places = max(-step.normalize().as_tuple().exponent, 0)
        for lo, hi in itertools.product(bounds, bounds):
            for lo_open, hi_open in itertools.product((False, True), (False, True)):
                if (lo is None and lo_open) or (hi is None and hi_open):
                    continue
                where = (step, lo, lo_open, hi, hi_open)
                if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_open or hi_open))):
                    continue  # (no number at all: decimal_range's test)
                held = [x for x in (Decimal(t) for t in texts if not t.startswith("-")) for x in (x, -x)
                        if x % step == 0 and (lo is None or (x > lo if lo_open else x >= lo))
                        and (hi is None or (x < hi if hi_open else x <= hi))]  # fmt: skip
                if step in (3, Decimal("0.3"), 15) and (lo is None or hi is None):
                    with pytest.raises(NeolmError, match="needs a minimum and a maximum"):
                        multiples(lo, lo_open, hi, hi_open, step)
                    continue
                try:
                    pattern = re.compile(multiples(lo, lo_open, hi, hi_open, step))
                except NeolmError as e:
                    assert "no multiple" in str(e) and not held, where
                    continue
                for text in texts:
                    x = Decimal(text)
                    inside = ((lo is None or (x > lo if lo_open else x >= lo))
                              and (hi is None or (x < hi if hi_open else x <= hi)))  # fmt: skip
                    written = len(text.partition(".")[2]) <= places and not (text.startswith("-") and x == 0)
                    expected = inside and x % step == 0 and written
                    assert bool(pattern.fullmatch(text)) == expected, (*where, text)
                assert not any(pattern.fullmatch(t) for t in ["01", "1.", ".5", "1e2", "+1", "", "00"]), where
    with pytest.raises(NeolmError, match=f"at most {MAX_LISTED} multiples"):
        multiples(Decimal(0), False, Decimal(3 * MAX_LISTED), False, Decimal(3))
    assert re.fullmatch(multiples(Decimal(0), False, Decimal(3 * MAX_LISTED - 3), False, Decimal(3)), "2997")


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"enum": ["x", 3, None]}}},
    {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 1, "maxItems": 3},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "minItems": 1, "maxItems": 3},
    {"anyOf": [{"type": "string", "format": "date"}, {"const": {"k": [1, 2]}}]},
    {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                         "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
                        "required": ["v", "next"]}}, "$ref": "#/$defs/node"},
    {"type": "object", "additionalProperties": {"type": "integer", "exclusiveMinimum": 2, "exclusiveMaximum": 12}},
    {"type": ["string", "null"], "minLength": 2},
    {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1},
                                      "t": {"type": "number", "exclusiveMinimum": -2.5, "exclusiveMaximum": 0.75}},
     "required": ["p"]},
    {"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer"}},
                "required": ["kind", "x"]}, {"type": "object", "properties": {"kind": {"const": "b"}},
                                             "required": ["kind"]}],
     "discriminator": {"propertyName": "kind"}},  # (Pydantic's discriminated union: an annotation on the oneOf)
    {"type": "object", "propertyNames": {"pattern": "^[a-z]{1,3}$"}, "additionalProperties": {"type": "boolean"}},
    {"type": "object", "propertyNames": {"enum": ["p", "kind"]}, "additionalProperties": {"type": "number"}},
    {"type": "object", "patternProperties": {"^x[0-9]$": {"type": "boolean"}}, "additionalProperties": False},
    {"type": "object", "additionalProperties": {"type": "boolean"}, "minProperties": 1, "maxProperties": 2},
    {"type": "object", "properties": {"kind": {"type": "string"}, "x": {"type": "integer"}}, "required": ["kind"],
     "minProperties": 1, "maxProperties": 2},  # (bounds that always hold)
    {"type": "object", "properties": {"price": {"type": "number", "multipleOf": 0.25, "minimum": 0},
                                      "n": {"type": "integer", "multipleOf": 5, "exclusiveMaximum": 100},
                                      "i": {"type": "integer", "multipleOf": 2.5}}},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}(-[0-9]{1,3})?$", "minLength": 1,
                                               "maxLength": 6},
                                      "id": {"type": "string", "format": "uuid", "minLength": 36, "maxLength": 36}}},
    {"type": "object", "properties": {"user": {"type": "string", "pattern": "^[a-z0-9_]+$", "minLength": 3,
                                               "maxLength": 8},
                                      "pin": {"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]{4,6}$"},
                                      "q": {"type": "string", "pattern": '^[a"\\\\\n]*$', "maxLength": 3},
                                      "day": {"type": "string", "format": "date", "minLength": 10, "maxLength": 10},
                                      "at": {"type": "string", "format": "date-time", "maxLength": 22}}},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"},
                                      "host": {"type": "string", "format": "hostname"},
                                      "link": {"type": "string", "format": "uri", "minLength": 1},
                                      "wait": {"type": "string", "format": "duration"}}},
]  # fmt: skip
VALUES = [
    {"name": "Ann", "age": 31}, {"name": "Annabel", "age": 31}, {"name": "Ann", "age": 151}, {"name": "Ann"},
    {"age": 3, "name": "Bo"}, {"name": "Ann", "age": 31, "x": 1}, {}, {"a": True}, {"a": False, "c": 3},
    {"b": None, "c": "x"}, {"a": True, "b": None, "c": None}, {"c": "y"}, [1.5], [0, 2, 3e5], [], [1, 2, 3, 4], [-1],
    ["a", 2], ["a", 2, 3], ["a"], ["a", "b"], [3], "2024-02-29", "2024-13-01", {"k": [1, 2]}, {"k": [2, 1]},
    {"v": 1, "next": {"v": 2, "next": None}}, {"v": 1, "next": {"v": 2}}, {"p": 3, "q": 11}, {"p": 12}, {"p": 2}, "ab",
    "a", None, 7, "é\"\\\n", 1.25, True, {"p": 0.5}, {"p": 1.0}, {"p": 1.5}, {"p": 0, "t": -2.5},
    {"p": 1, "t": -2.4999}, {"p": 0.25, "t": 0.75}, {"p": 0.999, "t": 0.7499}, {"p": 1, "t": 0},
    {"price": 2.75, "n": 95}, {"price": 2.7}, {"price": -0.25}, {"price": 1000, "n": -5}, {"n": 100}, {"n": 7},
    {"i": 3}, {"i": -10}, {"i": 5}, {"i": 2.5}, {"n": 0, "i": 0}, {"kind": "a", "x": 1}, {"kind": "b"},
    {"kind": "c"}, {"kind": "a"}, {"kind": "b", "x": 1}, {"ab": True, "c": False}, {"abcd": True}, {"AB": True}, {"x1": True},
    {"x1": True, "x23": False}, {"y": True}, {"x9": 1}, {"code": "AB"}, {"code": "AB-123"}, {"code": "AB-1234"},
    {"code": "A"}, {"code": "ab"}, {"id": "123e4567-e89b-12d3-a456-426614174000"}, {"id": "123e4567"},
    {"when": "2024-02-29T23:59:59.5+05:30", "host": "api.example.com"}, {"when": "2023-02-29T00:00:00Z"},
    {"when": "2024-01-01T12:00:00"}, {"host": "-a.com"}, {"link": "https://example.com/a?b=c#d", "wait": "P1DT2H"},
    {"link": "example com"}, {"wait": "1D"}, {"wait": "P1DT"}, {"user": "ab"}, {"user": "abc", "pin": "ab12"},
    {"user": "abcdefgh"}, {"user": "abcdefghi"}, {"user": "Abc"}, {"pin": "abcd"}, {"pin": "abc1234"}, {"q": 'a"\\'},
    {"q": '\n\n"'}, {"q": 'a""\\'}, {"q": ""}, {"day": "2024-02-29", "at": "2024-02-29T23:59:59Z"},
    {"at": "2024-02-29T23:59:59.5Z"}, {"at": "2024-02-29T23:59:59.55Z"}, {"at": "2024-02-29T23:59:59+01:00"},
]  # fmt: skip


def strict(schema):
    """The schema with additionalProperties false wherever it names properties (as the regexes write objects)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_schema_regexes_match_the_json_that_satisfies_the_schema(index):
    """Compact JSON of each value (keys in the schema's order, as the regex writes them) matches the schema's regex
    (recursion unrolled) and its rules (recursion as calls) exactly when jsonschema finds the value valid under the
    schema made strict (no keys it does not name)."""
    schema = SCHEMAS[index]
    pattern = re.compile(schema_regex(schema, whitespace=""))
    order = list(schema.get("properties", {}))
    validator = jsonschema.Draft202012Validator(
        strict(schema), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    dfa = compile_rules(schema_rules(schema, whitespace=""))  # (what generation uses: recursion as calls)
    rules = PushdownGuide(dfa, Vocabulary([bytes([b]) for b in range(256)]), "rules") if dfa.calls else dfa
    for value in VALUES:
        if isinstance(value, dict) and order and set(value) <= set(order):
            value = {k: value[k] for k in order if k in value}
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        valid = validator.is_valid(value)
        assert bool(pattern.fullmatch(text)) == valid, (schema, text)
        assert rules.fullmatch(text.encode()) == valid, (schema, text)


@pytest.mark.parametrize("pattern, reach", [
    ("abc", (3, 3)), ("[a-z]+", (1, None)), ("^[a-z]{2,5}$", (2, 5)), ("(ab|c)?d{3}", (3, 5)), ("x*", (0, None)),
    ("a{0}", (0, 0)), (r"[^\s\S]|ab", (2, 2)), (r"[^\s\S]", None), (r"(?:[^\s\S])?b", (1, 1)), ("a(b|cd)*e", (2, None)),
    ("\u00e9{2}", (2, 2)), (r"\d{4}-\d{2}", (7, 7)), ("(a|bc){2,3}", (2, 6)), ("(?=ab)a.", (2, 2)),
])  # fmt: skip
def test_length_ranges_of_patterns(pattern, reach):
    """The fewest and most characters of the texts a pattern matches (what a minLength / maxLength beside it is
    checked against); brute force over short texts agrees where the pattern is bounded."""
    assert length_range(pattern) == reach
    if reach is not None and reach[1] is not None and reach[1] <= 5:
        lengths = {n for n in range(reach[1] + 2) for t in itertools.product("abcde-0\u00e9", repeat=n)
                   if re.fullmatch(pattern, "".join(t))}  # fmt: skip
        assert lengths and (min(lengths), max(lengths)) == reach


@pytest.mark.parametrize("pattern", [r"^.{3}$", r'^[^x]+$', r'^a"b\\c$', r"^[a-c]+( [a-c]+)*$",
                                     r"^[\x00-\x1f]?[a-c\u00e9]*[^a-z]$"])
def test_patterns_are_about_the_string_s_value(pattern):
    """A pattern reads the string's value, and the JSON text holds it escaped where JSON needs: `.` and [^x] do not
    let a bare " or \\ or a control character into the text (which would not be JSON), and a " in the pattern is
    written \\". The canonical texts (json.dumps') of random strings match exactly when jsonschema finds them
    valid, and no raw text that is not such a JSON string matches."""
    schema = {"type": "string", "pattern": pattern}
    dfa = compile_rules(schema_rules(schema, whitespace=""))
    regex = re.compile(schema_regex(schema, whitespace=""))
    # (ECMA-262's $, which JSON Schema means, is the end alone; Python's also matches before a last newline)
    validator = jsonschema.Draft202012Validator({"type": "string", "pattern": pattern.removesuffix("$") + r"\Z"})
    rng = random.Random(pattern)
    alphabet = ["a", "b", "c", "x", "\u00e9", " ", '"', "\\", "\n", "\x01", "\t", "/", "-"]
    for _ in range(3000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))
        text = json.dumps(value, ensure_ascii=False)
        valid = validator.is_valid(value)
        assert dfa.fullmatch(text.encode()) == valid and bool(regex.fullmatch(text)) == valid, (pattern, text)
        raw = '"' + value + '"'  # the characters unescaped: often not JSON
        if dfa.fullmatch(raw.encode()):
            assert validator.is_valid(json.loads(raw)), (pattern, raw)
    assert any(validator.is_valid(v) for v in ("abc", 'a"b\\c', "ab c", "\x01ab-"))


def test_openapi_nullable_admits_null_as_well():
    """OpenAPI 3.0's nullable (which jsonschema does not know): the schema's values, and null with nullable true."""
    for schema, texts, refused in [
        ({"type": "string", "maxLength": 2, "nullable": True}, ['"ab"', "null"], ['"abc"', "1"]),
        ({"type": "integer", "nullable": False}, ["7"], ["null"]),
        ({"type": "object", "properties": {"a": {"type": "boolean", "nullable": True}}, "required": ["a"]},
         ['{"a":true}', '{"a":null}'], ['{"a":1}']),
    ]:  # fmt: skip
        pattern = re.compile(schema_regex(schema, whitespace=""))
        assert all(pattern.fullmatch(t) for t in texts) and not any(pattern.fullmatch(t) for t in refused), schema


def test_string_formats_match_what_their_validators_take():
    """Every format's texts (random walks of its automaton) pass jsonschema's format check (fqdn, isoduration,
    rfc3339-validator, rfc3986-validator, jsonpointer: its format-nongpl extra). Exactly its texts, on random
    strings: ipv4 and ipv6 (Python's ipaddress, and every way it writes an address), date, date-time and time (each
    month's days, leap years; time needs its offset). hostname, uri and the rest against texts their validators
    take and refuse."""
    import ipaddress

    from neolm.structured.schema import FORMATS

    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    rng = random.Random(0)
    for name, pattern in FORMATS.items():
        dfa = compile_regex(pattern)
        walks = (sample(dfa, rng, 50, rng.choice([0.02, 0.1, 0.3])) for _ in range(300))
        texts = [t.decode() for t in walks if t is not None]
        assert len(texts) > 200, name
        in_json = re.compile(schema_regex({"type": "string", "format": name}))
        for text in texts:
            assert checker.conforms(text, name), (name, text)
            assert in_json.fullmatch(json.dumps(text, ensure_ascii=False)), (name, text)
    for name, parse, alphabet in (("ipv4", ipaddress.IPv4Address, "0123456789."),
                                  ("ipv6", ipaddress.IPv6Address, "0123456789abcdefABCDEF:.")):  # fmt: skip
        pattern = re.compile(FORMATS[name])
        for _ in range(20_000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
            try:
                valid = bool(parse(text))
            except ValueError:
                valid = False
            assert bool(pattern.fullmatch(text)) == valid, (name, text)
        for _ in range(2000):
            if name == "ipv4":
                address = ipaddress.IPv4Address(rng.randrange(2**32))
                texts = [str(address)]
            else:
                words = [rng.choice([0, 0, rng.randrange(65536)]) for _ in range(8)]
                address = ipaddress.IPv6Address(":".join(f"{w:x}" for w in words))
                texts = [str(address), address.exploded, ":".join(f"{w:X}" for w in words),
                         f"::ffff:{ipaddress.IPv4Address(rng.randrange(2**32))}"]  # fmt: skip
            assert all(pattern.fullmatch(t) for t in texts), texts
    date = re.compile(FORMATS["date"])
    years = [0, 1, 4, 99, 100, 104, 400, 1600, 1700, 1900, 2000, 2023, 2024, 2100, 2400, 9996, 9999]
    for year in years + [rng.randrange(10000) for _ in range(20)]:
        for month, day in itertools.product(range(14), range(33)):
            text = f"{year:04d}-{month:02d}-{day:02d}"
            assert bool(date.fullmatch(text)) == checker.conforms(text, "date"), text
    for name, alphabet, length in (("time", "0125679:.Z+-", (5, 16)), ("date-time", "0129:.Z+-T", (18, 26))):
        pattern = re.compile(FORMATS[name])
        for _ in range(5000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(*length)))
            if rng.random() < 0.5:  # (random characters rarely make a whole time; these do, or nearly)
                text = rng.choice(["23:59:59", "00:00:60", "24:00:00", "12:30:00.5"]) + rng.choice(
                    ["Z", "+05:30", "-23:59", "+24:00", "", "z", "+0530"])  # fmt: skip
                text = (rng.choice(["2024-02-29T", "2023-02-29T", "2023-04-31T", "0000-01-01T"]) + text
                        if name == "date-time" else text)  # fmt: skip
            assert bool(pattern.fullmatch(text)) == checker.conforms(text, name) or text != text.upper(), text
    email = re.compile(FORMATS["email"])
    for text in ["a@b.co", "first.last+tag@sub.example.org", "x_y!#$%&'*/=?^`{|}~-@a-b.io", "Z9@x1.y2.museum"]:
        assert email.fullmatch(text), text
    for text in ["a@b", "a..b@c.com", ".a@b.com", "a.@b.com", "a@-b.com", "a@b-.com", "a b@c.com", "@b.com",
                 "a@b.1com", "a@b..com", "a@b.com.", f"a@{'b' * 64}.com", "é@b.com", 'a"b@c.com']:  # fmt: skip
        assert not email.fullmatch(text), text
    for name, good, bad in [
        ("duration", ["P1Y", "P1Y2M", "P1Y2M3DT4H5M6S", "P3D", "PT36H", "PT1M", "PT10S", "P2W", "P1DT1S", "P0D"],
         ["P", "PT", "P1Y2D", "PT1H5S", "P1.5Y", "P1W2D", "1Y", "P1DT", "p1d", "P-1D"]),
        ("hostname", ["localhost", "example.com", "a-b.c9.example.co.uk", "x1.y2", f"{'a' * 41}.com"],
         ["", "-a.com", "a-.com", "a..com", "a.com.", "1.2.3.4", "a.1com", "a_b.com", "é.com", f"{'a' * 42}.com",
          "a.b.c.d.e.f.com"]),
        ("uri", ["https://example.com/a/b?c=d&e#f", "mailto:a@b.org", "urn:isbn:0451450523", "file:///etc/hosts",
                 "http://[::1]:8080/", "http://u:p@h:1/%7Ea", "a:", "ftp://1.2.3.4/x", "tel:+1-816-555-1212"],
         ["example.com", "/a/b", "1http://x", "http://a b", "http://x/%zz", "http://[::1/", "://x", 'a:"b', "a:\\b"]),
        ("uri-reference", ["https://example.com", "/a/b?c", "../x#y", "//host/p", "", "?q", "#frag", "a/b:c"],
         ["a b", "%", "http://[x]/", "a:b c", "x#y#z"]),
        ("json-pointer", ["", "/", "/a/b", "/a~0b/c~1d", '/"q"\\/é', "/ "], ["a", "/a~2", "/~", "a/b"]),
    ]:  # fmt: skip
        pattern = re.compile(FORMATS[name])
        for text in good:
            assert pattern.fullmatch(text) and checker.conforms(text, name), (name, text)
        for text in bad:
            assert not pattern.fullmatch(text), (name, text)
    # (a whole hostname stays within 253 characters: 6 labels of 41)
    assert length_range(FORMATS["hostname"]) == (1, 6 * 41 + 5) and 6 * 41 + 5 <= 253


@pytest.mark.parametrize("schema, needle", [
    ({"type": "string", "format": "idn-hostname"}, "format 'idn-hostname'"),
    ({"type": "string", "format": "date", "pattern": "^2024"}, "both pattern and format"),
    ({"type": "string", "format": "uri", "maxLength": 2083}, "too large"),
    ({"type": "string", "format": "email", "maxLength": 254}, "too large"),
    ({"type": "number", "minimum": 2, "exclusiveMaximum": 2}, "no number lies"),
    ({"type": "number", "maximum": "3"}, "finite number"), ({"type": "number", "multipleOf": 0}, "> 0"),
    ({"type": "integer", "multipleOf": 7}, "needs a minimum and a maximum"),
    ({"type": "integer", "multipleOf": 5, "minimum": 1, "maximum": 4}, "no multiple of 5"),
    ({"type": "object", "patternProperties": {}}, "patternProperties"), ({"allOf": [{}, {}]}, "allOf"),
    ({"type": "object", "properties": {"a": {}}, "patternProperties": {"b": {}}}, "objects without properties"),
    ({"type": "object", "propertyNames": {"enum": [1]}}, "must list strings"),
    ({"type": "object", "minProperties": 2}, "keys could repeat"),
    ({"type": "object", "properties": {"a": {}}, "minProperties": 1}, "minProperties / maxProperties"),
    ({"$ref": "#/$defs/missing"}, "$ref"), ({"type": "integer", "minimum": 5, "maximum": 1}, "no integer"),
    ("{not json", "not valid JSON"), ({"type": "tuple"}, "unknown JSON schema type"), (False, "admits no value"),
])  # fmt: skip
def test_schemas_that_cannot_be_honoured_are_refused(schema, needle):
    with pytest.raises(NeolmError, match=re.escape(needle)):
        schema_regex(schema)


@pytest.mark.parametrize("name", ["gpt2", "gpt-neox-20b"])
def test_allowed_tokens_are_those_that_keep_a_match_possible(name):
    """Every token against a brute-force partial match of the text so far plus the token (the `regex` module's
    partial=True); tokens that end inside a UTF-8 character are checked by walking their bytes one at a time."""
    tokenizer = Tokenizer.builtin(name)
    vocabulary = Vocabulary.of(tokenizer)
    pattern = r'\{"name": ?"[^"\\]{0,8}", ?"n": ?-?(?:0|[1-9][0-9]{0,2})\}'
    guide = Guide(compile_regex(pattern), vocabulary, "test")
    special = tokenizer.special_ids()
    for prefix in ["", '{"na', '{"name": "Jo', '{"name": "abcdefgh', '{"name":"x", "n": -', '{"name":"x","n":12']:
        state = guide.dfa.walk(1, prefix.encode())
        assert state, prefix
        allowed = guide.allowed(state)
        for token in range(tokenizer.vocab_size):
            data = tokenizer.token_bytes(token)
            if token in special or not data:
                assert not allowed[token]
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:  # part of a character: the bytes' own walk
                expected = guide.dfa.walk(state, data) != 0
            else:
                expected = bool(partial_re.fullmatch(pattern, prefix + text, partial=True))
            assert bool(allowed[token]) == expected, (prefix, token, data)


def test_generated_json_satisfies_its_schema(lm):
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["king", "queen", "fool"]}, "maxItems": 2},
        "alive": {"type": "boolean"}, "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
        "stake": {"type": "number", "multipleOf": 0.25, "minimum": 0}, "born": {"type": "string", "format": "date"},
        "at": {"type": "string", "format": "ipv4"},
        "alias": {"type": "string", "pattern": "^[A-Z][a-z]+$", "maxLength": 8},
        "pin": {"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]{4,6}$"}},
        "required": ["name", "age", "tags", "score", "stake", "born", "at", "alias", "pin"]}  # fmt: skip
    texts = lm.generate(["KING. Who is he?\n"] * 4, structured_outputs={"json": schema}, do_sample=True, seed=0,
                        max_new_tokens=300)  # fmt: skip
    texts.append(lm.generate("KING.", structured_outputs={"json": schema}, do_sample=False, max_new_tokens=300))
    for text in texts:
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_every_generation_mode_keeps_to_the_structure(lm):
    spec = {"regex": r"(?:the|a) (?:king|queen|lord) (?:is|was) (?:dead|here|gone)\."}
    pattern = re.compile(spec["regex"])
    prompt = "KING. Say it: the king is dead.\nQUEEN. "
    modes = [{"do_sample": False}, {"do_sample": True, "seed": 4, "num_return_sequences": 3}, {"num_beams": 3},
             {"num_beams": 3, "num_return_sequences": 2}, {"penalty_alpha": 0.6, "top_k": 4}, {"prompt_lookup_num_tokens": 3},
             {"guidance_scale": 1.5, "do_sample": False}]  # fmt: skip
    for kwargs in modes:
        out = lm.generate(prompt, structured_outputs=spec, max_new_tokens=30, repetition_penalty=1.0, **kwargs)
        for text in out if isinstance(out, list) else [out]:
            assert pattern.fullmatch(text), (kwargs, text)
    streamed = "".join(lm.stream(prompt, structured_outputs=spec, do_sample=False, repetition_penalty=1.0))
    assert streamed == lm.generate(prompt, structured_outputs=spec, do_sample=False, repetition_penalty=1.0)
    batch = lm.generate(["KING. ", "QUEEN. Who?\n", "A"], structured_outputs=spec, do_sample=False)
    assert batch == [lm.generate(p, structured_outputs=spec, do_sample=False) for p in ["KING. ", "QUEEN. Who?\n", "A"]]
    assert all(pattern.fullmatch(t) for t in batch)


def test_greedy_picks_the_likeliest_allowed_token_each_step(lm):
    """Greedy text under a constraint is, token by token, the argmax of the model's logits over the allowed tokens."""
    spec = {"choice": ["my lord", "my liege", "no, sir", "no"]}
    guide = compile(spec, lm.tokenizer)
    ids = lm.encode("KING. Who calls?\nHAMLET.")
    out = lm.generate_ids([ids], structured_outputs=spec, do_sample=False, repetition_penalty=1.0)[0]
    state, seq = 1, list(ids)
    for token in out:
        with torch.no_grad():
            logits = lm.model(torch.tensor([seq]))[0, -1].float()
        allowed = guide.allowed(state).clone()
        if guide.accepting(state):
            allowed[lm.config.eos_token_id] = True
        assert token == int(logits.masked_fill(~allowed, -float("inf")).argmax())
        if token == lm.config.eos_token_id:
            break
        state, seq = guide.advance(state, token), seq + [token]
    assert out[-1] == lm.config.eos_token_id and lm.decode(out[:-1]) in spec["choice"]


def test_bad_specs_and_combinations_are_refused(lm):
    with pytest.raises(NeolmError, match="exactly one of"):
        lm.generate("A", structured_outputs={"regex": "a", "choice": ["b"]})
    with pytest.raises(NeolmError, match="expected a rule name"):
        lm.generate("A", structured_outputs={"grammar": "root ::= 'a'"})  # GBNF literals take double quotes
    with pytest.raises(NeolmError, match="DoLa"):
        lm.generate("A", structured_outputs={"choice": ["a"]}, dola_layers="high")
    with pytest.raises(NeolmError, match="token_healing"):
        lm.generate("A", structured_outputs={"choice": ["a"]}, token_healing=True)
    with pytest.raises(NeolmError, match="compiled against the tokenizer"):
        neolm.generate.generate(lm.model, [[1, 2]], neolm.GenerationConfig(structured_outputs={"choice": ["a"]}))
    with pytest.raises(NeolmError, match="unknown structured_outputs keys"):
        lm.generate("A", structured_outputs={"regexp": "a"})


def test_a_spec_compiles_once_and_a_guide_finds_each_state_once(lm):
    spec = {"json": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}
    guide = compile(spec, lm.tokenizer)
    assert compile(json.loads(json.dumps(spec)), lm.tokenizer) is guide
    assert spec_regex(spec)[0] == schema_regex(spec["json"])
    assert guide.allowed(1) is guide.allowed(1)


def test_command_line_structured_outputs(capsys, tmp_path, lm):
    code, out, err = cli(capsys, "generate", "KING.", "--choice", "yes", "--choice", "no", "--no-echo")
    assert code == 0 and out.strip() in ("yes", "no"), err
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["n"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    code, out, err = cli(capsys, "generate", "KING.", "--json-schema", tmp_path / "s.json", "--no-echo",
                         "--max-new-tokens", "30")  # fmt: skip
    assert code == 0, err
    jsonschema.validate(json.loads(out), schema)
    code, out, err = cli(capsys, "generate", "KING.", "--regex", "[0-9]{3}", "--no-echo")
    assert code == 0 and re.fullmatch("[0-9]{3}", out.strip()), out
    assert_one_line_error(*cli(capsys, "generate", "KING.", "--regex", "(a")[::2], "missing ')'")
    assert_one_line_error(*cli(capsys, "generate", "KING.", "--json-schema", tmp_path / "none.json")[::2], "none.json")
    assert_one_line_error(*cli(capsys, "generate", "KING.", "--regex", "a", "--choice", "b")[::2], "not allowed")


def test_server_honours_response_format_and_vllm_guided_fields(server):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"]}  # fmt: skip
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Who is king?"}], "max_tokens": 150, "seed": 1}
    status, body = call(server, "/v1/chat/completions",
                        chat | {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})  # fmt: skip
    assert status == 200, body
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), schema)
    status, body = call(
        server, "/v1/chat/completions", chat | {"response_format": {"type": "json_object"}, "temperature": 0}
    )
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop", body
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict), body
    completion = {"model": NAME, "prompt": "KING. Yes or no?\n", "max_tokens": 10}
    status, body = call(server, "/v1/completions", completion | {"guided_choice": ["yes", "no"], "n": 3})
    assert status == 200 and {c["text"] for c in body["choices"]} <= {"yes", "no"}, body
    assert all(c["finish_reason"] == "stop" for c in body["choices"])
    status, body = call(
        server, "/v1/completions", completion | {"structured_outputs": {"regex": "[A-Z]{3}"}, "stream": True}
    )
    assert status == 200 and re.fullmatch("[A-Z]{3}", "".join(e["choices"][0]["text"] for e in _events(body))), body
    status, body = call(
        server, "/v1/completions", completion | {"guided_regex": "[a-z]{1,5}!", "guided_decoding_backend": "x"}
    )
    assert status == 200 and re.fullmatch("[a-z]{1,5}!", body["choices"][0]["text"]), body


def _events(text: str) -> list:
    return [json.loads(line.removeprefix("data: ")) for line in text.split("\n\n") if line and "[DONE]" not in line]


@pytest.mark.parametrize("fields, param, needle", [
    ({"guided_grammar": "root ::= x"}, None, "does not define"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one structured output"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "text, json_object or json_schema"),
    ({"guided_regex": "(a"}, None, "missing ')'"),
    ({"guided_json": {"type": "string", "format": "idn-email"}}, None, "format 'idn-email'"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty list"),
])  # fmt: skip
def test_server_refuses_structured_outputs_it_cannot_honour(server, fields, param, needle):
    status, body = call(server, "/v1/completions", {"model": NAME, "prompt": "A", "max_tokens": 4} | fields)
    assert status == 400 and needle in body["error"]["message"] and body["error"]["param"] == param, body


def test_structured_outputs_need_an_eos_token(lm, server):
    with pytest.raises(NeolmError, match="need an eos token"):
        lm.generate("A", structured_outputs={"choice": ["a"]}, eos_token_id=[])
    status, body = call(
        server, "/v1/completions", {"model": NAME, "prompt": "A", "guided_choice": ["a"], "ignore_eos": True}
    )
    assert status == 400 and "eos" in body["error"]["message"], body


JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"""  # llama.cpp's grammars/json.gbnf


def test_gbnf_grammars_match_what_they_describe():
    from neolm.structured.grammar import grammar_regex

    small = grammar_regex('root ::= answer " because " reason # why\nanswer ::= "yes" | "no"\nreason ::= [a-z ]+')
    assert re.fullmatch(small, "no because it is") and not re.fullmatch(small, "maybe because x")
    assert not re.fullmatch(small, "yes because ")
    classes = grammar_regex(r'root ::= [^-\]a] [a-c-] "\x41\u00e9\"" .')
    assert re.fullmatch(classes, 'b-Aé"\n') and re.fullmatch(classes, ']cAé"x') is None
    assert re.fullmatch(grammar_regex('root ::= "a"{2,3} "b"{,1} ("c" | "d")+'), "aaabdcd")
    dfa = compile_regex(grammar_regex(JSON_GBNF))
    values = [{}, {"a": 1}, {"a": [1, -2.5e3, "x\n\u00e9", None, True]}, {"a": {"b": [1, {}]}},
              {"k": [{"x": []}, {"y": {}}], "q": "\\\""}]  # fmt: skip
    for value in values:
        for text in (json.dumps(value), json.dumps(value, indent=1), json.dumps(value, separators=(",", ":"))):
            assert dfa.fullmatch(text.encode()), text
    too_deep = {"a": {"b": {"c": {"d": 1}}}}  # four values inside the root object: past `value` unrolled 3 times
    for text in ['{"a" 1}', "[1]", '{"a": 01}', '{"a": "\x01"}', json.dumps(too_deep)]:
        assert not dfa.fullmatch(text.encode()), text
    # its lists' repeats share their item's copy: 11,723 states before (bench/README.md, session 45)
    assert dfa.states < 3000


def test_json_values_nest_five_levels_in_a_compact_automaton():
    """Unrolled (spec_regex: for schemas that call themselves before reading anything), json_object takes JSON
    nested five levels deep, not six; the automaton stays small because a list's repeats share their item (2265
    states; 48,455 without, and 2931 at three levels). With calls it nests without limit (test_pushdown)."""
    regex, _ = spec_regex({"json_object": True})
    dfa = compile_regex(regex)
    deep = {"a": [{"b": [{"c": 1}]}]}  # five values nested inside the root object
    assert dfa.fullmatch(json.dumps(deep).encode()) and dfa.fullmatch(json.dumps({"a": [[[["x"]]]]}).encode())
    assert not dfa.fullmatch(json.dumps({"a": [{"b": [{"c": [1]}]}]}).encode())  # six
    assert dfa.states < 3000


@pytest.mark.parametrize("grammar, needle", [
    ('answer ::= "yes"', "no root rule"), ("root ::= x", "does not define"), ('root ::= "a', "not closed"),
    ("root ::= <[12]>", "token references"), ('root ::= "a"\nroot ::= "b"', "defined twice"),
    ("root ::= [a-", "not closed"), ("root = x", "expected '::='"), ('root ::= ("a"', "missing ')'"),
    ('root ::= "\\q"', "unknown escape"), ("root ::= x\nx ::= x", "matches nothing"),
])  # fmt: skip
def test_bad_grammars_are_refused(grammar, needle):
    from neolm.structured.grammar import grammar_regex

    with pytest.raises(NeolmError, match=re.escape(needle)):
        grammar_regex(grammar)


def test_generation_follows_a_grammar(lm, capsys, server):
    grammar = 'root ::= ("aye" | "nay") ", my " title "."\ntitle ::= "lord" | "liege" | [a-z]{2,8}'
    pattern = re.compile(r"(?:aye|nay), my [a-z]{2,8}\.")
    texts = lm.generate(["KING. Speak!\n", "QUEEN."], structured_outputs={"grammar": grammar}, do_sample=True, seed=2)
    assert all(pattern.fullmatch(t) for t in texts), texts
    code, out, err = cli(capsys, "generate", "KING.", "--grammar", grammar, "--no-echo")
    assert code == 0 and pattern.fullmatch(out.strip()), (out, err)
    status, body = call(server, "/v1/completions", {"model": NAME, "prompt": "KING.", "guided_grammar": grammar,
                                                    "max_tokens": 30})  # fmt: skip
    assert status == 200 and pattern.fullmatch(body["choices"][0]["text"]), body
