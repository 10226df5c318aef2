"""Holds and idempotency: the rows that make reserve/settle/release and
retried calls exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import (
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.engine import Database
from keycap._db.metering.core import (
    HOLD_ID,
)
from keycap._db.queries import (
    AnyRow,
    contains,
)
from keycap._db.schema import (
    holds,
    keys,
    operations,
)
from keycap._rules import ids

# --- holds ----------------------------------------------------------------------------


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


async def get_hold(db: Database, hold_id: str) -> AnyRow | None:
    async with db.autocommit() as conn:
        return (await conn.execute(_GET_HOLD, {"m_hold_id": hold_id})).first()


_GET_HOLD = select(holds).where(holds.c.id == HOLD_ID)


async def expired_hold_ids(
    db: Database, now: datetime, *, budget_id: str | None = None, limit: int = 1000
) -> list[str]:
    h = holds.c
    stmt = select(h.id).where(h.status == "open", h.expires_at <= now).order_by(h.id).limit(limit)
    if budget_id is not None:
        stmt = stmt.where(contains(h.budget_ids, f" {budget_id} ", db.dialect))
    async with db.autocommit() as conn:
        return list((await conn.execute(stmt)).scalars())


async def open_hold_ids(db: Database, column: str, value: str) -> list[str]:
    """Open holds of the keys whose ``column`` (id, project_id, product_id) is ``value``."""
    h = holds.c
    stmt = (
        select(h.id)
        .join(keys, keys.c.id == h.key_id)
        .where(keys.c[column] == value, h.status == "open")
        .order_by(h.id)
    )
    async with db.autocommit() as conn:
        return list((await conn.execute(stmt)).scalars())


# --- idempotency ----------------------------------------------------------------------


async def claim_operation(
    conn: AsyncConnection,
    *,
    org_id: str,
    scope: str,
    kind: str,
    idempotency_key: str,
    now: datetime,
) -> str:
    """Insert the operation's row first thing in its transaction. A duplicate waits on
    the unique index until the first commits or rolls back, then fails (Conflict) or
    goes ahead: never both."""
    op_id = ids.new_id("op")
    values = {
        "id": op_id,
        "org_id": org_id,
        "scope": scope,
        "kind": kind,
        "idempotency_key": idempotency_key,
        "result": None,
        "created_at": now,
    }
    await conn.execute(_INSERT_OPERATION, values)
    return op_id


_INSERT_OPERATION = insert(operations)


async def store_result(conn: AsyncConnection, op_id: str, result: dict[str, Any]) -> None:
    await conn.execute(_STORE_RESULT, {"m_op_id": op_id, "result": result})


_STORE_RESULT = update(operations).where(
    operations.c.id == bindparam("m_op_id", type_=operations.c.id.type)
)


async def stored_result(
    db: Database, *, scope: str, kind: str, idempotency_key: str
) -> dict[str, Any] | None:
    params = {"m_scope": scope, "m_kind": kind, "m_idempotency_key": idempotency_key}
    async with db.autocommit() as conn:
        row = (await conn.execute(_STORED_RESULT, params)).first()
    return None if row is None else row.result


_STORED_RESULT = select(operations.c.result).where(
    operations.c.scope == bindparam("m_scope", type_=operations.c.scope.type),
    operations.c.kind == bindparam("m_kind", type_=operations.c.kind.type),
    operations.c.idempotency_key
    == bindparam("m_idempotency_key", type_=operations.c.idempotency_key.type),
)
