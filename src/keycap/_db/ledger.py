"""The append-only ledger: its entries' insert (``keycap._rules.movements`` builds
them), and usage reports from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    String,
    cast,
    func,
    insert,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.build import AnyRow
from keycap._db.schema import (
    ledger,
)


async def insert_ledger(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
    if rows:
        await conn.execute(INSERT_LEDGER, list(rows))


INSERT_LEDGER = insert(ledger)

#: An entry's columns, in the order a one-statement (or one-block) call's
#: ``INSERT ... SELECT`` lists them: every column but the id.
ENTRY_COLUMNS = [column.name for column in ledger.c if column.name != "id"]


# --- reporting ------------------------------------------------------------------------


async def usage(
    conn: AsyncConnection,
    *,
    key_id: str | None,
    project_id: str | None,
    org_id: str | None,
    since: datetime,
    until: datetime,
    monthly: bool,
) -> Sequence[AnyRow]:
    """Totals of what was charged, per day or month and meter, from primary ledger rows."""
    lg = ledger.c
    width = 7 if monthly else 10
    if conn.dialect.name == "postgresql":
        bucket: Any = func.to_char(
            func.timezone("UTC", lg.created_at), "YYYY-MM" if monthly else "YYYY-MM-DD"
        )
    else:  # naive UTC stored as text (SQLite) or DATETIME (MySQL): the first characters
        bucket = func.substr(cast(lg.created_at, String(32)), 1, width)
    bucket = bucket.label("bucket")
    stmt = (
        select(
            bucket,
            lg.meter,
            func.sum(lg.amount_micros).label("micros"),
            func.count().label("charges"),
        )
        .where(
            lg.is_primary.is_(True),
            lg.kind.in_(("charge", "settle")),
            lg.created_at >= since,
            lg.created_at < until,
        )
        .group_by(bucket, lg.meter)
        .order_by(bucket, lg.meter)
    )
    for column, value in ((lg.key_id, key_id), (lg.project_id, project_id), (lg.org_id, org_id)):
        if value is not None:
            stmt = stmt.where(column == value)
    return (await conn.execute(stmt)).all()
