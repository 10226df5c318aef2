"""Clock, aware-datetime checks and the duration grammar.

Durations are ``<n><unit>`` with a positive whole ``n`` and a unit of ``s``
(seconds), ``m`` (minutes), ``h`` (hours), ``d`` (days) or ``w`` (weeks), or a
``timedelta``. Months and years are not durations (their length varies): pass
``expires_at`` for a calendar date. A duration lies between one second and
36,500 days.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final

from keycap._errors import InvalidArgumentError

Clock = Callable[[], datetime]

MIN_DURATION: Final = timedelta(seconds=1)
MAX_DURATION: Final = timedelta(days=36_500)
#: Far enough from datetime.max that adding durations never overflows.
MAX_DATETIME: Final = datetime(9000, 1, 1, tzinfo=UTC)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_DURATION = re.compile(r"([1-9][0-9]{0,9})([smhdw])")


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware_utc(value: object, field: str) -> datetime:
    """``value`` as an aware UTC datetime.

    Raises:
        InvalidArgumentError: not a datetime, naive, or out of range.
    """
    if not isinstance(value, datetime):
        raise InvalidArgumentError(field, "must be a datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgumentError(
            field, "must be timezone-aware (e.g. datetime.now(UTC)); naive datetimes are ambiguous"
        )
    try:
        result = value.astimezone(UTC)
    except OverflowError:  # datetime.min or .max with an offset: not a UTC instant
        raise InvalidArgumentError(field, "is out of range") from None
    if result >= MAX_DATETIME:
        raise InvalidArgumentError(field, "is too far in the future")
    return result


def parse_duration(value: object, field: str) -> timedelta:
    """A duration string (``30s``, ``15m``, ``12h``, ``7d``, ``2w``) or timedelta.

    Raises:
        InvalidArgumentError: anything else, zero, negative, or over 36,500 days.
    """
    if isinstance(value, timedelta):
        delta = value
    elif isinstance(value, str) and len(value) <= 16 and (m := _DURATION.fullmatch(value)):
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
        if seconds > MAX_DURATION.total_seconds():
            raise InvalidArgumentError(field, "is longer than 36500 days")
        delta = timedelta(seconds=seconds)
    else:
        raise InvalidArgumentError(
            field, "must be a timedelta or a string like '30s', '15m', '12h', '7d', '2w'"
        )
    if delta < MIN_DURATION:
        raise InvalidArgumentError(field, "must be at least one second")
    if delta > MAX_DURATION:
        raise InvalidArgumentError(field, "is longer than 36500 days")
    return delta


def resolve_expiry(expires_in: object, expires_at: object, now: datetime) -> datetime | None:
    """The absolute expiry from at most one of ``expires_in`` / ``expires_at``.

    Raises:
        InvalidArgumentError: both given, a bad value, or an instant not in the future.
    """
    if expires_in is not None and expires_at is not None:
        raise InvalidArgumentError("expires_in", "give expires_in or expires_at, not both")
    if expires_in is not None:
        return now + parse_duration(expires_in, "expires_in")
    if expires_at is not None:
        when = aware_utc(expires_at, "expires_at")
        if when <= now:
            raise InvalidArgumentError("expires_at", "must be in the future")
        return when
    return None
