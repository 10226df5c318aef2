"""The holds table: money reserved before work whose cost is known only after it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    exists,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.build import HOLD_ID, NOW, AnyRow, contains
from keycap._db.keys import selected_by
from keycap._db.schema import (
    holds,
    keys,
)


async def insert_hold(conn: AsyncConnection, values: Mapping[str, Any]) -> None:
    await conn.execute(_INSERT_HOLD, dict(values))


_INSERT_HOLD = insert(holds)


async def close_hold(
    conn: AsyncConnection, hold_id: str, status: str, now: datetime, **values: Any
) -> bool:
    """Move an open hold to ``status``; only one caller can (the WHERE on status).
    The columns set are the keys of the parameters: status, closed_at, ``values``."""
    params = {"m_hold_id": hold_id, "status": status, "closed_at": now, **values}
    result = await conn.execute(_CLOSE_HOLD, params)
    return bool(result.rowcount == 1)


_CLOSE_HOLD = update(holds).where(holds.c.id == HOLD_ID, holds.c.status == "open")


async def get_hold(conn: AsyncConnection, hold_id: str) -> AnyRow | None:
    return (await conn.execute(_GET_HOLD, {"m_hold_id": hold_id})).first()


_GET_HOLD = select(holds).where(holds.c.id == HOLD_ID)


async def expired_holds(
    conn: AsyncConnection, now: datetime, *, budget_id: str | None = None, limit: int = 1000
) -> Sequence[AnyRow]:
    """Open holds past their expiry (of ``budget_id``, if given): ``id`` and
    ``on_expiry``, in id order."""
    h = holds.c
    stmt = (
        select(h.id, h.on_expiry)
        .where(h.status == "open", h.expires_at <= now)
        .order_by(h.id)
        .limit(limit)
    )
    if budget_id is not None:
        stmt = stmt.where(contains(h.budget_ids, f" {budget_id} ", conn.dialect.name))
    return (await conn.execute(stmt)).all()


async def open_hold_ids(conn: AsyncConnection, column: str, value: str) -> list[str]:
    """Open holds of the keys ``keycap._db.keys.selected_by(column, value)``."""
    h = holds.c
    stmt = (
        select(h.id)
        .join(keys, keys.c.id == h.key_id)
        .where(selected_by(column, value), h.status == "open")
        .order_by(h.id)
    )
    return list((await conn.execute(stmt)).scalars())


def has_expired_holds(budget_id: Any, dialect: str) -> ColumnElement[bool]:
    """Open holds past their expiry at ``m_now`` still hold part of the budget
    ``budget_id`` (a column): a refusal by it frees them before it is final."""
    h = holds.c
    on_budget = contains(h.budget_ids, literal(" ") + budget_id + literal(" "), dialect)
    return exists(select(h.id).where(h.status == "open", h.expires_at <= NOW, on_budget))
