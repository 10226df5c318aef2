"""Rate limits: what a limit is, and the sliding-window arithmetic that enforces it.

keycap counts with a sliding-window counter (as Cloudflare and the ``limits``
library do): a counter for the current fixed window and one for the window
before, the previous one weighted by how much of it still overlaps the sliding
window. A fresh burst is capped at exactly ``limit``; and unlike fixed windows,
a burst at the end of one window and the start of the next cannot reach
``2 * limit``.

The weight is kept in thousandths, rounded *up*, so integer arithmetic in SQL
gives the same answer as this module and rounding can only refuse, never
admit, an extra unit. The database applies :func:`admits` inside the UPDATE
that consumes; this module computes ``retry_after`` and ``remaining`` for the
caller from the same numbers.

Windows are aligned to the Unix epoch in the client's clock. The stored window
start only moves forward: a server whose clock lags sees the newer window and
is counted in it, so clock skew between app servers can never reset a window
twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final

from keycap._errors import InvalidArgumentError
from keycap._rules.money import MAX_UNITS, Amount, meter_name, to_micros

RESOLUTION: Final = 1000
WINDOWS_MS: Final = {
    "second": 1_000,
    "minute": 60_000,
    "hour": 3_600_000,
    "day": 86_400_000,
    "week": 604_800_000,
    "month": 2_592_000_000,  # 30 days: a rate window needs a fixed length
}
MAX_WINDOW_MS: Final = WINDOWS_MS["month"]
#: The largest limit, in stored units (calls, or micro-units of a meter). The SQL
#: compares ``previous * weight + (current + cost) * RESOLUTION`` with
#: ``limit * RESOLUTION`` once ``current + cost <= limit`` holds: every term is then
#: at most ``limit * RESOLUTION``, and two of them stay inside a signed 64-bit
#: integer (and SQLite's integers) for any limit up to this.
MAX_LIMIT_UNITS: Final = 4 * 10**15
#: So: at most 1,000,000,000,000 calls, or 4,000,000,000 units of a meter, per window.
MAX_CALLS: Final = MAX_UNITS
MAX_METERED: Final = MAX_LIMIT_UNITS // 10**6
MAX_NAME: Final = 64
_NAME = re.compile(r"[A-Za-z0-9_.:\-/]{1,64}")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``limit`` per sliding ``window``; checked when built.

    Args:
        limit: calls per window; with ``meter``, units of that meter per window
            (a ``Decimal``, e.g. tokens per minute).
        window: ``"second"``, ``"minute"``, ``"hour"``, ``"day"``, ``"week"``,
            ``"month"`` (30 days), or a timedelta from 1 second to 30 days in
            whole milliseconds.
        name: unique per key/project/organization; defaults to ``"{limit}/{window}"``.
        meter: count the call's cost on this meter instead of counting calls.

    Raises:
        InvalidArgumentError: a bad limit, window, name or meter.
    """

    limit: Amount
    window: str | timedelta = "minute"
    name: str | None = None
    meter: str | None = None
    #: The limit in stored units: calls, or micro-units of the meter.
    units: int = field(init=False, repr=False, compare=False)
    #: The window's length in milliseconds.
    window_ms: int = field(init=False, repr=False, compare=False)
    #: The limit's name: ``name``, or ``"{limit}/{window}"`` (``:meter`` appended).
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", _units(self.limit, self.meter))
        object.__setattr__(self, "window_ms", window_ms(self.window))
        object.__setattr__(self, "key", _key(self))


def _units(limit: object, meter: object) -> int:
    if meter is None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise InvalidArgumentError("limit", "must be an int (calls per window)")
        if not 0 <= limit <= MAX_CALLS:
            raise InvalidArgumentError("limit", f"must be from 0 to {MAX_CALLS}")
        return limit
    meter_name(meter)
    units = to_micros(limit, "limit")
    if units > MAX_LIMIT_UNITS:
        raise InvalidArgumentError(
            "limit", f"must be at most {MAX_METERED} (units of the meter per window)"
        )
    return units


