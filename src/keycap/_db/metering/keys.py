"""The key inside a metered transaction: its lock, and the metered use that
re-decides the whole grant rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    case,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.metering.core import (
    KEY_ID,
    NOW,
    Changing,
    KeyRef,
    changed,
    changing,
)
from keycap._db.metering.ratelimits import rate_limit_count
from keycap._db.queries import (
    KEY_COLUMNS,
    AnyRow,
    grant_predicate,
    hot_binds,
    hot_params,
    key_is_live_now,
)
from keycap._db.schema import (
    keys,
)
from keycap._rules.policy import Requirement


async def lock_live_key(conn: AsyncConnection, key_id: str, now: datetime) -> KeyRef | None:
    """Take the key's row lock for this transaction, if the key is live.

    A charge is a use of the key, so it sets ``last_used_at``; the UPDATE both
    checks the key's state and makes a concurrent revoke wait for this
    transaction, which is also what starts SQLite's write transaction before
    anything is read.
    """
    row = await changed(conn, _lock_key(), {"m_key_id": key_id, "m_now": now})
    return None if row is None else KeyRef(key_id, row.org_id, row.project_id)


@lru_cache(maxsize=1)
def _lock_key() -> Changing:
    k = keys.c
    stmt = update(keys).where(k.id == KEY_ID, *key_is_live_now(NOW)).values(last_used_at=NOW)
    return changing(stmt, select(k.org_id, k.project_id).where(k.id == KEY_ID))


async def record_metered_use(
    conn: AsyncConnection,
    key_id: str,
    digests: Mapping[str, str],
    req: Requirement,
    now: datetime,
    dialect: str,
    *,
    track: bool,
) -> AnyRow | None:
    """In a metered validation: the whole grant rule and the usage cap
    (``use_count < max_uses``) in the WHERE, with the use counted unless tracking
    is off and the key has no cap. Returns the key's row after it (with
    ``pepper_id``), or None: refused, nothing written."""
    stmt = _metered_use(req, tuple(digests), dialect, track)
    return await changed(conn, stmt, hot_params(key_id, now, digests))


@lru_cache(maxsize=512)
def _metered_use(req: Requirement, peppers: tuple[str, ...], dialect: str, track: bool) -> Changing:
    k = keys.c
    key_id, digests, now = hot_binds(peppers)
    capped = k.max_uses.is_not(None)
    if track:
        values: Any = ((k.use_count, k.use_count + 1), (k.last_used_at, now))
    else:
        # A capped key is counted all the same. An uncapped one is written to
        # itself: the UPDATE is what takes the key's lock and re-decides the rule,
        # but it records nothing. (use_count first: last_used_at's CASE reads
        # only max_uses, so MySQL's left-to-right SET gives the same result.)
        values = (
            (k.use_count, case((capped, k.use_count + 1), else_=k.use_count)),
            (k.last_used_at, case((capped, now), else_=k.last_used_at)),
        )
    stmt = (
        update(keys)
        .where(
            k.id == key_id,
            grant_predicate(digests, req, now, dialect),
            or_(k.max_uses.is_(None), k.use_count < k.max_uses),
        )
        .ordered_values(*values)
    )
    returned = (*KEY_COLUMNS, k.pepper_id, rate_limit_count(key_id))
    return changing(stmt, select(*returned).where(k.id == key_id))
