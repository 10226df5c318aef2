"""The append-only ledger: its rows, their insert, and usage reports from it."""

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

from keycap._db.engine import Database
from keycap._db.queries import (
    AnyRow,
)
from keycap._db.schema import (
    ledger,
)

# --- ledger ---------------------------------------------------------------------------


def ledger_row(
    budget: AnyRow | None,
    kind: str,
    amount: int,
    delta_used: int,
    delta_held: int,
    primary: bool,
    now: datetime,
    *,
    key_id: str | None,
    meter: str | None = None,
    org_id: str | None = None,
    project_id: str | None = None,
    hold_id: str | None = None,
    idempotency_key: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "org_id": budget.org_id if budget is not None else org_id,
        "project_id": project_id,
        "key_id": key_id,
        "budget_id": budget.id if budget is not None else None,
        "hold_id": hold_id,
        "meter": budget.meter if budget is not None else meter,
        "kind": kind,
        "amount_micros": amount,
        "delta_used": delta_used,
        "delta_held": delta_held,
        "period_start": budget.period_start if budget is not None else None,
        "is_primary": primary,
        "idempotency_key": idempotency_key,
        "metadata": dict(metadata) if (metadata and primary) else None,
        "created_at": now,
    }


async def insert_ledger(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(INSERT_LEDGER, rows)


INSERT_LEDGER = insert(ledger)


# --- reporting ------------------------------------------------------------------------


async def usage(
    db: Database,
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
    if db.dialect == "postgresql":
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
    async with db.autocommit() as conn:
        return (await conn.execute(stmt)).all()
