"""Keys imported from other systems: the import, and finding an imported key from
its plaintext (``keycap._rules.imports``), re-digested on its first success."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db import imports as statements
from keycap._db.engine import Database
from keycap._ops import admin
from keycap._rules import imports
from keycap._rules.budgets import BudgetSpec
from keycap._rules.hashing import PepperRing
from keycap._rules.rate_limits import RateLimit


async def import_key(
    db: Database,
    row: Mapping[str, Any],
    imported: Mapping[str, Any],
    limits: Sequence[RateLimit],
    budget_specs: Sequence[BudgetSpec],
) -> None:
    """Insert the key (as ``create_key`` does, audited as ``key.imported``) and how
    it is found, in one transaction.

    Raises: NotFoundError, InvalidArgumentError (as ``create_key``)."""

    async def unit(conn: AsyncConnection) -> None:
        await admin.insert_key(conn, row, limits, budget_specs, "key.imported")
        await statements.insert_import(conn, imported)

    await db.run_in_transaction(unit)


async def resolve(
    db: Database,
    plaintext: str,
    ring: PepperRing,
    secrets: Mapping[str, str],
    now: datetime,
) -> str | None:
    """The id of the imported key ``plaintext`` is, or None. One indexed read; on a
    key's first success, its foreign hash is verified (off the event loop: a
    Django password hash is slow on purpose) and it is re-digested with keycap's
    HMAC, so later uses verify as keycap's own keys do."""
    found = imports.lookups(plaintext)
    if not found:
        return None
    for row in await db.read(statements.candidates, list(found.values())):
        if row.upgraded_at is not None:
            if ring.knows(row.pepper_id) and ring.verify(plaintext, row.pepper_id, row.digest):
                return str(row.key_id)
            continue
        if row.foreign_hash is None or row.scheme not in found:
            continue
        if await asyncio.to_thread(
            imports.verify, row.scheme, plaintext, row.foreign_hash, secrets
        ):
            await db.run_in_transaction(
                statements.upgrade, row.key_id, ring.digest(plaintext), ring.current_id, now
            )
            return str(row.key_id)
    return None
