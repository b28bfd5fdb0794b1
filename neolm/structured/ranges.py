"""Regexes of the numbers between two bounds, as JSON writes them: the integers lo..hi of a JSON Schema's
bounded integer, and the decimals between two bounds (each inclusive or exclusive) of a bounded number.

A bounded number is written as a plain decimal: an integer part without leading zeros and an optional fraction,
no exponent (every value in a range can be written so). Bounds are compared as exact decimals (a float bound is
read as the shortest decimal that gives it: 0.1 as 0.1).

A fraction's digits are built one digit at a time against the bound's digits: "digits D with 0.D >= 0.g" is a
first digit above g's first and any after it, or g's first and then digits at least g's rest. Each builder
returns the regex of the non-empty digit strings and whether no fraction at all (the value 0) is allowed too.
"""

from __future__ import annotations

from decimal import Decimal

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
