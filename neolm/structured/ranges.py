"""Regexes of the numbers between two bounds, as JSON writes them: the integers lo..hi of a JSON Schema's
bounded integer, the decimals between two bounds (each inclusive or exclusive) of a bounded number, and the
multiples of a step (multipleOf) between bounds or none.

A bounded number is written as a plain decimal: an integer part without leading zeros and an optional fraction,
no exponent (every value in a range can be written so). Bounds are compared as exact decimals (a float bound is
read as the shortest decimal that gives it: 0.1 as 0.1).

A fraction's digits are built one digit at a time against the bound's digits: "digits D with 0.D >= 0.g" is a
first digit above g's first and any after it, or g's first and then digits at least g's rest. Each builder
returns the regex of the non-empty digit strings and whether no fraction at all (the value 0) is allowed too.
"""

from __future__ import annotations

import functools
import math
from decimal import Decimal
from fractions import Fraction

from neolm.errors import NeolmError

Digits = tuple[str | None, bool]  # (regex of the non-empty digit strings allowed or None for none, empty allowed)


def int_range(lo: int | None, hi: int | None) -> str:
    """A regex of the integers lo..hi written as JSON (None: unbounded on that side)."""
    if lo is not None and hi is not None and lo > hi:
        raise NeolmError(f"no integer lies between minimum {lo} and maximum {hi}")
    parts = []
    if lo is None or lo < 0:  # negatives: -(|hi'|..|lo|)
        neg_lo = 1 if hi is None or hi >= 0 else -hi
        parts.append("-" + _positive(neg_lo, None if lo is None else -lo))
    if hi is None or hi >= 0:
        parts.append(_positive(max(lo or 0, 0), hi))
    return "(?:" + "|".join(parts) + ")"


def _positive(lo: int, hi: int | None) -> str:
    """Non-negative integers lo..hi (hi None: unbounded), without leading zeros."""
    if hi is None:  # lo..(10^n - 1) then any longer number
        n = len(str(lo))
        longer = f"[1-9][0-9]{{{n},}}"
        return f"(?:{_span(lo, 10**n - 1)}|{longer})"
    return _span(lo, hi)


def _span(lo: int, hi: int) -> str:
    """lo..hi, 0 <= lo <= hi, split into runs of equal length, each a digit-range regex."""
    out = []
    while lo <= hi:
        top = min(hi, 10 ** len(str(lo)) - 1)  # same number of digits
        out += _same_length(str(lo), str(top))
        lo = top + 1
    return "(?:" + "|".join(out) + ")"


def _same_length(a: str, b: str) -> list[str]:
    """Regexes of the numbers a..b, written with len(a) == len(b) digits."""
    if a == b:
        return [a]
    if len(a) == 1:
        return [f"[{a}-{b}]"]
    if a[0] == b[0]:
        return [a[0] + "(?:" + "|".join(_same_length(a[1:], b[1:])) + ")"]
    out = []
    n = len(a) - 1
    if a[1:] != "0" * n:  # a's first digit with the rest from a up
        out += [a[0] + "(?:" + "|".join(_same_length(a[1:], "9" * n)) + ")"]
        first = int(a[0]) + 1
    else:
        first = int(a[0])
    last = int(b[0]) - (1 if b[1:] != "9" * n else 0)
    if first <= last:
        out.append(f"[{first}-{last}][0-9]{{{n}}}")
    if b[1:] != "9" * n:
        out += [b[0] + "(?:" + "|".join(_same_length("0" * n, b[1:])) + ")"]
    return out


def decimal_range(lo: Decimal | None, lo_open: bool, hi: Decimal | None, hi_open: bool) -> str:
    """A regex of the decimals x with lo <= x <= hi (< on an open side; None: unbounded), written without an
    exponent."""
    if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_open or hi_open))):
        raise NeolmError(f"no number lies between the minimum {lo} and the maximum {hi}")
    parts = []
    if lo is None or lo < 0:  # negatives -y, y between max(0, -hi) and -lo: the sides swap
        low, low_open = (Decimal(0), True) if hi is None or hi >= 0 else (-hi, hi_open)  # zero is written unsigned
        parts.append("-" + _unsigned(low, low_open, None if lo is None else -lo, lo_open))
    if hi is None or hi > 0 or (hi == 0 and not hi_open):
        low, low_open = (lo, lo_open) if lo is not None and lo >= 0 else (Decimal(0), False)
        parts.append(_unsigned(low, low_open, hi, hi_open))
    return "(?:" + "|".join(parts) + ")"


def _unsigned(lo: Decimal, lo_open: bool, hi: Decimal | None, hi_open: bool) -> str:
    """Decimals from lo to hi (0 <= lo <= hi; None: unbounded) without a sign."""
    whole_lo, g = _split(lo)
    if hi is None:
        return f"(?:{whole_lo}{_fraction(_above(g, lo_open))}|{_positive(whole_lo + 1, None)}{_fraction(_ANY)})"
    whole_hi, h = _split(hi)
    if whole_lo == whole_hi:
        return f"{whole_lo}{_fraction(_between(g, lo_open, h, hi_open))}"
    parts = [f"{whole_lo}{_fraction(_above(g, lo_open))}"]
    if whole_lo + 1 <= whole_hi - 1:
        parts.append(_span(whole_lo + 1, whole_hi - 1) + _fraction(_ANY))
    below = _below(h, hi_open)
    if below != (None, False):
        parts.append(f"{whole_hi}{_fraction(below)}")
    return "(?:" + "|".join(parts) + ")"


