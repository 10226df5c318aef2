"""The audit log's statements: one row per administrative change, and pages of them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.build import AnyRow
from keycap._db.schema import audit


async def insert_entry(conn: AsyncConnection, values: Mapping[str, Any]) -> None:
    await conn.execute(insert(audit).values(**values))


async def entries(
    conn: AsyncConnection,
    org_id: str,
    subject_id: str | None,
    action: str | None,
    before_id: int | None,
    limit: int,
) -> Sequence[AnyRow]:
    """The organization's entries, newest first; only those older than ``before_id``
    when it is given (the next page)."""
    a = audit.c
    stmt = select(audit).where(a.org_id == org_id)
    if subject_id is not None:
        stmt = stmt.where(a.subject_id == subject_id)
    if action is not None:
        stmt = stmt.where(a.action == action)
    if before_id is not None:
        stmt = stmt.where(a.id < before_id)
    found = await conn.execute(stmt.order_by(a.id.desc()).limit(limit))
    return found.all()
