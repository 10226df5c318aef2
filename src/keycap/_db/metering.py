"""PostgreSQL: a whole charge as one statement, run in autocommit (one round trip).

The statement is a chain of common table expressions:

1. ``hot_key``: the key's row, if live, locked ``FOR NO KEY UPDATE``;
2. ``hot_budgets``: every budget of the charged meters that applies to the key,
   locked ``FOR NO KEY UPDATE`` in id order (after the key: each of its rows
   joins the key's), each with its rollover, its amount and whether it fits;
3. ``hot_ok``: the decision: the key is live and every budget fits;
4. the writes, each only if ``hot_ok``: the budgets (from the locked rows'
   values), the key's ``last_used_at``, and the ledger's entries
   (``keycap._rules.movements.charges`` written as SQL: an entry per budget
   debited, the first of each meter primary, and a budget-less one for each
   meter no budget applies to).

The lock pass is what makes one statement exact. A statement keeps the
snapshot it started with, and waiting for a row lock does not refresh it; a
row read ``FOR NO KEY UPDATE`` is read again at its newest committed version
once the lock is granted. Without it, a charge that waited on the key for
another charge to commit would decide on the budgets as they were before that
charge, and spend them again (``tests/test_one_statement.py`` keeps that
version as a negative control and shows the tests catch it).

The lock order, key then budgets in id order, is the one the transactions of
``keycap._ops`` take, so mixed traffic on the same rows cannot deadlock on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    DateTime,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal,
    null,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import Grouping

from keycap._db.build import HOT_CACHE, KEY_ID, NOW, AnyRow, big, int_param
from keycap._db.grant import applies_to, key_is_live_now
from keycap._db.schema import budgets, keys, ledger
from keycap._db.types import JSONText, UTCDateTime
from keycap._rules import periods


def charge_params(
    key_id: str,
    amounts: Mapping[str, int],
    metadata: Mapping[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    """The values of :func:`charge_statement`'s bind parameters."""
    day, week, months = period_starts(now.astimezone(UTC).date())
    params: dict[str, Any] = {
        "m_key_id": key_id,
        "m_now": now,
        "m_day": day,
        "m_week": week,
        "m_months": months,
        "m_metadata": dict(metadata) if metadata else None,
    }
    for i, (meter, amount) in enumerate(amounts.items()):
        params[f"m_meter_{i}"] = meter
        params[f"m_amount_{i}"] = amount
    return params


async def charge_at_once(
    conn: AsyncConnection,
    key_id: str,
    amounts: Mapping[str, int],
    metadata: Mapping[str, Any] | None,
    now: datetime,
) -> Sequence[AnyRow]:
    """Run :func:`charge_statement`: one row per budget debited (its row after the
    charge, in id order) or a single row without budget columns; each row has
    ``ok`` (the charge was made) and the key's ``key_org_id`` and
    ``key_project_id`` (NULL: the key was not live)."""
    stmt = charge_statement(len(amounts))
    rows = (await conn.execute(stmt, charge_params(key_id, amounts, metadata, now))).all()
    return sorted(rows, key=lambda row: row.id or "")


@lru_cache(maxsize=HOT_CACHE)
def period_starts(today: date) -> tuple[datetime, datetime, list[datetime]]:
    """The start of today's day and week, and of the month for each anchor day 1-31
    (index ``anchor - 1``): every period start a budget can have today."""
    now = datetime(today.year, today.month, today.day, tzinfo=UTC)
    months = [periods.start(periods.Period.MONTH, now, anchor) for anchor in range(1, 32)]
    return (
        periods.start(periods.Period.DAY, now),
        periods.start(periods.Period.WEEK, now),
        months,
    )


def _current_start() -> Any:
    """The start of each budget's current period, from the binds of :func:`charge_params`:
    ``keycap._rules.periods.start`` for the row's period and anchor day."""
    b = budgets.c
    months = bindparam("m_months", type_=ARRAY(DateTime(timezone=True)))
    return case(
        (b.period == "lifetime", literal(periods.EPOCH, UTCDateTime())),
        (b.period == "day", bindparam("m_day", type_=UTCDateTime())),
        (b.period == "week", bindparam("m_week", type_=UTCDateTime())),
        else_=Grouping(months)[func.coalesce(b.anchor_day, 1)],
    )