def _split(x: Decimal) -> tuple[int, str]:
    """A non-negative decimal's integer part and its fraction's digits, trailing zeros dropped ("" for none)."""
    whole = int(x)
    return whole, format(x - whole, "f").partition(".")[2].rstrip("0")


_ANY: Digits = ("[0-9]+", True)


def _fraction(digits: Digits) -> str:
    """The optional fraction (".digits") of `digits`; never (None, False), which its callers leave out."""
    regex, empty = digits
    if regex is None:
        return ""
    return rf"(?:\.{regex})?" if empty else rf"\.{regex}"


def _then(digits: Digits) -> str | None:
    """The digit strings of `digits`, the empty one included where allowed, as one regex (None: none)."""
    regex, empty = digits
    if regex is None:
        return "" if empty else None
    return f"(?:{regex})?" if empty else regex


def _join(*alternatives: str | None) -> str | None:
    kept = [a for a in alternatives if a is not None]
    return None if not kept else kept[0] if len(kept) == 1 else "(?:" + "|".join(kept) + ")"


def _above(g: str, open_: bool) -> Digits:
    """Fractions 0.D >= 0.g (> if open_); g has no trailing zeros."""
    if not g:
        return ("0*[1-9][0-9]*", False) if open_ else ("[0-9]+", True)
    first, rest = int(g[0]), _then(_above(g[1:], open_))
    return _join(f"[{first + 1}-9][0-9]*" if first < 9 else None, None if rest is None else f"{first}{rest}"), False


def _below(h: str, open_: bool) -> Digits:
    """Fractions 0.D <= 0.h (< if open_); h has no trailing zeros."""
    if not h:
        return (None, False) if open_ else ("0+", True)
    first, rest = int(h[0]), _then(_below(h[1:], open_))
    return _join(f"[0-{first - 1}][0-9]*" if first > 0 else None, None if rest is None else f"{first}{rest}"), True


def _between(g: str, g_open: bool, h: str, h_open: bool) -> Digits:
    """Fractions 0.g <= 0.D <= 0.h (strict on an open side), 0.g < 0.h; no trailing zeros."""
    if not g and not g_open:
        return _below(h, h_open)
    a, b = int(g[0]) if g else 0, int(h[0])
    if a == b:
        rest = _then(_between(g[1:], g_open, h[1:], h_open))
        return (None if rest is None else f"{a}{rest}"), False
    low, high = _then(_above(g[1:], g_open)), _then(_below(h[1:], h_open))
    return _join(None if low is None else f"{a}{low}", f"[{a + 1}-{b - 1}][0-9]*" if a + 1 <= b - 1 else None,
                 None if high is None else f"{b}{high}"), False  # fmt: skip


MAX_LISTED = 1000  # multiples a step such as 3 or 0.3 may have between its bounds (see multiples)


