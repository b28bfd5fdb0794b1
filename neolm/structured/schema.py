"""JSON Schema as regular expressions over the JSON text that satisfies it (the approach of Outlines, which
vLLM and others use), for structured outputs.

An object's properties come in the schema's order; required ones always, optional ones may be left out, and no other
keys appear (as OpenAI's strict mode) unless the schema has no "properties", when additionalProperties (a schema, or
true/absent: any value) gives the values of any keys. Supported: type (one or a list), enum, const, properties /
required / additionalProperties (and a map's propertyNames or patternProperties with one pattern, and minProperties /
maxProperties), nullable (OpenAPI 3.0's), items / prefixItems / minItems / maxItems, minLength / maxLength / pattern /
format (FORMATS: date-time, date, time, duration, uuid, ipv4, ipv6, hostname, email, uri, uri-reference, json-pointer)
on strings (a length bound beside a pattern or format is a look-ahead that counts the string's characters, where the
pattern does not keep it already; a pattern beside a format is refused; a pattern matches the whole value, as
Outlines reads it, and reads the value, not its JSON text: `.` takes a `"` only as \\", never bare), minimum /
maximum (and the exclusive ones) and multipleOf on integers and numbers (a bounded number, or a multiple, is written
without an exponent: neolm.structured.ranges), anyOf / oneOf (OpenAPI's discriminator read past), allOf of one
schema, and $ref into $defs / definitions. A $ref that refers to itself, any JSON value (where a schema leaves one
untyped) and an array's long item counted more than twice are rules of their own that the others call
(schema_rules: neolm.structured.pushdown follows the calls with a stack, so values nest as deep as they like);
schema_regex unrolls them instead (recursive $refs MAX_REF_DEPTH times, any value MAX_DEPTH levels), for schemas whose
$refs call themselves before reading anything. Keywords that would constrain the output in ways the regex cannot
express raise NeolmError rather than being ignored.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal

from neolm.errors import NeolmError
from neolm.structured.ranges import decimal_range, int_range, multiples, scaled
from neolm.structured.regex import MAX_STATES, NOTHING, class_text, compile_regex, length_range, minus, rewrite_sets

MAX_DEPTH = 5  # schema_regex: nesting levels of any JSON value (json_object: 2265 states, 0.3 s)
MAX_REF_DEPTH = 3  # schema_regex: times a recursive $ref is unrolled (each level copies every recursive branch)
WHITESPACE = r"[ ]?"  # between a JSON text's tokens (Outlines' default): compact, with a space or none

STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
STRING = f'"{STRING_CHAR}*"'
INTEGER = r"-?(?:0|[1-9][0-9]*)"
NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # 0-255, no leading zeros (as ipaddress reads them)
_IPV4 = rf"(?:{_OCTET}\.){{3}}{_OCTET}"
_H16 = r"[0-9A-Fa-f]{1,4}"
_LS32 = rf"(?:{_H16}:{_H16}|{_IPV4})"
_IPV6 = "(?:" + "|".join([  # RFC 3986's IPv6address: eight groups of 16 bits, a run of zero groups as "::" once
    rf"(?:{_H16}:){{6}}{_LS32}", rf"::(?:{_H16}:){{5}}{_LS32}", rf"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
    *(rf"(?:(?:{_H16}:){{0,{n - 1}}}{_H16})?::(?:{_H16}:){{{5 - n}}}{_LS32}" for n in (2, 3)),
    rf"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}", rf"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
    rf"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}", rf"(?:(?:{_H16}:){{0,6}}{_H16})?::"]) + ")"  # fmt: skip
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# dates as RFC 3339 validators and datetime.date read them: years 0001-9999, each month's days, February's 29th in
# leap years (divisible by 4, and by 400 where by 100)
_YEAR = r"(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
              r"|02-(?:0[1-9]|1[0-9]|2[0-8]))")  # fmt: skip
_DATE = rf"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
# RFC 3339's full-time: the offset is not optional (a leap second's :60 is left out, as its validators do)
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
# RFC 3339's duration (its appendix A): a unit may be left out only from the end (P1Y2M, not P1Y2D)
_T_PART = r"T(?:[0-9]+H(?:[0-9]+M(?:[0-9]+S)?)?|[0-9]+M(?:[0-9]+S)?|[0-9]+S)"
_DURATION = rf"P(?:(?:[0-9]+D|[0-9]+M(?:[0-9]+D)?|[0-9]+Y(?:[0-9]+M(?:[0-9]+D)?)?)(?:{_T_PART})?|{_T_PART}|[0-9]+W)"
# RFC 1123 host names, of at most 6 labels of at most 41 letters, digits and hyphens (so never past the 253
# characters a name may have; a label has at most 63), the last starting with a letter (not an IPv4 address's)
_HOST_LABEL = r"(?:[A-Za-z0-9-]{0,39}[A-Za-z0-9])?"
_HOSTNAME = rf"(?:[A-Za-z0-9]{_HOST_LABEL}\.){{0,5}}[A-Za-z]{_HOST_LABEL}"
# RFC 3986's URI and URI-reference (its appendix A); an IPv4 host is one of reg-name's texts
_PCT = r"%[0-9A-Fa-f]{2}"
_PLAIN = r"A-Za-z0-9._~\-!$&'()*+,;="  # (inside a class) unreserved and sub-delims: what reg-name reads unencoded
_PCHAR = rf"(?:[{_PLAIN}:@]|{_PCT})"
_AUTHORITY = (rf"(?:(?:[{_PLAIN}:]|{_PCT})*@)?"  # userinfo
              rf"(?:\[(?:{_IPV6}|v[0-9A-Fa-f]+\.[{_PLAIN}:]+)\]|(?:[{_PLAIN}]|{_PCT})*)"  # IP-literal, or reg-name
              r"(?::[0-9]*)?")  # fmt: skip
_SEGMENTS = rf"(?:/{_PCHAR}*)*"
_NET_OR_ABSOLUTE = rf"//{_AUTHORITY}{_SEGMENTS}|/(?:{_PCHAR}+{_SEGMENTS})?"
_QUERY = rf"(?:[{_PLAIN}:@/?]|{_PCT})*"
_QUERY_FRAGMENT = rf"(?:\?{_QUERY})?(?:#{_QUERY})?"
_URI = rf"[A-Za-z][A-Za-z0-9+.\-]*:(?:{_NET_OR_ABSOLUTE}|{_PCHAR}+{_SEGMENTS})?{_QUERY_FRAGMENT}"
_RELATIVE_REF = rf"(?:{_NET_OR_ABSOLUTE}|(?:[{_PLAIN}@]|{_PCT})+{_SEGMENTS})?{_QUERY_FRAGMENT}"
FORMATS = {  # the values of each string format (as a pattern: of the value, not of its JSON text)
    "date-time": rf"{_DATE}T{_TIME}",
    "date": _DATE,
    "time": _TIME,
    "duration": _DURATION,
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "ipv4": _IPV4,
    "ipv6": _IPV6,
    "hostname": _HOSTNAME,
    # an RFC 5322 dot-atom, at a domain of letter-digit-hyphen labels (at most 63 characters, no hyphen at either
    # end) with a top-level label that starts with a letter: what mail validators take (Pydantic's EmailStr)
    "email": rf"{_ATEXT}+(?:\.{_ATEXT}+)*@(?:{_LABEL}\.)+[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?",
    "uri": _URI,
    "uri-reference": rf"(?:{_URI}|{_RELATIVE_REF})",
    "json-pointer": r"(?:/(?:[^~/]|~[01])*)*",  # RFC 6901 (any character but ~ and /, which are written ~0 and ~1)
}
# characters a JSON string holds escaped, and their escapes (short ones where JSON has one, as json.dumps writes them)
_MUST_ESCAPE = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))
_SHORT_ESCAPES = {0x22: r'\\"', 0x5C: r"\\\\", 0x08: r"\\b", 0x0C: r"\\f", 0x0A: r"\\n", 0x0D: r"\\r", 0x09: r"\\t"}


def _chars(lo: int, hi: int | None) -> str:
    """lo to hi (None: any number of) characters of a JSON string, as its text holds them."""
    return f'{STRING_CHAR}{{{lo},{"" if hi is None else hi}}}'


def _json_chars(ranges) -> str:
    """The regex of the characters in `ranges` as a JSON string holds them: as they are, or escaped where JSON
    needs it (a pattern is about the string's value, so `"` in a pattern is written \\" in the JSON text)."""
    raw = minus(ranges, _MUST_ESCAPE)
    escaped = [c for lo, hi in _MUST_ESCAPE for c in range(lo, hi + 1) if any(a <= c <= b for a, b in ranges)]
    parts = ([class_text(raw)] if raw else []) + [_SHORT_ESCAPES.get(c, f"\\\\u{c:04x}") for c in escaped]
    return "(?:" + "|".join(parts) + ")" if parts else NOTHING


# keywords that only annotate (or that no output violates when the rest holds): read past
# (OpenAPI's discriminator sits on a oneOf whose branches' const properties already tell them apart)
_ANNOTATIONS = {"title", "description", "examples", "default", "$schema", "$id", "$comment", "$defs", "definitions",
                "deprecated", "readOnly", "writeOnly", "strict", "name", "discriminator"}  # fmt: skip
_KNOWN = {
    "type", "enum", "const", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
    "maxItems", "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf", "anyOf", "oneOf", "allOf", "$ref", "propertyNames", "patternProperties",
    "minProperties", "maxProperties", "nullable",
}  # fmt: skip


def literal(value) -> str:
    """A regex matching exactly `value` written as compact JSON."""
    return re.escape(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _read(schema):
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise NeolmError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise NeolmError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
    return schema


def schema_rules(schema, whitespace: str = WHITESPACE) -> list[str]:
    """The JSON texts that satisfy `schema` as compile_rules reads them: the root's regex first, then one for each
    $ref that refers to itself (directly or through others) and one for any JSON value (where the schema leaves a
    value untyped), which the others call with `(?&k)`: values nest as deep as they like."""
    schema = _read(schema)
    converter = _Converter(schema if isinstance(schema, dict) else {}, whitespace, calls=True)
    root = converter.convert(schema, 0)
    if root is None:
        raise NeolmError("the JSON schema admits no value")
    out = [root]
    while len(out) <= len(converter.frames):  # (converting one may find more)
        ref = list(converter.frames)[len(out) - 1]
        if ref is ANY:
            out.append(converter.any_of(converter.call(ANY)))
            continue
        if isinstance(ref, tuple):  # (ITEM, its regex)
            out.append(ref[1])
            continue
        converter.expanding = [ref]
        out.append(converter.convert(converter.resolve(ref), 0) or NOTHING)
    return out


def _recursive_refs(root: dict) -> set[str]:
    """The $refs of the schema that can lead back to themselves (through the $refs inside what they point to)."""

    def refs_in(node, top: bool = False) -> set[str]:
        if isinstance(node, list):
            return set().union(*(refs_in(x) for x in node))
        if not isinstance(node, dict):
            return set()
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        for key, value in node.items():
            if not (top and key in ("$defs", "definitions")):  # (the root's definitions are not used where they are)
                found |= refs_in(value)
        return found

    inside = {}
    todo = list(refs_in(root, top=True))
    while todo:
        ref = todo.pop()
        if ref not in inside:
            inside[ref] = refs_in(_target(root, ref), top=ref == "#")  # (None: convert's resolve says why)
            todo += inside[ref]
    recursive = set()
    for ref, refs in inside.items():
        seen, stack = set(), list(refs)
        while stack:
            other = stack.pop()
            if other == ref:
                recursive.add(ref)
                break
            if other not in seen and other in inside:
                seen.add(other)
                stack += inside[other]
    return recursive


def _target(root: dict, ref) -> dict | None:
    """What a $ref points to ("#", or into the root's $defs or definitions); None where that is nothing."""
    if ref == "#":
        return root
    for prefix in ("#/$defs/", "#/definitions/"):
        if isinstance(ref, str) and ref.startswith(prefix):
            found = root.get(prefix[2:-1], {}).get(ref[len(prefix) :])
            if found is not None:
                return found
    return None


def schema_regex(schema, whitespace: str = WHITESPACE) -> str:
    """The regex of the JSON texts that satisfy `schema` (a dict, a JSON string, or True for any value), with any
    value nested at most MAX_DEPTH levels and recursive $refs unrolled MAX_REF_DEPTH times (for schemas whose
    $refs call themselves before reading anything, which schema_rules' calls cannot follow)."""
    schema = _read(schema)
    out = _Converter(schema if isinstance(schema, dict) else {}, whitespace).convert(schema, 0)
    if out is None:
        raise NeolmError("the JSON schema admits no value")
    return out


ANY = object()  # the frame of any JSON value
ITEM = object()  # (ITEM, regex): the frame of an array's item counted more than twice (minItems / maxItems)
ITEM_RULE = 64  # an item regex this long or longer, counted more than twice, becomes a rule that each count calls
# (records of 3 fields, 50 of them: 13,368 states written out, 483 called); a string's characters stay written out
# (a call for each character would push and pop at every byte)


class _Converter:
    def __init__(self, root: dict, ws: str, calls: bool = False):
        self.root, self.ws = root, ws
        self.expanding: list[str] = []  # the $refs being converted, outermost first
        self.frames: dict | None = {} if calls else None  # with calls: $ref (or ANY, or ITEM) -> its rule, from 1
        self.recursive = _recursive_refs(root) if calls else set()  # (called wherever used, never written out)

    def call(self, key) -> str:
        """The call of key's rule (added to the frames if new)."""
        if key not in self.frames:
            self.frames[key] = len(self.frames) + 1
        return f"(?&{self.frames[key]})"

    def convert(self, schema, depth: int) -> str | None:
        """The schema's regex, or None where no value satisfies it (a recursive branch past MAX_REF_DEPTH)."""
        if schema is True or schema == {}:
            return self.any_value(depth)
        if schema is False:
            return None
        if not isinstance(schema, dict):
            raise NeolmError(f"a JSON schema must be an object or a boolean, got {schema!r}")
        unknown = set(schema) - _KNOWN - _ANNOTATIONS
        if unknown:
            raise NeolmError(f"JSON schema keywords not supported for structured outputs: {sorted(unknown)}")
        if "nullable" in schema:  # OpenAPI 3.0's: null as well
            rest = {k: v for k, v in schema.items() if k != "nullable"}
            return self.alternatives([self.convert(rest, depth), "null" if schema["nullable"] is True else None])
        if "$ref" in schema:
            ref = schema["$ref"]
            if self.frames is not None and (ref in self.frames or ref in self.recursive or ref in self.expanding):
                return self.call(ref)
            if self.expanding.count(ref) >= MAX_REF_DEPTH:  # a recursive schema, unrolled enough
                return None
            self.expanding.append(ref)
            try:
                return self.convert(self.resolve(ref), depth)
            finally:
                self.expanding.pop()
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise NeolmError("allOf is supported with one schema only")
            return self.convert(parts[0], depth)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.alternatives([self.convert(s, depth) for s in schema[key]])
        if "const" in schema:
            return literal(schema["const"])
        if "enum" in schema:
            return self.alternatives([literal(v) for v in schema["enum"]])
        kind = schema.get("type")
        if isinstance(kind, list):
            return self.alternatives([self.convert({**schema, "type": k}, depth) for k in kind])
        if kind is None:  # untyped: the type its keywords imply, else any value
            kind = ("object" if {"properties", "additionalProperties"} & set(schema)
                    else "array" if {"items", "prefixItems"} & set(schema) else None)  # fmt: skip
            if kind is None:
                return self.any_value(depth)
        makers = {"string": self.string, "integer": self.integer, "number": self.number, "object": self.object,
                  "array": self.array, "boolean": lambda s, d: "(?:true|false)",
                  "null": lambda s, d: "null"}  # fmt: skip
        if kind not in makers:
            raise NeolmError(f"unknown JSON schema type {kind!r}")
        return makers[kind](schema, depth)

    def resolve(self, ref) -> dict:
        found = _target(self.root, ref)
        if found is None:
            raise NeolmError(f"$ref {ref!r} is not in the schema's $defs or definitions")
        return found

    @staticmethod
    def alternatives(parts: list[str | None]) -> str | None:
        kept = list(dict.fromkeys(p for p in parts if p is not None))
        return None if not kept else kept[0] if len(kept) == 1 else "(?:" + "|".join(kept) + ")"

    def any_value(self, depth: int) -> str:
        """Any JSON value: with calls, the call of its rule; else nested at most MAX_DEPTH - depth levels deep."""
        if self.frames is not None:
            return self.call(ANY)
        if depth >= MAX_DEPTH:
            return self.any_of(None)
        return self.any_of(self.any_value(depth + 1))

    def any_of(self, inner: str | None) -> str:
        """A JSON value whose arrays' items and objects' values are `inner` (None: scalars only)."""
        scalars = [STRING, NUMBER, "true", "false", "null"]
        if inner is None:
            return "(?:" + "|".join(scalars) + ")"
        ws = self.ws
        array = rf"\[{ws}(?:{inner}(?:{ws},{ws}{inner})*)?{ws}\]"
        member = f"{STRING}{ws}:{ws}{inner}"
        obj = rf"\{{{ws}(?:{member}(?:{ws},{ws}{member})*)?{ws}\}}"
        return "(?:" + "|".join([*scalars, array, obj]) + ")"

    @staticmethod
    def _count(schema, low: str, high: str) -> tuple[int, int | None]:
        lo, hi = schema.get(low, 0), schema.get(high)
        if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
            raise NeolmError(f"{low} / {high} must be counts with {low} <= {high}, got {lo!r} / {hi!r}")
        return lo, hi

    def string(self, schema, depth: int) -> str:
        if "pattern" in schema and "format" in schema:  # (a text in both: an intersection, as with length bounds)
            raise NeolmError("a string with both pattern and format is not supported for structured outputs: write "
                             "the format into the pattern")  # fmt: skip
        if "pattern" in schema:
            pattern = schema["pattern"]
            if not isinstance(pattern, str):
                raise NeolmError("a string's pattern must be a regex string")
        elif "format" in schema:
            if schema["format"] not in FORMATS:
                raise NeolmError(f"string format {schema['format']!r} is not supported for structured outputs "
                                 f"(supported: {', '.join(FORMATS)})")  # fmt: skip
            pattern = FORMATS[schema["format"]]
        else:
            lo, hi = self._count(schema, "minLength", "maxLength")
            return STRING if lo == 0 and hi is None else f'"{_chars(lo, hi)}"'
        written = rewrite_sets(pattern, _json_chars)  # (parsed alone: in rules, `(?&k)` calls)
        return '"' + self._length_bound(schema, pattern, written) + written + '"'

    def _length_bound(self, schema, pattern: str, written: str) -> str:
        """minLength / maxLength beside a pattern or format (`written`: as the JSON text holds it): nothing where
        every text the pattern matches keeps them (Pydantic's min_length=1 beside a pattern), else a look-ahead
        that counts the string's characters up to its closing quote (an escape such as \\n is one). Refused where
        the automaton would pass MAX_STATES states (about the pattern's states times the counts)."""
        if not {"minLength", "maxLength"} & set(schema):
            return ""
        lo, hi = self._count(schema, "minLength", "maxLength")
        reach = length_range(pattern)
        if reach is None or (lo <= reach[0] and (hi is None or (reach[1] is not None and reach[1] <= hi))):
            return ""
        counts = (lo if hi is None else hi) + 1
        states = compile_regex(written).states
        if states * counts > MAX_STATES:
            raise NeolmError(f"a pattern or format of {states} automaton states with minLength/maxLength up to "
                             f"{counts - 1} is too large for structured outputs (about {states * counts:,} states, "
                             f"over {MAX_STATES:,}): lower the bound, or bound the length inside the "
                             "pattern")  # fmt: skip
        return f'(?={_chars(lo, hi)}")'

    def integer(self, schema, depth: int) -> str:
        lo, lo_open, hi, hi_open = _bounds(schema)
        step = _step(schema)
        if step is not None:  # the integers that are multiples of a / 10**k: those of a / gcd(a, 10**k)
            a, k = scaled(step)
            return multiples(lo, lo_open, hi, hi_open, Decimal(a // math.gcd(a, 10**k)))
        if lo is None and hi is None:
            return INTEGER
        lowest = None if lo is None else math.floor(lo) + 1 if lo_open else math.ceil(lo)
        highest = None if hi is None else math.ceil(hi) - 1 if hi_open else math.floor(hi)
        return int_range(lowest, highest)

    def number(self, schema, depth: int) -> str:
        lo, lo_open, hi, hi_open = _bounds(schema)
        step = _step(schema)
        if step is not None:
            return multiples(lo, lo_open, hi, hi_open, step)
        if lo is None and hi is None:
            return NUMBER
        return decimal_range(lo, lo_open, hi, hi_open)

    def map_keys(self, schema) -> tuple[str | None, object]:
        """A map's keys (regex of the JSON string, None: no string can be one) and their values' schema: the keys
        of propertyNames' schema (a string's, any string without it), or those of patternProperties' one pattern,
        whose schema the values then follow (the keys written are those the pattern matches whole; other keys,
        which additionalProperties would govern, are not written)."""
        names = schema.get("propertyNames", True)
        if names is not True and not isinstance(names, dict):
            raise NeolmError("propertyNames must be a schema (an object)")
        key = STRING if names in (True, {}) else self.convert({"type": "string", **names}, 0)
        if names not in (True, {}) and any(not isinstance(v, str) for v in names.get("enum", [])):
            raise NeolmError("propertyNames' enum must list strings (a key is a string)")
        patterns = schema.get("patternProperties")
        if patterns is None:
            return key, schema.get("additionalProperties", True)
        if not isinstance(patterns, dict) or len(patterns) != 1 or "propertyNames" in schema:
            raise NeolmError("patternProperties is supported with one pattern, without propertyNames")
        ((pattern, values),) = patterns.items()
        return self.string({"type": "string", "pattern": pattern}, 0), values

    def array(self, schema, depth: int) -> str | None:
        """prefixItems' schemas for the first items (each may be left out with all after it, down to minItems),
        then items' for the rest."""
        ws = self.ws
        fixed = [self.convert(s, depth + 1) for s in schema.get("prefixItems", [])]
        if None in fixed:  # items from there on cannot be written
            fixed = fixed[: fixed.index(None)]
        items = schema.get("items", True)
        item = None if items is False else self.convert(items, depth + 1)
        lo, hi = self._count(schema, "minItems", "maxItems")
        if self.frames is not None and item is not None and len(item) >= ITEM_RULE and max(lo, hi or 0) > 2:
            item = self.call((ITEM, item))  # one copy of the item's states, however many items are counted
        sep = f"{ws},{ws}"
        options = []
        for k in range(len(fixed) + 1):  # k of the fixed items written
            if hi is not None and k > hi:
                break
            if k < len(fixed):
                if k >= lo:
                    options.append(sep.join(fixed[:k]))
                continue
            if item is None:  # all fixed items, nothing after
                if k >= lo:
                    options.append(sep.join(fixed))
                continue
            more_lo, more_hi = max(lo - k, 0), (None if hi is None else hi - k)
            if more_hi == 0:
                options.append(sep.join(fixed))
            elif k == 0:  # items alone: item{lo, hi}
                body = f"{item}(?:{sep}{item}){{{max(more_lo - 1, 0)},{'' if more_hi is None else more_hi - 1}}}"
                options.append(body if more_lo > 0 else f"(?:{body})?")
            else:
                options.append(sep.join(fixed) + f"(?:{sep}{item}){{{more_lo},{'' if more_hi is None else more_hi}}}")
        if not options:
            return None
        return rf"\[{ws}(?:{'|'.join(options)}){ws}\]"

    def object(self, schema, depth: int) -> str | None:
        ws = self.ws
        properties = schema.get("properties")
        if not properties:  # a map: keys of propertyNames (any string), values of additionalProperties
            key, extra = self.map_keys(schema)
            if extra is False:
                return rf"\{{{ws}\}}"
            value = self.convert(extra, depth + 1)
            if value is None or key is None:
                return rf"\{{{ws}\}}"
            lo, hi = self._count(schema, "minProperties", "maxProperties")
            if lo > 1:  # (an automaton cannot keep the keys apart, and a key written twice is one property)
                raise NeolmError("minProperties above 1 is not supported on a map: its keys could repeat")
            if hi == 0:
                return rf"\{{{ws}\}}" if lo == 0 else None
            member = f"{key}{ws}:{ws}{value}"
            more = f"(?:{ws},{ws}{member}){{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
            return rf"\{{{ws}(?:{member}{more}){'' if lo else '?'}{ws}\}}"
        if "patternProperties" in schema:
            raise NeolmError("patternProperties is supported on objects without properties only")
        required = set(schema.get("required", []))
        missing = required - set(properties)
        if missing:
            raise NeolmError(f"required properties without a schema: {sorted(missing)}")
        lo, hi = self._count(schema, "minProperties", "maxProperties")
        if lo > len(required) or (hi is not None and hi < len(properties)):  # (only bounds that always hold)
            raise NeolmError("minProperties / maxProperties are supported on objects with properties only where "
                             "the required properties and all of them lie within them")  # fmt: skip
        members = []  # (regex or None, required)
        for name, sub in properties.items():
            value = self.convert(sub, depth + 1)
            if value is None and name in required:
                return None
            if value is not None:
                members.append((f"{literal(name)}{ws}:{ws}{value}", name in required))
        sep = f"{ws},{ws}"
        # the first member written is member i: every one before it is optional and left out
        options = []
        for i, (first, _) in enumerate(members):
            rest = "".join(f"{sep}{m}" if req else f"(?:{sep}{m})?" for m, req in members[i + 1 :])
            options.append(first + rest)
            if members[i][1]:
                break
        body = "|".join(options)
        if all(not req for _, req in members):
            return rf"\{{{ws}(?:{body})?{ws}\}}"
        return rf"\{{{ws}(?:{body}){ws}\}}"


def _decimal(schema: dict, key: str) -> Decimal:
    """schema[key], a finite JSON number, as an exact decimal (a float as its shortest repr: 0.1 is 0.1)."""
    x = schema[key]
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        raise NeolmError(f"{key} must be a finite number, got {x!r}")
    return Decimal(x if isinstance(x, int) else repr(x))


def _step(schema: dict) -> Decimal | None:
    """multipleOf as an exact decimal, or None."""
    if "multipleOf" not in schema:
        return None
    step = _decimal(schema, "multipleOf")
    if step <= 0:
        raise NeolmError(f"multipleOf must be a finite number > 0, got {schema['multipleOf']!r}")
    return step


def _bounds(schema: dict) -> tuple[Decimal | None, bool, Decimal | None, bool]:
    """A number's bounds as exact decimals: (lowest or None, whether it is excluded, highest or None, whether
    excluded), the tighter where both minimum and exclusiveMinimum (or the maximums) are given."""
    lo, lo_open, hi, hi_open = None, False, None, False
    for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        if key not in schema:
            continue
        x, open_ = _decimal(schema, key), key.startswith("exclusive")
        if key in ("minimum", "exclusiveMinimum"):
            if lo is None or x > lo or (x == lo and open_):
                lo, lo_open = x, open_
        elif hi is None or x < hi or (x == hi and open_):
            hi, hi_open = x, open_
    return lo, lo_open, hi, hi_open
