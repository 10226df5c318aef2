"""What every unit of work shares: the retry of a transient conflict, the refusal
signal, idempotency (replay a stored result, claim a key), and the key's lock.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db import keys, operations
from keycap._db.build import AnyRow, KeyRef
from keycap._db.engine import Database, is_transient
from keycap._errors import DatabaseError

T = TypeVar("T")
ATTEMPTS = 8


async def retrying(unit: Callable[[], Awaitable[T]]) -> T:
    """Run ``unit`` (one whole transaction) again after a transient conflict
    (deadlock, serialization failure, busy SQLite), a bounded number of times."""
    for attempt in range(ATTEMPTS):
        try:
            return await unit()
        except DatabaseError as error:
            if attempt == ATTEMPTS - 1 or not is_transient(error):
                raise
            await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))  # noqa: S311 - jitter
    raise AssertionError("unreachable")


class Refused(Exception):
    # An internal signal, never escapes this package.
    """Raised inside a transaction to roll it back; says which row refused (a rate
    limit), or for which key (a budget: which one is found after the rollback)."""

    def __init__(self, what: str, row: AnyRow | None = None, key: KeyRef | None = None) -> None:
        self.what = what
        self.row = row
        self.key = key


async def stored_replay(
    db: Database, model: Any, scope: str, kind: str, idempotency_key: str | None
) -> Any | None:
    """The stored result of an earlier call with this idempotency key, marked replayed."""
    if idempotency_key is None:
        return None
    stored = await db.run(
        operations.stored_result, scope=scope, kind=kind, idempotency_key=idempotency_key
    )
    return None if stored is None else model.model_validate({**stored, "replayed": True})


async def claim(
    conn: AsyncConnection,
    org_id: str,
    scope: str,
    kind: str,
    idempotency_key: str | None,
    now: datetime,
) -> str | None:
    if idempotency_key is None:
        return None
    return await operations.claim_operation(
        conn, org_id=org_id, scope=scope, kind=kind, idempotency_key=idempotency_key, now=now
    )


async def live_key(conn: AsyncConnection, key_id: str, now: datetime) -> KeyRef:
    key = await keys.lock_live_key(conn, key_id, now)
    if key is None:
        raise Refused("key")
    return key
