"""Budgets: the value object, and the pure arithmetic of their state.

A budget caps how much of one meter (``spend`` by default) may be used per
period. Every budget of the meter on the key, on its project and on its
organization must take a charge, or none does. The database decides each
debit in one conditional UPDATE (``keycap._db.budgets``); this module turns stored
rows into what callers see and computes which alert thresholds a charge
crossed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from keycap._errors import InvalidArgumentError
from keycap._rules import periods
from keycap._rules.money import DEFAULT_METER, Amount, meter_name, to_micros
from keycap._rules.periods import Period

MAX_THRESHOLDS = 8


@dataclass(frozen=True, slots=True)
class Budget:
    """At most ``limit`` of ``meter`` per ``period``.

    Args:
        limit: a ``Decimal`` or int, at most six decimal places. 0 means nothing
            may be spent (the key still authenticates).
        period: ``"lifetime"``, ``"day"``, ``"week"`` (ISO) or ``"month"`` (UTC).
        meter: what is counted: ``"spend"``, ``"tokens"``, ...
        anchor_day: for monthly budgets, the day of the month periods start (1-31).
        alert_thresholds: percentages of the limit (e.g. ``(50, 80, 100)``); the
            charge that crosses one reports it, and the client's
            ``on_budget_alert`` callback is awaited once for it.

    Raises:
        InvalidArgumentError: a bad limit, period, meter, anchor day or threshold.
    """

    limit: Amount
    period: str = "month"
    meter: str = DEFAULT_METER
    anchor_day: int | None = None
    alert_thresholds: Sequence[int] = ()
    #: The budget validated, in stored units.
    spec: BudgetSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", BudgetSpec.of(self))


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """A validated Budget, in stored units (``Budget.spec``)."""

    limit_micros: int
    period: Period
    meter: str
    anchor_day: int | None
    thresholds: tuple[int, ...]

    @classmethod
    def of(cls, budget: Budget) -> BudgetSpec:
        period, anchor = periods.parse(budget.period, budget.anchor_day)
        raw = budget.alert_thresholds
        if isinstance(raw, str | bytes) or not isinstance(raw, Sequence):
            raise InvalidArgumentError("alert_thresholds", "must be a list of percentages")
        thresholds = tuple(sorted(set(raw)))
        if len(thresholds) > MAX_THRESHOLDS or any(
            isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 100 for t in thresholds
        ):
            raise InvalidArgumentError(
                "alert_thresholds", f"at most {MAX_THRESHOLDS} ints from 1 to 100"
            )
        return cls(
            limit_micros=to_micros(budget.limit, "limit"),
            period=period,
            meter=meter_name(budget.meter),
            anchor_day=anchor,
            thresholds=thresholds,
        )


def encode_thresholds(thresholds: tuple[int, ...]) -> str:
    return " " + " ".join(str(t) for t in thresholds) + " "


@lru_cache(maxsize=1024)
def decode_thresholds(stored: str) -> tuple[int, ...]:
    return tuple(int(t) for t in stored.split())


@dataclass(frozen=True, slots=True)
class State:
    """A budget's numbers as they stand at ``now`` (period rollover applied)."""

    limit: int
    credit: int
    used: int
    held: int
    period_start: datetime
    reset_at: datetime | None

    @property
    def remaining(self) -> int:
        return max(0, self.limit + self.credit - self.used - self.held)


def state_at(row: Any, now: datetime) -> State:
    """The state of a stored budget row at ``now``: a row whose period has passed
    reads as a fresh period (its stored numbers are rewritten on the next debit)."""
    m = row._mapping if hasattr(row, "_mapping") else row
    period = Period(m["period"])
    current = periods.start(period, now, m["anchor_day"])
    used, credit, start = m["used_micros"], m["credit_micros"], m["period_start"]
    if start < current:
        used, credit, start = 0, 0, current
    return State(
        limit=m["limit_micros"],
        credit=credit,
        used=used,
        held=m["held_micros"],
        period_start=start,
        reset_at=periods.end(period, start, m["anchor_day"]),
    )


def crossed(thresholds: tuple[int, ...], limit: int, before: int, after: int) -> tuple[int, ...]:
    """The thresholds (percent of ``limit``) that used crossed going from before to after.

    Used only grows within a period, so each threshold is crossed by exactly one
    debit per period.
    """
    out = []
    for t in thresholds:
        mark = -(-limit * t // 100)  # ceil: 100% is reached only at the full limit
        if before < mark <= after:
            out.append(t)
    return tuple(out)
