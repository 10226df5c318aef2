"""The budgets table: administration, top-ups, and debits (every applicable
budget in one UPDATE, or one budget at a time for holds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, case, delete, insert, select, true, update
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.build import (
    BUDGET_ID,
    KEY_ID,
    NOW,
    AnyRow,
    Changing,
    KeyRef,
    big,
    changed,
    changed_rows,
    changing,
    int_param,
    key_params,
)
from keycap._db.grant import applies_to_key, key_is_live
from keycap._db.schema import budgets
from keycap._db.tenancy import Subject
from keycap._rules import budgets as budget_rules
from keycap._rules import ids, periods
from keycap._rules.money import MAX_MICROS


def new_budget_row(
    subject: Subject, spec: budget_rules.BudgetSpec, now: datetime
) -> dict[str, Any]:
    """A budget's row as created (on its own, or with its key in create_key)."""
    return {
        "id": ids.new_id(ids.BUDGET),
        **subject.columns,
        "meter": spec.meter,
        "period": spec.period.value,
        "anchor_day": spec.anchor_day,
        "limit_micros": spec.limit_micros,
        "credit_micros": 0,
        "used_micros": 0,
        "held_micros": 0,
        "period_start": periods.start(spec.period, now, spec.anchor_day),
        "thresholds": budget_rules.encode_thresholds(spec.thresholds),
        "created_at": now,
        "updated_at": now,
    }


