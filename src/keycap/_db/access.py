"""Statements of access requests (``keycap_access_requests``). Every change of
status is one conditional UPDATE on the status the change starts from, so two
owners deciding at once, or two claims of the same request, cannot both win."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.build import AnyRow
from keycap._db.schema import access_requests

_r = access_requests.c


async def insert_request(conn: AsyncConnection, values: Mapping[str, Any]) -> None:
    await conn.execute(insert(access_requests).values(**values))


async def get_request(conn: AsyncConnection, request_id: str) -> AnyRow | None:
    return (await conn.execute(select(access_requests).where(_r.id == request_id))).first()


def status_filter(status: str, now: datetime) -> ColumnElement[bool]:
    """The SQL twin of ``keycap._rules.access.status_at``."""
    open_ = _r.status.in_(("pending", "approved"))
    if status == "expired":
        return and_(open_, _r.expires_at <= now)
    if status in ("pending", "approved"):
        return and_(_r.status == status, _r.expires_at > now)
    return _r.status == status


async def list_requests(
    conn: AsyncConnection,
    org_id: str,
    status: str | None,
    now: datetime,
    limit: int,
    offset: int,
) -> Sequence[AnyRow]:
    """Newest first."""
    stmt = select(access_requests).where(_r.org_id == org_id)
    if status is not None:
        stmt = stmt.where(status_filter(status, now))
    stmt = stmt.order_by(_r.created_at.desc(), _r.id.desc()).limit(limit).offset(offset)
    return (await conn.execute(stmt)).all()


async def move(
    conn: AsyncConnection,
    request_id: str,
    start: str,
    values: Mapping[str, Any],
    now: datetime,
) -> bool:
    """Move the request from status ``start`` (not expired at ``now``) with
    ``values``; whether it moved."""
    stmt = (
        update(access_requests)
        .where(_r.id == request_id, _r.status == start, _r.expires_at > now)
        .values(**values)
    )
    return (await conn.execute(stmt)).rowcount == 1
