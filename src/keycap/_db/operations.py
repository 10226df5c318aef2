"""The operations table: one row per idempotency key, holding the call's result,
so a retried call replays it instead of running again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import String, Table, bindparam, insert, literal_column, select, update
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.build import NOW, AnyRow
from keycap._db.hot import HotRow
from keycap._db.schema import budgets, holds, operations
from keycap._db.types import UTCDateTime
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


# --- an idempotent call in one statement (keycap._db.metering, keycap._db.blocks) ---
#
# Its operation's row is written by the statement that makes the call, so its
# result is the call's own facts (``head``, known before it runs) and the rows
# after it of the budgets it moved, as the database writes them in JSON; the
# call's module rebuilds its result from them (``keycap._ops.charges``,
# ``holds``). A result stored by a transaction is the result itself.

o = operations.c
#: The binds of an idempotent call's statement (:func:`claim_params`).
OP_ID = bindparam("m_op_id", type_=o.id.type)
OP_KIND = bindparam("m_op_kind", type_=o.kind.type)
OP_KEY = bindparam("m_op_key", type_=o.idempotency_key.type)
OP_HASH = bindparam("m_op_hash", type_=o.request_hash.type)
#: The stored result's text up to its budgets' rows: ``{"head":{...},"budgets_after":``.
OP_HEAD = bindparam("m_op_head", type_=String())
AFTER = "budgets_after"


def claim_params(
    kind: str, idempotency_key: str, request_hash: str, head: Mapping[str, Any]
) -> dict[str, Any]:
    """The values of the binds above, for a call of ``kind`` whose result is
    rebuilt from ``head`` (JSON-able: its datetimes are written ISO 8601)."""
    text = json.dumps({"head": head}, ensure_ascii=False, separators=(",", ":"), default=_iso)
    return {
        "m_op_id": ids.new_id("op"),
        "m_op_kind": kind,
        "m_op_key": idempotency_key,
        "m_op_hash": request_hash,
        "m_op_head": f'{text[:-1]},"{AFTER}":',
    }


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON: {type(value).__name__}")


def claiming(org_id: Any, scope: Any, result: Any, where: Any = None) -> Any:
    """The INSERT of an idempotent call's operation row (scoped to ``scope``, the
    key's or the hold's id), with ``result`` (an SQL expression: the stored
    text, or NULL until it is written), only ``where`` it holds when given."""
    row = select(OP_ID, org_id, scope, OP_KIND, OP_KEY, OP_HASH, result, NOW)
    columns = [
        o.id,
        o.org_id,
        o.scope,
        o.kind,
        o.idempotency_key,
        o.request_hash,
        o.result,
        o.created_at,
    ]
    return insert(operations).from_select(columns, row if where is None else row.where(where))


def prior(scope: Any) -> Any:
    """The committed operation of the call's idempotency key, if any (scoped to
    ``scope``, the key's id bind)."""
    return select(o.result, o.request_hash).where(
        o.scope == scope, o.kind == OP_KIND, o.idempotency_key == OP_KEY
    )


#: What follows the budgets' rows in the stored result of a call that closes a
#: hold: the hold's row after it (then ``}``).
HOLD_AFTER = ',"hold_after":'


@dataclass(frozen=True, slots=True)
class Prior:
    """What an idempotent call's statement found instead of running: the earlier
    call's stored result and the hash of its parameters."""

    result: dict[str, Any] | None
    request_hash: str | None


def fields(table: Table, columns: Any) -> list[Any]:
    """Each of ``table``'s columns' name and its value in ``columns`` (the table's,
    or a CTE's of its rows), as the arguments of a JSON object function. The
    names are constants: PostgreSQL's ``json_build_object`` takes "any", and a
    bind there has no type to infer."""
    out: list[Any] = []
    for column in table.c:
        out += [literal_column(f"'{column.name}'"), columns[column.name]]
    return out


_AT = UTCDateTime()
_DIALECT = DefaultDialect()  # the conversion is the same on every database


#: The columns of each table a stored result holds rows of that the database
#: writes in JSON as text: its datetimes.
_TIMES = {
    table: frozenset(c.name for c in table.c if isinstance(c.type, UTCDateTime))
    for table in (budgets, holds)
}


def _row(table: Table, written: Mapping[str, Any]) -> HotRow:
    """A row the database wrote in JSON, read as the statement's own rows are
    (its datetimes were written as text)."""
    times = _TIMES[table]
    return HotRow(
        {
            name: _AT.process_result_value(value, _DIALECT) if name in times else value
            for name, value in written.items()
        }
    )


def rows_after(result: Mapping[str, Any]) -> list[HotRow] | None:
    """The budgets' rows after a call stored by its statement (in id order), read
    as the statement's own rows are; None: a result stored by a transaction."""
    if AFTER not in result:
        return None
    return sorted((_row(budgets, row) for row in result[AFTER]), key=lambda row: str(row.id))


def hold_after(result: Mapping[str, Any]) -> HotRow:
    """The hold's row after a call that closed it, stored by its statement."""
    return _row(holds, result["hold_after"])


def head_time(result: Mapping[str, Any], name: str) -> datetime:
    """A datetime of a stored result's ``head`` (as :func:`claim_params` wrote it)."""
    at = _AT.process_result_value(result["head"][name], _DIALECT)
    assert at is not None
    return at