async def insert_budgets(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
    """A second budget of the same meter and period on one subject is a Conflict."""
    if rows:
        await conn.execute(insert(budgets), list(rows))


async def change_budget(conn: AsyncConnection, row: Mapping[str, Any], now: datetime) -> bool:
    """Give the budget of ``row``'s subject, meter and period ``row``'s limit, anchor
    and thresholds, keeping what was used and held. False, and nothing written, when
    the new limit plus the budget's credit would pass ``MAX_MICROS``."""
    b = budgets.c
    result = await conn.execute(
        update(budgets)
        .where(*_same_budget(row), big(row["limit_micros"]) + b.credit_micros <= big(MAX_MICROS))
        .values(
            limit_micros=row["limit_micros"],
            anchor_day=row["anchor_day"],
            thresholds=row["thresholds"],
            updated_at=now,
        )
    )
    return bool(result.rowcount == 1)


async def find_budget(conn: AsyncConnection, row: Mapping[str, Any]) -> AnyRow | None:
    """The budget of ``row``'s subject, meter and period."""
    return (await conn.execute(select(budgets).where(*_same_budget(row)))).first()


def _same_budget(row: Mapping[str, Any]) -> tuple[Any, ...]:
    b = budgets.c
    return (b.subject_id == row["subject_id"], b.meter == row["meter"], b.period == row["period"])


async def get_budget(conn: AsyncConnection, budget_id: str) -> AnyRow | None:
    return (await conn.execute(select(budgets).where(budgets.c.id == budget_id))).first()


async def budgets_of(conn: AsyncConnection, subject_id: str) -> Sequence[AnyRow]:
    """The budgets attached directly to a key, project or organization, in id order."""
    b = budgets.c
    return (
        await conn.execute(select(budgets).where(b.subject_id == subject_id).order_by(b.id))
    ).all()


async def delete_budget(conn: AsyncConnection, budget_id: str) -> bool:
    result = await conn.execute(delete(budgets).where(budgets.c.id == budget_id))
    return bool(result.rowcount)


def rollover(start: Any, b: Any = budgets.c) -> tuple[Any, Any, Any]:
    """(used, credit, period_start) as they are once the period starting at ``start``
    applies, over the budget columns ``b`` (the table's, or a CTE's)."""
    new_period = b.period_start < start
    return (
        case((new_period, big(0)), else_=b.used_micros),
        case((new_period, big(0)), else_=b.credit_micros),
        case((new_period, start), else_=b.period_start),
    )


def _current_start(row: AnyRow, now: datetime) -> datetime:
    return periods.start(periods.Period(row.period), now, row.anchor_day)


async def add_credit(
    conn: AsyncConnection, row: AnyRow, micros: int, now: datetime
) -> AnyRow | None:
    """Top the budget ``row`` up by ``micros`` for its current period (rolling the
    period over first if it has passed); the row after it. None, and nothing
    written, when its limit plus credit would pass ``keycap._rules.money.MAX_MICROS``:
    credits add up, and every sum keycap computes must stay inside 64 bits."""
    b = budgets.c
    used, credit, period_start = rollover(_current_start(row, now))
    result = await conn.execute(
        update(budgets)
        .where(b.id == row.id, b.limit_micros + credit + big(micros) <= big(MAX_MICROS))
        .ordered_values(
            (b.used_micros, used),
            (b.credit_micros, credit + big(micros)),
            (b.period_start, period_start),
            (b.updated_at, now),
        )
    )
    if result.rowcount != 1:
        return None
    return (await conn.execute(select(budgets).where(b.id == row.id))).one()


# --- budgets --------------------------------------------------------------------------


async def applicable_budgets(
    conn: AsyncConnection, key: KeyRef, meters: Sequence[str]
) -> Sequence[AnyRow]:
    """The budgets of ``meters`` that apply to the key (its own, its project's, its
    organization's), in id order."""
    params = {**key_params(key), "m_meters": list(meters)}
    return (await conn.execute(_budgets_of(), params)).all()


async def every_applicable_budget(conn: AsyncConnection, key: KeyRef) -> Sequence[AnyRow]:
    """The budgets of every meter that apply to the key, in id order."""
    query = select(budgets).where(applies_to_key(budgets)).order_by(budgets.c.id)
    return (await conn.execute(query, key_params(key))).all()


@lru_cache(maxsize=1)
def _budgets_of() -> Any:
    meters = budgets.c.meter.in_(bindparam("m_meters", expanding=True))
    return select(budgets).where(applies_to_key(budgets), meters).order_by(budgets.c.id)


async def debit_all(
    conn: AsyncConnection,
    rows: Sequence[AnyRow],
    amounts: Mapping[str, int],
    now: datetime,
    *,
    key_id: str | None,
    hold: bool = False,
) -> list[AnyRow] | None:
    """Charge (or, with ``hold``, hold) ``amounts[meter]`` on every budget in ``rows``,
    in one UPDATE, each after its own period rollover; the rows after it, in id order.

    Each row's WHERE is its own limit (``used + held + amount <= limit + credit``)
    and the key's liveness (``key_id`` None: an identity charged without a key,
    whose row lock the transaction holds, its state checked under it), so a
    budget without room is simply not updated:
    fewer rows changed than given means one refused, and None is returned (the
    caller rolls back, so nothing is written). The period start and amount of
    each row are chosen by a CASE on its id.
    """
    if not rows:
        return []
    params: dict[str, Any] = {"m_key_id": key_id, "m_now": now}
    for i, row in enumerate(rows):
        params[f"m_budget_{i}"] = row.id
        params[f"m_start_{i}"] = _current_start(row, now)
        params[f"m_amount_{i}"] = amounts[row.meter]
    stmt = _debit_all(len(rows), hold, key_id is not None)
    return await changed_rows(conn, stmt, params, len(rows))


@lru_cache(maxsize=64)
def _debit_all(count: int, hold: bool, key_live: bool) -> Changing:
    b = budgets.c
    ids_ = [bindparam(f"m_budget_{i}", type_=b.id.type) for i in range(count)]
    at = b.period_start.type
    start = case(
        *((b.id == ids_[i], bindparam(f"m_start_{i}", type_=at)) for i in range(count)),
        else_=b.period_start,
    )
    amount = case(
        *((b.id == ids_[i], int_param(f"m_amount_{i}")) for i in range(count)), else_=big(0)
    )
    eff_used, eff_credit, period_start = rollover(start)
    stmt = (
        update(budgets)
        .where(
            b.id.in_(ids_),
            eff_used + b.held_micros + amount <= b.limit_micros + eff_credit,
            key_is_live(KEY_ID, NOW) if key_live else true(),
        )
        .ordered_values(  # period_start last: the CASEs read the stored one
            (b.used_micros, eff_used if hold else eff_used + amount),
            (b.held_micros, b.held_micros + amount if hold else b.held_micros),
            (b.credit_micros, eff_credit),
            (b.period_start, period_start),
        )
    )
    return changing(stmt, select(budgets).where(b.id.in_(ids_)).order_by(b.id))


async def debit(
    conn: AsyncConnection,
    row: AnyRow,
    *,
    used: int,
    held: int,
    now: datetime,
    key_id: str | None,
    must_fit: bool = True,
) -> AnyRow | None:
    """Add ``used`` to the budget's use and ``held`` to its holds (either may be
    negative: a release), after rolling its period over if it has passed.

    With ``must_fit``, only if ``used + held + both <= limit + credit`` and the
    key is live; returns the row after the change, or None (nothing written).
    """
    params = {
        "m_budget_id": row.id,
        "m_start": _current_start(row, now),
        "m_used": used,
        "m_held": held,
        "m_both": used + held,
        "m_key_id": key_id,
        "m_now": now,
    }
    return await changed(conn, _debit(must_fit, must_fit and key_id is not None), params)


@lru_cache(maxsize=4)
def _debit(must_fit: bool, key_live: bool) -> Changing:
    b = budgets.c
    start = bindparam("m_start", type_=b.period_start.type)
    eff_used, eff_credit, period_start = rollover(start)
    stmt = (
        update(budgets)
        .where(b.id == BUDGET_ID)
        .ordered_values(  # period_start last: the CASEs read the stored one
            (b.used_micros, eff_used + int_param("m_used")),
            (b.held_micros, b.held_micros + int_param("m_held")),
            (b.credit_micros, eff_credit),
            (b.period_start, period_start),
        )
    )
    if must_fit:
        both = int_param("m_both")
        stmt = stmt.where(eff_used + b.held_micros + both <= b.limit_micros + eff_credit)
    if key_live:
        stmt = stmt.where(key_is_live(KEY_ID, NOW))
    return changing(stmt, select(budgets).where(b.id == BUDGET_ID))


async def budgets_by_id(conn: AsyncConnection, budget_ids: Sequence[str]) -> Sequence[AnyRow]:
    if not budget_ids:
        return []
    return (await conn.execute(_BUDGETS_BY_ID, {"m_ids": list(budget_ids)})).all()


_BUDGETS_BY_ID = (
    select(budgets)
    .where(budgets.c.id.in_(bindparam("m_ids", expanding=True)))
    .order_by(budgets.c.id)
)