def multiples(lo: Decimal | None, lo_open: bool, hi: Decimal | None, hi_open: bool, step: Decimal) -> str:
    """A regex of the multiples of `step` (> 0) between the bounds (as decimal_range's), written without an exponent
    and with at most as many fraction digits as `step` has (trailing zeros optional: 2.5, 2.50 for 0.25; 3, 3.0,
    3.00). With step = a / 10**k, x is a multiple when x * 10**k is an integer N that `a` divides. Where `a` divides
    a power of ten 10**j, only N's last j digits decide, so any bounds, or none, work if 10**j / a (the endings)
    is at most MAX_LISTED (0.01, 0.5, 0.25, 5, 8, 16, 100; not 32); other steps (3, 0.3, 7, 32) need both bounds,
    with at most MAX_LISTED multiples between them."""
    if not step > 0:
        raise NeolmError(f"multipleOf must be a number > 0, got {_text(step)}")
    a, k = scaled(step)
    low = None if lo is None else _multiple(lo * 10**k, a, up=True, strict=lo_open)  # bounds on N
    high = None if hi is None else _multiple(hi * 10**k, a, up=False, strict=hi_open)
    if low is not None and high is not None and low > high:
        raise NeolmError(f"no multiple of {_text(step)} lies between the minimum {lo} and the maximum {hi}")
    period = _period(a)
    if period is not None and 10**period // a > MAX_LISTED:
        period = None  # too many endings: listed, as 3's multiples are
    if period is None and (low is None or high is None or (high - low) // a >= MAX_LISTED):
        raise NeolmError(f"multipleOf {_text(step)} needs a minimum and a maximum with at most {MAX_LISTED} multiples "
                         "between them (steps such as 0.01, 0.25, 5, 8 or 16, whose multiples are told by their last "
                         "digits, work with any bounds or none)")  # fmt: skip
    parts = []
    if low is None or low < 0:  # negatives -N, N between max(a, -high) and -low; zero is written unsigned
        parts.append("-" + _unsigned_multiples(a if high is None or high >= 0 else -high, None if low is None else -low,
                                               a, k, period))  # fmt: skip
    if high is None or high >= 0:
        parts.append(_unsigned_multiples(0 if low is None or low < 0 else low, high, a, k, period))
    return "(?:" + "|".join(parts) + ")"


def _text(x: Decimal) -> str:
    return format(x.normalize(), "f")


def scaled(step: Decimal) -> tuple[int, int]:
    """(a, k) with step == a / 10**k, k as small as it can be."""
    _, digits, exponent = step.normalize().as_tuple()
    a = int("".join(map(str, digits)))
    return (a * 10**exponent, 0) if exponent >= 0 else (a, -exponent)


def _period(a: int) -> int | None:
    """The least j with a dividing 10**j, or None (a has a prime factor other than 2 and 5)."""
    twos = fives = 0
    while a % 2 == 0:
        a, twos = a // 2, twos + 1
    while a % 5 == 0:
        a, fives = a // 5, fives + 1
    return max(twos, fives) if a == 1 else None


def _multiple(t: Decimal, a: int, up: bool, strict: bool) -> int:
    """The multiple of a nearest t: the least >= t (up) or the greatest <= t; > or < when strict."""
    exact = Fraction(t)
    n = (math.ceil(exact / a) if up else math.floor(exact / a)) * a
    if strict and n == exact:
        n += a if up else -a
    return n


def _unsigned_multiples(low: int, high: int | None, a: int, k: int, period: int | None) -> str:
    """The texts of x = N / 10**k for the multiples N of a in low..high (0 <= low; high None: unbounded, when `a`
    divides 10**period)."""
    n = max(k + 1, period or 0, len(str(low)), len(str(high or 0)))  # digits of N read against the bounds
    head = _digits(n, k, a, low, min(high, 10**n - 1) if high is not None else 10**n - 1, padded=False)
    if high is not None:
        return head
    tail = _digits(n, k, a, 0, 10**n - 1, padded=True)  # N's last n digits decide (a divides 10**n)
    return f"(?:{head}|[1-9][0-9]*{tail})"


def _digits(n: int, k: int, a: int, low: int, high: int, padded: bool) -> str:
    """The multiples N of a in low..high (< 10**n) written as n digits with a point before the last k, a fraction
    ending in zeros written as far as wanted (none: no point); `padded`: with the leading zeros of N's n digits
    (the end of a longer number), else without (the last integer digit always written)."""
    lo_digits, hi_digits = str(low).zfill(n), str(high).zfill(n)
    point = n - k  # the fraction's first position

    def zeros_ok(i: int, r: int, tight_lo: bool) -> bool:
        return r == 0 and (not tight_lo or lo_digits[i:].strip("0") == "")

    @functools.cache
    def rest(i: int, r: int, tight_lo: bool, tight_hi: bool, started: bool) -> str | None:
        """Digits i.. given those before: r = (their value * 10**(n - i)) mod a; tight_*: equal to the bound's."""
        below = int(lo_digits[i:] or 0) if tight_lo else 0  # the values digits i.. may take
        above = int(hi_digits[i:] or 0) if tight_hi else 10 ** (n - i) - 1
        if below + (-r - below) % a > above:  # none of them completes a multiple: prune
            return None
        if i == n:
            return ""
        groups: dict[tuple[bool, str], list[int]] = {}  # digits that lead to the same text after them
        first, last = int(lo_digits[i]) if tight_lo else 0, int(hi_digits[i]) if tight_hi else 9
        for d in range(first, last + 1):
            now = started or d > 0 or i >= point - 1  # a leading zero is not written
            after = rest(i + 1, (r + d * 10 ** (n - i - 1)) % a, tight_lo and d == first, tight_hi and d == last, now)
            if after is not None:
                groups.setdefault((padded or now, after), []).append(d)
        alternatives = [(_digit_class(ds) if written else "") + after for (written, after), ds in groups.items()]
        body = None if not alternatives else alternatives[0] if len(alternatives) == 1 else \
            "(?:" + "|".join(alternatives) + ")"  # fmt: skip
        if i == point and body is not None:
            body = r"\." + body
        if i >= point and zeros_ok(i, r, tight_lo):  # the fraction may stop here
            return "" if body is None else f"(?:{body})?"
        return body

    found = rest(0, 0, True, True, padded)
    if found is None:
        raise NeolmError(f"no multiple lies between {low} and {high}")  # (callers pass bounds that hold one)
    return found


def _digit_class(ds: list[int]) -> str:
    if len(ds) == 1:
        return str(ds[0])
    if ds[-1] - ds[0] == len(ds) - 1:
        return f"[{ds[0]}-{ds[-1]}]"
    return "[" + "".join(map(str, ds)) + "]"
