"""The operations table: one row per idempotency key, holding the call's result,
so a retried call replays it instead of running again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.build import AnyRow
from keycap._db.schema import operations
from keycap._rules import ids


async def claim_operation(
    conn: AsyncConnection,
    *,
    org_id: str,
    scope: str,
    kind: str,
    idempotency_key: str,
    request_hash: str,
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
        "request_hash": request_hash,
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
    conn: AsyncConnection, *, scope: str, kind: str, idempotency_key: str
) -> AnyRow | None:
    """The operation's ``result`` and ``request_hash``, if it was committed."""
    params = {"m_scope": scope, "m_kind": kind, "m_idempotency_key": idempotency_key}
    return (await conn.execute(_STORED_RESULT, params)).first()


_STORED_RESULT = select(operations.c.result, operations.c.request_hash).where(
    operations.c.scope == bindparam("m_scope", type_=operations.c.scope.type),
    operations.c.kind == bindparam("m_kind", type_=operations.c.kind.type),
    operations.c.idempotency_key
    == bindparam("m_idempotency_key", type_=operations.c.idempotency_key.type),
)
