"""Exact amounts: ``Decimal`` (or ``int``) at the API, integer micro-units in storage.

One unit of any meter is 1,000,000 micro-units, so amounts have at most six
decimal places. An amount with more is *rejected*, never rounded: keycap will
not decide on its own whether a caller is charged more or less than it asked.
Floats are rejected everywhere; so are NaN, infinities, negatives and anything
above 10**12 units (so sums stay far inside a 64-bit integer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Final

from keycap._errors import InvalidArgumentError

PLACES: Final = 6
SCALE: Final = 10**PLACES
MAX_UNITS: Final = 10**12
MAX_MICROS: Final = MAX_UNITS * SCALE
#: The most significant digits an amount may be written with (its value is bounded
#: anyway; this bounds the work of checking it).
MAX_DIGITS: Final = 1000
DEFAULT_METER: Final = "spend"

Amount = Decimal | int
_METER = re.compile(r"[a-z][a-z0-9_]{0,31}")


def to_micros(value: object, field: str, *, allow_zero: bool = True) -> int:
    """``value`` in micro-units.

    Raises:
        InvalidArgumentError: a float, str, bool, NaN, infinity, negative, zero
            (when not allowed), more than six decimal places, or above 10**12.
    """
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        raise InvalidArgumentError(
            field, "must be a Decimal or an int (floats cannot hold money exactly)"
        )
    amount = Decimal(value)
    if not amount.is_finite():
        raise InvalidArgumentError(field, "must be a finite number")
    if amount < 0:
        raise InvalidArgumentError(field, "must not be negative")
    if amount == 0 and not allow_zero:
        raise InvalidArgumentError(field, "must be greater than zero")
    if amount > MAX_UNITS:
        raise InvalidArgumentError(field, f"must be at most {MAX_UNITS}")
    return _scaled(amount, field)


def _scaled(amount: Decimal, field: str) -> int:
    """A finite, non-negative ``amount`` in micro-units, exactly: integer arithmetic on
    its digits, so no Decimal context can round it (a context of 60 digits would
    turn 0.03 followed by 60 zeros and a 1 into 0.03)."""
    _, digit_tuple, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # finite
    if len(digit_tuple) > MAX_DIGITS:
        raise InvalidArgumentError(field, f"has more than {MAX_DIGITS} digits")
    digits = int("".join(map(str, digit_tuple)))
    if digits == 0:
        return 0
    shift = exponent + PLACES
    if shift >= 0:
        up: int = 10**shift
        return digits * up  # at most 10**18: amount <= MAX_UNITS was checked
    # Below a micro-unit: the digits past the sixth decimal place must all be zero.
    # More places than digits means a nonzero digit past the sixth place.
    down: int = 10 ** min(-shift, len(digit_tuple) + 1)
    if -shift > len(digit_tuple) or digits % down:
        raise InvalidArgumentError(
            field, f"has more than {PLACES} decimal places (keycap never rounds money)"
        )
    return digits // down


def from_micros(micros: int) -> Decimal:
    """Micro-units back to a ``Decimal`` with exactly six places."""
    return Decimal(micros).scaleb(-PLACES)


def meter_name(value: object, field: str = "meter") -> str:
    if not isinstance(value, str) or not _METER.fullmatch(value):
        raise InvalidArgumentError(field, "must be 1-32 of a-z 0-9 _ starting with a letter")
    return value


def costs(value: object, field: str = "cost", *, allow_zero: bool = True) -> dict[str, int]:
    """A cost as ``{meter: micros}``: a bare amount is the ``spend`` meter.

    Raises:
        InvalidArgumentError: bad amounts or meter names, or an empty mapping.
    """
    if isinstance(value, Mapping):
        if not value or len(value) > 16:
            raise InvalidArgumentError(field, "must name 1 to 16 meters")
        return {
            meter_name(m, f"{field} meter"): to_micros(a, f"{field}[{m!r}]", allow_zero=allow_zero)
            for m, a in value.items()
        }
    return {DEFAULT_METER: to_micros(value, field, allow_zero=allow_zero)}


def plain(value: Decimal | int) -> str:
    """An exact amount for people and headers, without padding zeros: ``0.1``, ``5``, ``0``."""
    if isinstance(value, int):
        return str(value)
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0.0") else text