def _key(rl: RateLimit) -> str:
    if rl.name is not None:
        if not isinstance(rl.name, str) or not _NAME.fullmatch(rl.name):
            raise InvalidArgumentError("name", "must be 1-64 of A-Z a-z 0-9 _ . : - /")
        return rl.name
    window = rl.window if isinstance(rl.window, str) else f"{rl.window_ms}ms"
    default = f"{rl.limit}/{window}" + (f":{rl.meter}" if rl.meter else "")
    if len(default) > MAX_NAME:
        raise InvalidArgumentError(
            "name", f"the default name {default[:20]}… is over {MAX_NAME} characters: give one"
        )
    return default


def window_ms(window: object) -> int:
    if isinstance(window, str) and window in WINDOWS_MS:
        return WINDOWS_MS[window]
    if isinstance(window, timedelta):
        ms, rest = divmod(window // timedelta(microseconds=1), 1000)
        if rest == 0 and 1000 <= ms <= MAX_WINDOW_MS:
            return ms
    raise InvalidArgumentError(
        "window", "must be second, minute, hour, day, week, month, or 1s-30d in whole ms"
    )


@dataclass(frozen=True, slots=True)
class WindowView:
    """The counters as seen at one instant."""

    aligned: int  # start of the current window, ms since epoch (never before the stored one)
    previous: int
    current: int
    weight: int  # thousandths of the previous window still inside the sliding window


def view(win: int, now_ms: int, stored_start: int, current: int, previous: int) -> WindowView:
    aligned = now_ms - now_ms % win
    if stored_start > aligned:  # another server's clock is ahead: join its window
        return WindowView(stored_start, previous, current, RESOLUTION)
    weight = -(-(win - (now_ms - aligned)) * RESOLUTION // win)  # ceil
    if stored_start == aligned:
        return WindowView(aligned, previous, current, weight)
    if stored_start == aligned - win:
        return WindowView(aligned, current, 0, weight)
    return WindowView(aligned, 0, 0, weight)


def admits(limit: int, v: WindowView, cost: int) -> bool:
    return v.previous * v.weight + (v.current + cost) * RESOLUTION <= limit * RESOLUTION


def remaining(limit: int, v: WindowView) -> int:
    """How much more fits right now."""
    return max(0, (limit * RESOLUTION - v.previous * v.weight) // RESOLUTION - v.current)


def retry_after_ms(limit: int, win: int, now_ms: int, v: WindowView, cost: int) -> int | None:
    """Milliseconds until ``cost`` fits (0 if it fits now), or None if it never can."""
    if cost > limit:
        return None
    if admits(limit, v, cost):
        return 0
    if v.current + cost <= limit and v.previous > 0:
        # Later in this window: the weight must fall to w_max.
        w_max = (limit - v.current - cost) * RESOLUTION // v.previous
        return max(0, v.aligned + _elapsed_for(win, w_max) - now_ms)
    # Next window: today's count becomes the previous one.
    nxt = v.aligned + win
    if v.current == 0:
        return nxt - now_ms
    w_max = (limit - cost) * RESOLUTION // v.current
    return nxt + _elapsed_for(win, w_max) - now_ms


def _elapsed_for(win: int, w_max: int) -> int:
    """The least elapsed ms at which ceil((win - e) * R / win) <= w_max."""
    if w_max >= RESOLUTION:
        return 0
    # ceil(x) <= w  <=>  x <= w  <=>  (win - e) * R <= w * win  <=>  e >= win - w*win/R
    return -(-(win * RESOLUTION - w_max * win) // RESOLUTION)


def reset_ms(win: int, now_ms: int, v: WindowView) -> int:
    """Milliseconds until the whole limit is available again."""
    if v.current > 0:
        return v.aligned + 2 * win - now_ms
    if v.previous > 0 and v.weight > 0:
        return v.aligned + win - now_ms
    return 0
