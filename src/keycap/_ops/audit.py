"""The audit log: who changed what, when, from what to what.

Every administrative change writes its row in the change's own transaction
(:func:`write`), so there is no change without its row and no row without its
change. Who: the actor the caller named with :func:`acting_as` (a context
variable, so concurrent requests each keep their own). What it was and became:
the subject as the public API shows it, never a secret or a digest.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db import audit as statements
from keycap._db import rows
from keycap._rules import inputs

#: The actor of the changes made in this context; None: not said.
ACTOR: ContextVar[str | None] = ContextVar("keycap_actor", default=None)

#: The fields of a key that change with use, not by an administrator.
_USE_FIELDS = frozenset({"last_used_at", "use_count", "rate_limit", "charge"})


@contextmanager
def acting_as(actor: str) -> Iterator[None]:
    """Record ``actor`` as who made the changes inside the ``with`` block."""
    token = ACTOR.set(inputs.text(actor, "actor"))
    try:
        yield
    finally:
        ACTOR.reset(token)


def key_state(row: Any) -> dict[str, Any] | None:
    """A key as the audit log keeps it: its public fields, without those use moves."""
    if row is None:
        return None
    shown = rows.to_key(row).model_dump(mode="json")
    state = {k: v for k, v in shown.items() if k not in _USE_FIELDS}
    # A roll changes only the secret: the audit log says until when the old one
    # works (never the digest itself).
    until = rows.as_mapping(row).get("previous_until")
    state["previous_secret_until"] = until.isoformat() if until is not None else None
    return state


def plain_state(row: Any, *names: str) -> dict[str, Any] | None:
    """``names`` of a row (an organization, project, product, limit or budget), JSON-ready."""
    if row is None:
        return None
    mapping = rows.as_mapping(row)
    out: dict[str, Any] = {}
    for name in names:
        value = mapping.get(name)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    return out


async def write(
    conn: AsyncConnection,
    *,
    org_id: str,
    action: str,
    subject_id: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    now: datetime,
) -> None:
    """Record one change, in ``conn``'s transaction; nothing if nothing changed."""
    if before == after:
        return
    await statements.insert_entry(
        conn,
        {
            "org_id": org_id,
            "at": now,
            "actor": ACTOR.get(),
            "action": action,
            "subject_id": subject_id,
            "before": before,
            "after": after,
        },
    )
