"""Statements of imported keys (``keycap_key_imports``): find the candidates for
a presented plaintext by its lookups, and re-digest one after its first success."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.build import AnyRow
from keycap._db.schema import key_imports, keys
from keycap._rules.imports import IMPORTED_PEPPER

_i = key_imports.c


async def insert_import(conn: AsyncConnection, values: Mapping[str, Any]) -> None:
    await conn.execute(insert(key_imports).values(**values))


async def candidates(conn: AsyncConnection, lookups: Sequence[str]) -> Sequence[AnyRow]:
    """The imported keys any of ``lookups`` finds (by index), oldest first, with
    their keys' digests (keycap's, once upgraded)."""
    stmt = (
        select(
            _i.key_id, _i.scheme, _i.foreign_hash, _i.upgraded_at, keys.c.digest, keys.c.pepper_id
        )
        .join(keys, keys.c.id == _i.key_id)
        .where(_i.lookup.in_(lookups))
        .order_by(_i.imported_at, _i.key_id)
    )
    return (await conn.execute(stmt)).all()


async def existing_lookups(conn: AsyncConnection, scheme: str) -> list[str]:
    """Every lookup of the keys imported by ``scheme`` (a re-run of an import skips them)."""
    stmt = select(_i.lookup).where(_i.scheme == scheme)
    return list((await conn.execute(stmt)).scalars())


async def upgrade(
    conn: AsyncConnection, key_id: str, digest: str, pepper_id: str, now: datetime
) -> None:
    """Give the key keycap's own digest, once: conditional on the placeholder, so
    two first uses at once both leave the same digest; drop the foreign hash."""
    await conn.execute(
        update(keys)
        .where(keys.c.id == key_id, keys.c.pepper_id == IMPORTED_PEPPER)
        .values(digest=digest, pepper_id=pepper_id, updated_at=now)
    )
    await conn.execute(
        update(key_imports)
        .where(_i.key_id == key_id, _i.upgraded_at.is_(None))
        .values(foreign_hash=None, upgraded_at=now)
    )
