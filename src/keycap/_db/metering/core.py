"""The pieces every metering statement shares: retries, bind parameters, the
single- and multi-row UPDATE runners, subjects and the key reference.

Why the statements are safe is in ``keycap._db.metering``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    bindparam,
    exists,
    literal,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.engine import Database
from keycap._db.queries import (
    AnyRow,
    key_is_live_now,
)
from keycap._db.schema import (
    budgets,
    holds,
    keys,
    organizations,
    projects,
)
from keycap._errors import DatabaseError, NotFoundError
from keycap._rules import ids

T = TypeVar("T")
ATTEMPTS = 8

SCOPES = {ids.KEY: "key", ids.PROJECT: "project", ids.ORG: "organization"}


def scope_of(subject_id: str) -> str:
    return SCOPES[subject_id.split("_", 1)[0]]


# --- retries --------------------------------------------------------------------------


def is_transient(error: BaseException) -> bool:
    """A deadlock, serialization failure or busy database: the unit may simply be rerun."""
    cause = error.__cause__ if isinstance(error, DatabaseError) else error
    orig = getattr(cause, "orig", cause)
    if getattr(orig, "sqlstate", None) in ("40P01", "40001"):
        return True
    args = getattr(orig, "args", ())
    if args and args[0] in (1213, 1205):  # MySQL deadlock, lock wait timeout
        return True
    return "database is locked" in str(orig)


async def retrying(unit: Callable[[], Awaitable[T]]) -> T:
    """Run ``unit`` (one whole transaction) again after a transient conflict."""
    for attempt in range(ATTEMPTS):
        try:
            return await unit()
        except DatabaseError as error:
            if attempt == ATTEMPTS - 1 or not is_transient(error):
                raise
            await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))  # noqa: S311 - jitter
    raise AssertionError("unreachable")


def big(value: int) -> Any:
    """An integer bound as BIGINT. PostgreSQL types a bind by its context: in
    ``CASE ... THEN 0 ... END + :amount`` the literal 0 would make ``:amount`` an
    int32 and 6e10 micro-units would not fit. Every integer entering a metering
    statement goes through here."""
    return literal(value, BigInteger())


# --- the bind parameters of the cached statements -------------------------------------

KEY_ID = bindparam("m_key_id", type_=keys.c.id.type)
ORG_ID = bindparam("m_org_id", type_=keys.c.org_id.type)
PROJECT_ID = bindparam("m_project_id", type_=keys.c.project_id.type)
NOW = bindparam("m_now", type_=keys.c.last_used_at.type)
BUDGET_ID = bindparam("m_budget_id", type_=budgets.c.id.type)
HOLD_ID = bindparam("m_hold_id", type_=holds.c.id.type)


def int_param(name: str) -> Any:
    """A per-call integer, bound as BIGINT (see :func:`big`)."""
    return bindparam(name, type_=BigInteger())


def key_params(key: KeyRef) -> dict[str, Any]:
    return {"m_key_id": key.id, "m_org_id": key.org_id, "m_project_id": key.project_id}


def applies_to_key(table: Any) -> ColumnElement[bool]:
    """The row belongs to the key, its project or its organization (the parameters
    of :func:`key_params`; a key without a project binds NULL, which matches nothing)."""
    return table.c.subject_id.in_([KEY_ID, ORG_ID, PROJECT_ID])  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Changing:
    """A cached UPDATE in both forms :func:`changed_rows` may run: with ``RETURNING``,
    and plain followed by ``reread`` (a SELECT of the same columns and rows)."""

    returning: Any
    plain: Any
    reread: Any


def changing(stmt: Any, reread: Any) -> Changing:
    return Changing(stmt.returning(*reread.selected_columns), stmt, reread)


# --- subjects -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a limit or budget belongs to, with the ids its row carries."""

    subject_id: str
    org_id: str
    project_id: str | None
    key_id: str | None

    @property
    def columns(self) -> dict[str, Any]:
        return {
            "subject_id": self.subject_id,
            "org_id": self.org_id,
            "project_id": self.project_id,
            "key_id": self.key_id,
        }


async def resolve_subject(db: Database, subject_id: str) -> Subject:
    """Raises: NotFoundError."""
    kind = subject_id.split("_", 1)[0]
    async with db.autocommit() as conn:
        if kind == ids.KEY:
            row = (
                await conn.execute(
                    select(keys.c.org_id, keys.c.project_id).where(keys.c.id == subject_id)
                )
            ).first()
            if row is not None:
                return Subject(subject_id, row.org_id, row.project_id, subject_id)
        elif kind == ids.PROJECT:
            org = await conn.scalar(select(projects.c.org_id).where(projects.c.id == subject_id))
            if org is not None:
                return Subject(subject_id, org, subject_id, None)
        elif await conn.scalar(select(organizations.c.id).where(organizations.c.id == subject_id)):
            return Subject(subject_id, subject_id, None, None)
    raise NotFoundError(scope_of(subject_id), subject_id)


async def delete_where(db: Database, table: Any, *conditions: Any) -> int:
    async with db.begin() as conn:
        result = await conn.execute(table.delete().where(*conditions))
    return int(result.rowcount)


async def select_where(db: Database, table: Any, *conditions: Any) -> Sequence[AnyRow]:
    async with db.autocommit() as conn:
        return (await conn.execute(select(table).where(*conditions).order_by(table.c.id))).all()


# --- the key inside a metered transaction ---------------------------------------------


def key_is_live(key_id: Any, now: Any) -> ColumnElement[bool]:
    """The key exists and is not revoked, disabled or expired (re-checked in every debit)."""
    return exists().where(keys.c.id == key_id, *key_is_live_now(now))


async def is_live(conn: AsyncConnection, key_id: str | None, now: datetime) -> bool:
    if key_id is None:
        return False
    return bool(await conn.scalar(_IS_LIVE, {"m_key_id": key_id, "m_now": now}))


_IS_LIVE = select(key_is_live(KEY_ID, NOW))


@dataclass(frozen=True, slots=True)
class KeyRef:
    id: str
    org_id: str
    project_id: str | None


async def changed(
    conn: AsyncConnection, stmt: Changing, params: Mapping[str, Any]
) -> AnyRow | None:
    """Run a single-row UPDATE; the row after it, or None if it changed nothing
    (:func:`changed_rows` for several rows; this one's columns need not include
    ``id``). Without RETURNING (MySQL) the row is read after it, under its lock."""
    if conn.dialect.update_returning:
        return (await conn.execute(stmt.returning, params)).first()
    if (await conn.execute(stmt.plain, params)).rowcount != 1:
        return None
    return (await conn.execute(stmt.reread, params)).one()


async def changed_rows(
    conn: AsyncConnection, stmt: Changing, params: Mapping[str, Any], count: int
) -> list[AnyRow] | None:
    """Run a multi-row UPDATE that must change exactly ``count`` rows; the rows after
    it in id order, or None when it changed fewer (one refused: the caller rolls
    back). PostgreSQL and SQLite return them from the UPDATE itself
    (``RETURNING``); MySQL/MariaDB cannot, so the SELECT runs after it, with the
    same parameters, under the row locks the UPDATE took until commit: both read
    what was written."""
    if conn.dialect.update_returning:
        after = sorted((await conn.execute(stmt.returning, params)).all(), key=by_id)
    elif (await conn.execute(stmt.plain, params)).rowcount == count:
        after = list((await conn.execute(stmt.reread, params)).all())
    else:
        return None
    return after if len(after) == count else None


def by_id(row: AnyRow) -> str:
    return str(row.id)