@lru_cache(maxsize=32)
def charge_statement(meter_count: int, lock_pass: bool = True) -> Any:
    """The charge of ``meter_count`` meters as one statement. ``lock_pass=False``
    leaves the budgets unlocked until their UPDATE: the over-spending version,
    kept for the tests' negative control only."""
    k, b = keys.c, budgets.c
    meters = [bindparam(f"m_meter_{i}", type_=b.meter.type) for i in range(meter_count)]
    amounts = [int_param(f"m_amount_{i}") for i in range(meter_count)]

    key_q = select(k.id, k.org_id, k.project_id).where(k.id == KEY_ID, *key_is_live_now(NOW))
    key = key_q.with_for_update(key_share=True).cte("hot_key")

    # The lock pass: the rows as they are now, each with its current period's start.
    budgets_q = (
        select(
            b.id,
            b.meter,
            b.used_micros,
            b.credit_micros,
            b.held_micros,
            b.limit_micros,
            b.period_start,
            _current_start().label("current_start"),
        )
        .select_from(
            budgets.join(key, applies_to(budgets, key.c.id, key.c.org_id, key.c.project_id))
        )
        .where(b.meter.in_(meters))
        .order_by(b.id)
    )
    if lock_pass:
        budgets_q = budgets_q.with_for_update(key_share=True, of=budgets)
    rows = budgets_q.cte("hot_budgets")

    # What the charge does to each, decided from the locked rows' values only.
    r = rows.c
    new_period = r.period_start < r.current_start
    eff_used = case((new_period, big(0)), else_=r.used_micros)
    eff_credit = case((new_period, big(0)), else_=r.credit_micros)
    amount = case(*((r.meter == meters[i], amounts[i]) for i in range(meter_count)), else_=big(0))
    locked = select(
        r.id,
        r.meter,
        amount.label("amount"),
        eff_used.label("eff_used"),
        eff_credit.label("eff_credit"),
        case((new_period, r.current_start), else_=r.period_start).label("new_start"),
        (eff_used + r.held_micros + amount <= r.limit_micros + eff_credit).label("fits"),
    ).cte("hot_room")

    ok = and_(exists(select(key.c.id)), ~exists(select(locked.c.id).where(~locked.c.fits))).label(
        "ok"
    )
    decision = select(ok).cte("hot_ok")
    decided = select(decision.c.ok).scalar_subquery()

    debited = (
        update(budgets)
        .where(b.id == locked.c.id, decided)
        .values(
            used_micros=locked.c.eff_used + locked.c.amount,
            credit_micros=locked.c.eff_credit,
            period_start=locked.c.new_start,
        )
        .returning(*budgets.c)
        .cte("hot_debited")
    )
    used = (
        update(keys)
        .where(k.id == KEY_ID, decided)
        .values(last_used_at=NOW)
        .returning(k.id)
        .cte("hot_used")
    )
    entries = insert(ledger).from_select(
        _LEDGER_COLUMNS, _entries(key, locked, debited, decision, meters, amounts)
    )
    written = entries.returning(ledger.c.id).cte("hot_ledger")

    return (
        select(
            decision.c.ok,
            key.c.org_id.label("key_org_id"),
            key.c.project_id.label("key_project_id"),
            *(debited.c[c.name] for c in budgets.c),
        )
        .select_from(decision.outerjoin(key, true()).outerjoin(debited, true()))
        .add_cte(used, written)
    )


_LEDGER_COLUMNS = [
    "org_id",
    "project_id",
    "key_id",
    "budget_id",
    "hold_id",
    "meter",
    "kind",
    "amount_micros",
    "delta_used",
    "delta_held",
    "period_start",
    "is_primary",
    "idempotency_key",
    "metadata",
    "created_at",
]


def _entries(
    key: Any, locked: Any, debited: Any, decision: Any, meters: list[Any], amounts: list[Any]
) -> Any:
    """``keycap._rules.movements.charges`` as a SELECT: the ledger's entries of the charge."""
    metadata = bindparam("m_metadata", type_=JSONText())
    none = null()
    first = func.row_number().over(partition_by=debited.c.meter, order_by=debited.c.id) == 1
    amount = case(
        *((debited.c.meter == meters[i], amounts[i]) for i in range(len(meters))), else_=big(0)
    )
    budgeted = select(
        debited.c.org_id,
        key.c.project_id,
        KEY_ID,
        debited.c.id,
        none,
        debited.c.meter,
        literal("charge"),
        amount,
        amount,
        big(0),
        debited.c.period_start,
        first,
        none,
        case((first, metadata), else_=null()),
        NOW,
    ).select_from(debited.join(key, true()))
    unbudgeted = [
        select(
            key.c.org_id,
            key.c.project_id,
            KEY_ID,
            none,
            none,
            meters[i],
            literal("charge"),
            amounts[i],
            amounts[i],
            big(0),
            null(),
            true(),
            none,
            metadata,
            NOW,
        )
        .select_from(key.join(decision, decision.c.ok))
        .where(~exists(select(locked.c.id).where(locked.c.meter == meters[i])))
        for i in range(len(meters))
    ]
    return union_all(budgeted, *unbudgeted)
