from datetime import timedelta
from decimal import Decimal

import pytest

from keycap._errors import InvalidArgumentError
from keycap._rules import rate_limits as ratelimit
from keycap._rules.rate_limits import RateLimit, admits, remaining, retry_after_ms, view

MIN = 60_000


def test_a_rate_limit_knows_its_units_window_and_name() -> None:
    rl = RateLimit(100, "minute")
    assert (rl.units, rl.window_ms, rl.key) == (100, MIN, "100/minute")
    assert RateLimit(Decimal("1000"), "minute", meter="tokens").units == 10**9
    assert RateLimit(5, timedelta(seconds=90), name="burst").key == "burst"


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"limit": 1.5}, id="float-limit"),
        pytest.param({"limit": -1}, id="negative-limit"),
        pytest.param({"limit": 1, "window": "fortnight"}, id="unknown-window"),
        pytest.param({"limit": 1, "window": timedelta(days=31)}, id="window-over-30-days"),
        pytest.param({"limit": 1, "window": timedelta(microseconds=1500)}, id="fractional-ms"),
        pytest.param({"limit": 1, "name": "bad name"}, id="name-with-a-space"),
    ],
)
def test_a_bad_rate_limit_is_refused_when_built(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        RateLimit(**kwargs)  # type: ignore[arg-type]


def test_a_fresh_burst_is_capped_at_exactly_the_limit() -> None:
    start, cur, prev = 0, 0, 0
    admitted = 0
    now = 10 * MIN + 12_345
    for _ in range(500):
        v = view(MIN, now, start, cur, prev)
        if admits(100, v, 1):
            admitted += 1
            start, prev, cur = v.aligned, v.previous, v.current + 1
    assert admitted == 100


def test_no_double_burst_across_a_boundary() -> None:
    # 100 at the very end of one window, then a burst right after the boundary.
    v = view(MIN, 2 * MIN - 1, 0, 0, 0)
    start, prev, cur = v.aligned, 0, 100
    v = view(MIN, 2 * MIN + 1, start, cur, prev)
    assert remaining(100, v) == 0
    assert not admits(100, v, 1)


def test_lagging_clock_joins_the_newer_window() -> None:
    v = view(MIN, 5 * MIN - 10, 5 * MIN, 7, 3)  # stored window is ahead of this clock
    assert (v.aligned, v.current, v.previous, v.weight) == (5 * MIN, 7, 3, 1000)


@pytest.mark.parametrize(
    ("limit", "stored", "cur", "prev", "now", "cost"),
    [
        (100, 10 * MIN, 100, 0, 10 * MIN + 5_000, 1),
        (100, 10 * MIN, 60, 80, 10 * MIN + 5_000, 1),
        (100, 10 * MIN, 60, 80, 10 * MIN + 5_000, 30),
        (10, 10 * MIN, 3, 10, 10 * MIN + 59_999, 5),
        (7, 10 * MIN, 7, 7, 10 * MIN + 1, 7),
        (100, 9 * MIN, 100, 50, 10 * MIN + 100, 1),
        (3, 10 * MIN, 0, 3, 10 * MIN, 1),
    ],
)
def test_retry_after_is_exact(
    limit: int, stored: int, cur: int, prev: int, now: int, cost: int
) -> None:
    v = view(MIN, now, stored, cur, prev)
    wait = retry_after_ms(limit, MIN, now, v, cost)
    assert wait is not None
    # Nothing else happens meanwhile: the stored counters stay as they are.
    assert admits(limit, view(MIN, now + wait, stored, cur, prev), cost)
    if wait > 0:
        assert not admits(limit, view(MIN, now + wait - 1, stored, cur, prev), cost)


def test_a_cost_above_the_limit_never_fits() -> None:
    assert retry_after_ms(10, MIN, 0, view(MIN, 0, 0, 0, 0), 11) is None


def test_window_aliases() -> None:
    assert ratelimit.window_ms("second") == 1000
    assert ratelimit.window_ms("month") == 30 * 86_400_000
