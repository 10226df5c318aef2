"""Organizations, projects, products, their links, and the subjects (key, project,
organization) that rate limits and budgets belong to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, Table, delete, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.build import KEY_ID, AnyRow, Changing, KeyRef, changed, changing
from keycap._db.schema import (
    identities,
    keys,
    organizations,
    products,
    project_products,
    projects,
)
from keycap._errors import InvalidArgumentError
from keycap._rules import ids
from keycap._rules import scopes as scope_rules

#: The table of each kind of named resource.
TABLES: Mapping[str, Table] = {
    ids.ORG: organizations,
    ids.PROJECT: projects,
    ids.PRODUCT: products,
}

_SCOPES = {
    ids.KEY: "key",
    ids.IDENTITY: "identity",
    ids.PROJECT: "project",
    ids.ORG: "organization",
}


def scope_of(subject_id: str) -> str:
    """``"key"``, ``"identity"``, ``"project"`` or ``"organization"``: what a subject
    id names."""
    return _SCOPES[subject_id.split("_", 1)[0]]


# --- organizations, projects, products ------------------------------------------------


async def insert_named(conn: AsyncConnection, table: Table, values: Mapping[str, Any]) -> None:
    """Insert an organization, project or product. The unique constraint on
    (parent, name) decides a race between two creators (Conflict for the loser)."""
    await conn.execute(insert(table).values(**values))


async def find_named(
    conn: AsyncConnection, table: Table, name: str, org_id: str | None
) -> AnyRow | None:
    stmt = select(table).where(table.c.name == name)
    if org_id is not None:
        stmt = stmt.where(table.c.org_id == org_id)
    return (await conn.execute(stmt)).first()


async def get_by_id(conn: AsyncConnection, table: Table, id_: str) -> AnyRow | None:
    return (await conn.execute(select(table).where(table.c.id == id_))).first()


async def list_rows(
    conn: AsyncConnection,
    table: Table,
    org_id: str | None,
    limit: int,
    offset: int,
    newest_first: bool = False,
) -> Sequence[AnyRow]:
    c = table.c
    order = (c.created_at.desc(), c.id.desc()) if newest_first else (c.created_at, c.id)
    stmt = select(table).order_by(*order).limit(limit).offset(offset)
    if org_id is not None:
        stmt = stmt.where(table.c.org_id == org_id)
    return (await conn.execute(stmt)).all()


async def delete_by_id(conn: AsyncConnection, table: Table, id_: str) -> bool:
    """Delete one row; ON DELETE CASCADE removes what hangs under it on every database."""
    result = await conn.execute(delete(table).where(table.c.id == id_))
    return bool(result.rowcount == 1)


async def owned_by(conn: AsyncConnection, table: Table, id_: str, org_id: str) -> bool:
    """The project or product ``id_`` exists in organization ``org_id``."""
    found = await conn.scalar(select(table.c.id).where(table.c.id == id_, table.c.org_id == org_id))
    return found is not None


async def check_scopes(conn: AsyncConnection, org_id: str, granted: Sequence[str]) -> None:
    """Refuse ``granted`` if organization ``org_id`` fixes its allowed scopes and one
    of them is not covered by those (``chat:*`` allowed covers ``chat:write``).

    Raises:
        InvalidArgumentError: on ``scopes``, naming what is not allowed.
    """
    if not granted:
        return
    stored = await conn.scalar(
        select(organizations.c.allowed_scopes).where(organizations.c.id == org_id)
    )
    if stored is None:
        return
    unknown = scope_rules.missing(scope_rules.decode(stored), granted)
    if unknown:
        raise InvalidArgumentError(
            "scopes", "not allowed in the organization: " + ", ".join(unknown)
        )


# --- project-product links ------------------------------------------------------------


async def insert_link(
    conn: AsyncConnection, org_id: str, project_id: str, product_id: str, now: datetime
) -> None:
    """Link a product to a project. The composite foreign keys (org_id, project_id)
    and (org_id, product_id) make a cross-organization link impossible even if the
    caller is wrong; a second link of the same pair is a Conflict."""
    await conn.execute(
        insert(project_products).values(
            org_id=org_id, project_id=project_id, product_id=product_id, created_at=now
        )
    )


async def is_linked(conn: AsyncConnection, org_id: str, project_id: str, product_id: str) -> bool:
    found = await conn.scalar(
        select(literal(1)).where(
            project_products.c.org_id == org_id,
            project_products.c.project_id == project_id,
            project_products.c.product_id == product_id,
        )
    )
    return found is not None


async def delete_link(conn: AsyncConnection, project_id: str, product_id: str) -> bool:
    result = await conn.execute(
        delete(project_products).where(
            project_products.c.project_id == project_id,
            project_products.c.product_id == product_id,
        )
    )
    return bool(result.rowcount == 1)


# --- subjects -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a limit or budget belongs to, with the ids its row carries."""

    subject_id: str
    org_id: str
    project_id: str | None
    key_id: str | None
    identity_id: str | None = None

    @property
    def columns(self) -> dict[str, Any]:
        return {
            "subject_id": self.subject_id,
            "org_id": self.org_id,
            "project_id": self.project_id,
            "key_id": self.key_id,
            "identity_id": self.identity_id,
        }


