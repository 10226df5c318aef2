"""Budget periods: one rule, in UTC, used by every code path.

* ``lifetime``: never resets.
* ``day``: from 00:00 UTC.
* ``week``: ISO weeks, from Monday 00:00 UTC.
* ``month``: calendar months from the 1st, 00:00 UTC; or, with ``anchor_day``
  (1-31), from that day of each month. A month too short for the anchor starts
  on its last day, and the next month goes back to the anchor: anchored on the
  31st, periods start Jan 31, Feb 28 (29), Mar 31, Apr 30, May 31 - no drift.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import Final

from keycap._errors import InvalidArgumentError

#: The start of every ``lifetime`` period.
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class Period(StrEnum):
    LIFETIME = "lifetime"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


def parse(value: object, anchor_day: object) -> tuple[Period, int | None]:
    """Validate a period and its anchor day.

    Raises:
        InvalidArgumentError: an unknown period, or an anchor day that is not an
            int 1-31 on a monthly period.
    """
    try:
        period = Period(value)  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgumentError(
            "period", "must be one of " + ", ".join(p.value for p in Period)
        ) from None
    if anchor_day is None:
        return period, None
    if period is not Period.MONTH:
        raise InvalidArgumentError("anchor_day", "applies to monthly periods only")
    if isinstance(anchor_day, bool) or not isinstance(anchor_day, int) or not 1 <= anchor_day <= 31:
        raise InvalidArgumentError("anchor_day", "must be an int from 1 to 31")
    return period, anchor_day


def _month_start(year: int, month: int, anchor: int) -> datetime:
    return datetime(year, month, min(anchor, calendar.monthrange(year, month)[1]), tzinfo=UTC)


def _add_months(year: int, month: int, n: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + n
    return index // 12, index % 12 + 1


# start and end are pure, and a call asks them the same thing for each of its
# budgets (and a result and its alerts once more each): worked out once.
@lru_cache(maxsize=1024)
def start(period: Period, now: datetime, anchor_day: int | None = None) -> datetime:
    """The start of the period containing ``now`` (aware UTC)."""
    if period is Period.LIFETIME:
        return EPOCH
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period is Period.DAY:
        return midnight
    if period is Period.WEEK:
        return midnight - timedelta(days=midnight.weekday())
    anchor = anchor_day or 1
    candidate = _month_start(midnight.year, midnight.month, anchor)
    if candidate > now:
        candidate = _month_start(*_add_months(midnight.year, midnight.month, -1), anchor)
    return candidate


@lru_cache(maxsize=1024)
def end(period: Period, period_start: datetime, anchor_day: int | None = None) -> datetime | None:
    """The start of the next period (when this one resets), or None for lifetime."""
    if period is Period.LIFETIME:
        return None
    if period is Period.DAY:
        return period_start + timedelta(days=1)
    if period is Period.WEEK:
        return period_start + timedelta(weeks=1)
    return _month_start(*_add_months(period_start.year, period_start.month, 1), anchor_day or 1)
