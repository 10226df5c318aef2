"""What every metered operation shares inside its transaction: the refusal
signal, idempotency (replay a stored result, claim a key), and the key's lock.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from keycap._db import metering as m
from keycap._db.engine import Database
from keycap._db.queries import AnyRow


class Refused(Exception):
    # An internal signal, never escapes this package.
    """Raised inside a transaction to roll it back; says which row refused (a rate
    limit), or for which key (a budget: which one is found after the rollback)."""

    def __init__(self, what: str, row: AnyRow | None = None, key: m.KeyRef | None = None) -> None:
        self.what = what
        self.row = row
        self.key = key


async def stored_replay(
    db: Database, model: Any, scope: str, kind: str, idempotency_key: str | None
) -> Any | None:
    """The stored result of an earlier call with this idempotency key, marked replayed."""
    if idempotency_key is None:
        return None
    stored = await m.stored_result(db, scope=scope, kind=kind, idempotency_key=idempotency_key)
    return None if stored is None else model.model_validate({**stored, "replayed": True})


async def claim(
    conn: Any, org_id: str, scope: str, kind: str, idempotency_key: str | None, now: datetime
) -> str | None:
    if idempotency_key is None:
        return None
    return await m.claim_operation(
        conn, org_id=org_id, scope=scope, kind=kind, idempotency_key=idempotency_key, now=now
    )


async def live_key(conn: Any, key_id: str, now: datetime) -> m.KeyRef:
    key = await m.lock_live_key(conn, key_id, now)
    if key is None:
        raise Refused("key")
    return key