async def find_subject(conn: AsyncConnection, subject_id: str) -> Subject | None:
    """The key, identity, project or organization ``subject_id`` with its parents'
    ids; None if there is none."""
    kind = subject_id.split("_", 1)[0]
    if kind == ids.KEY:
        row = (
            await conn.execute(
                select(keys.c.org_id, keys.c.project_id).where(keys.c.id == subject_id)
            )
        ).first()
        if row is not None:
            return Subject(subject_id, row.org_id, row.project_id, subject_id)
    elif kind == ids.IDENTITY:
        org = await conn.scalar(select(identities.c.org_id).where(identities.c.id == subject_id))
        if org is not None:
            return Subject(subject_id, org, None, None, subject_id)
    elif kind == ids.PROJECT:
        org = await conn.scalar(select(projects.c.org_id).where(projects.c.id == subject_id))
        if org is not None:
            return Subject(subject_id, org, subject_id, None)
    elif await conn.scalar(select(organizations.c.id).where(organizations.c.id == subject_id)):
        return Subject(subject_id, subject_id, None, None)
    return None


# --- identities -------------------------------------------------------------------------


async def lock_live_identity(conn: AsyncConnection, identity_id: str) -> KeyRef | None:
    """An identity metered without a key, in its transaction: take its row lock if
    it is not disabled (a no-op write, which also starts SQLite's write
    transaction before anything is read, as a key's lock does), as a ``KeyRef``
    whose limits and budgets are the identity's and its organization's."""
    row = await lock_identity_row(conn, identity_id)
    return None if row is None else KeyRef.of_identity(identity_id, row.org_id)


async def lock_identity_row(conn: AsyncConnection, identity_id: str) -> AnyRow | None:
    """:func:`lock_live_identity`, returning the identity's row."""
    return await changed(conn, _lock_identity(), {"m_key_id": identity_id})


@lru_cache(maxsize=1)
def _lock_identity() -> Changing:
    i = identities.c
    stmt = (
        update(identities)
        .where(i.id == KEY_ID, i.disabled_at.is_(None))
        .values(updated_at=i.updated_at)
    )
    return changing(stmt, select(identities).where(i.id == KEY_ID))


async def insert_identity(conn: AsyncConnection, values: Mapping[str, Any]) -> None:
    """The unique (org_id, external_id) decides a race between two creators."""
    await conn.execute(insert(identities).values(**values))


async def find_identity(conn: AsyncConnection, org_id: str, external_id: str) -> AnyRow | None:
    i = identities.c
    stmt = select(identities).where(i.org_id == org_id, i.external_id == external_id)
    return (await conn.execute(stmt)).first()


async def list_identities(
    conn: AsyncConnection, org_id: str, limit: int, offset: int
) -> Sequence[AnyRow]:
    """Newest first."""
    i = identities.c
    stmt = (
        select(identities)
        .where(i.org_id == org_id)
        .order_by(i.created_at.desc(), i.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return (await conn.execute(stmt)).all()


async def update_identity(
    conn: AsyncConnection,
    identity_id: str,
    values: Mapping[str, Any],
    only_if: ColumnElement[bool] | None = None,
) -> None:
    """Apply ``values`` when ``only_if`` holds (as ``keys.update_key`` does)."""
    stmt = update(identities).where(identities.c.id == identity_id).values(**values)
    if only_if is not None:
        stmt = stmt.where(only_if)
    await conn.execute(stmt)
