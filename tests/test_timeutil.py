from datetime import UTC, datetime, timedelta, timezone

import pytest

from keycap._errors import InvalidArgumentError
from keycap._rules.timeutil import aware_utc, parse_duration, resolve_expiry

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("36500d", timedelta(days=36500)),
        (timedelta(hours=1), timedelta(hours=1)),
    ],
)
def test_durations_parse_from_the_documented_grammar(text: object, delta: timedelta) -> None:
    assert parse_duration(text, "d") == delta


@pytest.mark.parametrize(
    "bad",
    [
        "0s",
        "-1d",
        "1.5h",
        "1y",
        "1mo",
        "7 d",
        "7D",
        "d",
        "",
        " 7d",
        "7d ",
        "01d",
        "36501d",
        "9999999999w",
        "1" * 100,
        timedelta(0),
        timedelta(seconds=-1),
        timedelta(days=36501),
        timedelta(microseconds=1),
        None,
        7,
        7.0,
        b"7d",
        "7\x00d",
        "\uff17d",  # a full-width digit seven
    ],
)
def test_a_malformed_duration_is_refused(bad: object) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_duration(bad, "expires_in")


def test_naive_datetimes_are_rejected_with_a_clear_message() -> None:
    with pytest.raises(InvalidArgumentError, match="timezone-aware"):
        aware_utc(datetime(2030, 1, 1), "expires_at")


def test_aware_datetimes_are_converted_to_utc() -> None:
    tokyo = timezone(timedelta(hours=9))
    result = aware_utc(datetime(2030, 1, 1, 9, tzinfo=tokyo), "x")
    assert result == datetime(2030, 1, 1, 0, tzinfo=UTC) and result.tzinfo is UTC


def test_absurd_datetimes_are_rejected() -> None:
    with pytest.raises(InvalidArgumentError):
        aware_utc(datetime.max.replace(tzinfo=UTC), "x")
    with pytest.raises(InvalidArgumentError):
        aware_utc("2030-01-01", "x")


def test_expiry_comes_from_a_duration_or_an_aware_datetime() -> None:
    assert resolve_expiry(None, None, NOW) is None
    assert resolve_expiry("1h", None, NOW) == NOW + timedelta(hours=1)
    assert resolve_expiry(None, NOW + timedelta(days=1), NOW) == NOW + timedelta(days=1)
    with pytest.raises(InvalidArgumentError):
        resolve_expiry("1h", NOW + timedelta(days=1), NOW)
    with pytest.raises(InvalidArgumentError, match="future"):
        resolve_expiry(None, NOW, NOW)
