"""Results and the errors that name what refused: built from rows, with no I/O.

Also delivers budget alerts (after commit) to the client's handler.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from keycap._db.build import AnyRow
from keycap._db.tenancy import scope_of
from keycap._errors import (
    BudgetExceededError,
    RateLimitedError,
    UsageExhaustedError,
)
from keycap._models import (
    BudgetAlert,
    BudgetStatus,
    RateLimitStatus,
    Remaining,
)
from keycap._rules import budgets as budget_rules
from keycap._rules import periods
from keycap._rules import rate_limits as ratelimit
from keycap._rules.money import from_micros

log = logging.getLogger("keycap")

AlertHandler = Callable[[BudgetAlert], Awaitable[None]]


def budget_status(row: Any, now: datetime) -> BudgetStatus:
    state = budget_rules.state_at(row, now)
    return BudgetStatus.model_construct(
        id=row.id,
        scope=scope_of(row.subject_id),
        subject_id=row.subject_id,
        meter=row.meter,
        period=row.period,
        anchor_day=row.anchor_day,
        limit=from_micros(state.limit),
        credit=from_micros(state.credit),
        used=from_micros(state.used),
        held=from_micros(state.held),
        remaining=from_micros(state.remaining),
        period_start=state.period_start,
        reset_at=state.reset_at,
        alert_thresholds=budget_rules.decode_thresholds(row.thresholds),
    )


def rate_limit_status(row: AnyRow, now: datetime) -> RateLimitStatus:
    now_ms = epoch_ms(now)
    v = ratelimit.view(
        row.window_ms, now_ms, row.window_start, row.current_units, row.previous_units
    )
    remaining = ratelimit.remaining(row.limit_units, v)
    reset = now + timedelta(milliseconds=ratelimit.reset_ms(row.window_ms, now_ms, v))
    as_amount = row.meter is not None
    return RateLimitStatus.model_construct(
        id=row.id,
        scope=scope_of(row.subject_id),
        subject_id=row.subject_id,
        name=row.name,
        meter=row.meter,
        limit=from_micros(row.limit_units) if as_amount else row.limit_units,
        window_seconds=from_micros(row.window_ms * 1000),
        remaining=from_micros(remaining) if as_amount else remaining,
        reset_at=reset,
    )


def epoch_ms(when: datetime) -> int:
    return int((when - periods.EPOCH) // timedelta(milliseconds=1))


def by_remaining(statuses: Sequence[BudgetStatus]) -> tuple[BudgetStatus, ...]:
    return tuple(sorted(statuses, key=lambda s: (s.remaining, s.id)))


_SPECIFIC = {"key": 0, "identity": 1, "project": 2, "organization": 3}


def remaining(rows: Sequence[AnyRow], now: datetime) -> list[Remaining]:
    """Per meter, tightest budget first (on a tie, the most specific), by meter."""
    by_meter: dict[str, list[BudgetStatus]] = {}
    for row in rows:
        by_meter.setdefault(row.meter, []).append(budget_status(row, now))
    out = []
    for meter in sorted(by_meter):
        ordered = tuple(
            sorted(by_meter[meter], key=lambda s: (s.remaining, _SPECIFIC[s.scope], s.id))
        )
        binding = ordered[0]
        out.append(
            Remaining.model_construct(
                meter=meter,
                amount=binding.remaining,
                binding=binding,
                reset_at=binding.reset_at,
                budgets=ordered,
            )
        )
    return out


def crossed_alerts(
    debited: Sequence[tuple[AnyRow, int]], now: datetime, key_id: str | None
) -> tuple[BudgetAlert, ...]:
    out = []
    for after, amount in debited:
        if not (thresholds := budget_rules.decode_thresholds(after.thresholds)):
            continue
        state = budget_rules.state_at(after, now)
        for threshold in budget_rules.crossed(
            thresholds,
            state.limit,
            state.used - amount,
            state.used,
        ):
            out.append(
                BudgetAlert.model_construct(
                    budget_id=after.id,
                    scope=scope_of(after.subject_id),
                    subject_id=after.subject_id,
                    meter=after.meter,
                    threshold=threshold,
                    limit=from_micros(state.limit),
                    used=from_micros(state.used),
                    period_start=state.period_start,
                    key_id=key_id,
                )
            )
    return tuple(out)


async def deliver(alerts: Sequence[BudgetAlert], handler: AlertHandler | None) -> None:
    """Await the handler once per alert, after commit. A failing handler is logged:
    the charge it reports has happened and must not look as if it failed."""
    if handler is None:
        return
    for alert in alerts:
        try:
            await handler(alert)
        except Exception:
            log.exception(
                "keycap: on_budget_alert failed for budget %s at %s%%",
                alert.budget_id,
                alert.threshold,
            )


def budget_exceeded(
    row: AnyRow, requested: int, now: datetime, key_id: str | None
) -> BudgetExceededError:
    state = budget_rules.state_at(row, now)
    return BudgetExceededError(
        budget_id=row.id,
        scope=scope_of(row.subject_id),
        subject_id=row.subject_id,
        meter=row.meter,
        period=row.period,
        limit=from_micros(state.limit + state.credit),
        used=from_micros(state.used),
        held=from_micros(state.held),
        remaining=from_micros(state.remaining),
        requested=from_micros(requested),
        reset_at=state.reset_at,
        key_id=key_id,
    )


def rate_limited_error(
    current: AnyRow, units: int, v: ratelimit.WindowView, now: datetime, key_id: str
) -> RateLimitedError:
    now_ms = epoch_ms(now)
    wait = ratelimit.retry_after_ms(current.limit_units, current.window_ms, now_ms, v, units)
    status = rate_limit_status(current, now)
    return RateLimitedError(
        name=current.name,
        scope=scope_of(current.subject_id),
        limit=status.limit,
        remaining=status.remaining,
        retry_after=None if wait is None else wait / 1000,
        reset_at=status.reset_at,
        window_seconds=Decimal(current.window_ms) / 1000,  # 60, not 60.000000
        meter=status.meter,
        key_id=key_id,
        subject_id=current.subject_id,
    )


def rate_order(status: RateLimitStatus) -> tuple[Any, ...]:
    fraction = status.remaining / status.limit if status.limit else 0
    return (fraction, status.reset_at)


def tightest_rate(rows: Sequence[Any], now: datetime) -> RateLimitStatus | None:
    """The status of the rate limit with the least left, of ``rows`` after a call."""
    statuses = [rate_limit_status(row, now) for row in rows]
    return min(statuses, key=rate_order) if statuses else None


def usage_cap_error(row: AnyRow) -> UsageExhaustedError | None:
    m_ = row._mapping
    if m_["max_uses"] is not None and m_["use_count"] >= m_["max_uses"]:
        return UsageExhaustedError(m_["max_uses"], key_id=m_["id"])
    return None
