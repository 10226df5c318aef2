from datetime import UTC, datetime

import pytest

from keycap._errors import InvalidArgumentError
from keycap._rules import periods
from keycap._rules.periods import Period


def dt(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_day_and_week_periods_start_at_utc_midnight_and_monday() -> None:
    now = dt(2026, 1, 15, 13, 45)  # a Thursday
    assert periods.start(Period.DAY, now) == dt(2026, 1, 15)
    assert periods.end(Period.DAY, dt(2026, 1, 15)) == dt(2026, 1, 16)
    assert periods.start(Period.WEEK, now) == dt(2026, 1, 12)  # ISO Monday
    assert periods.end(Period.WEEK, dt(2026, 1, 12)) == dt(2026, 1, 19)
    assert periods.start(Period.WEEK, dt(2026, 1, 12)) == dt(2026, 1, 12)


def test_lifetime_never_resets() -> None:
    assert periods.start(Period.LIFETIME, dt(2026, 1, 1)) == periods.EPOCH
    assert periods.end(Period.LIFETIME, periods.EPOCH) is None


def test_a_calendar_month_period_starts_on_the_first() -> None:
    assert periods.start(Period.MONTH, dt(2026, 3, 31, 23, 59)) == dt(2026, 3, 1)
    assert periods.end(Period.MONTH, dt(2026, 12, 1)) == dt(2027, 1, 1)


def test_anchor_on_the_31st_clamps_without_drifting() -> None:
    starts = []
    start = periods.start(Period.MONTH, dt(2026, 1, 31, 5), 31)
    for _ in range(6):
        starts.append(start)
        start = periods.end(Period.MONTH, start, 31)  # type: ignore[assignment]
    assert starts == [
        dt(2026, 1, 31),
        dt(2026, 2, 28),
        dt(2026, 3, 31),
        dt(2026, 4, 30),
        dt(2026, 5, 31),
        dt(2026, 6, 30),
    ]
    assert periods.start(Period.MONTH, dt(2028, 2, 29, 1), 31) == dt(2028, 2, 29)  # leap year
    assert periods.start(Period.MONTH, dt(2026, 3, 30), 31) == dt(2026, 2, 28)
    assert periods.start(Period.MONTH, dt(2026, 3, 31), 31) == dt(2026, 3, 31)


def test_anchor_before_the_anchor_day_is_last_months_period() -> None:
    assert periods.start(Period.MONTH, dt(2026, 1, 10), 15) == dt(2025, 12, 15)
    assert periods.start(Period.MONTH, dt(2026, 1, 15), 15) == dt(2026, 1, 15)


def test_start_and_end_agree_everywhere() -> None:
    """Every instant lies in [start, end) of its period: one rule in every path."""
    from datetime import timedelta

    t = dt(2025, 12, 20)
    while t < dt(2027, 3, 10):
        for anchor in (None, 1, 15, 28, 29, 30, 31):
            s = periods.start(Period.MONTH, t, anchor)
            e = periods.end(Period.MONTH, s, anchor)
            assert e is not None and s <= t < e
            assert periods.start(Period.MONTH, e, anchor) == e
        t += timedelta(hours=7)


@pytest.mark.parametrize(
    ("period", "anchor"),
    [
        ("year", None),
        ("Month", None),
        ("day", 5),
        ("month", 0),
        ("month", 32),
        ("month", True),
        (None, None),
    ],
)
def test_an_unknown_period_or_anchor_is_refused(period: object, anchor: object) -> None:
    with pytest.raises(InvalidArgumentError):
        periods.parse(period, anchor)
