"""The keys table: the key's row, its administration, and the statements of
validation (the hot path) that decide the grant rule in SQL and count a use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    case,
    exists,
    false,
    insert,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.build import (
    HOT_CACHE,
    KEY_ID,
    NOW,
    AnyRow,
    Changing,
    Execute,
    KeyRef,
    changed,
    changing,
    hot_binds,
    hot_params,
    int_param,
)
from keycap._db.grant import (
    asked_product,
    grant_predicate,
    has_rate_limits,
    key_is_live_now,
    rate_limit_count,
    state_columns,
    status_filter,
)
from keycap._db.schema import ANCESTORS, keys, products, project_products, projects
from keycap._rules import ips
from keycap._rules.policy import Requirement

#: The columns of a key that callers see (no digest, no pepper id).
KEY_COLUMNS = (
    keys.c.id,
    keys.c.org_id,
    keys.c.project_id,
    keys.c.product_id,
    keys.c.name,
    keys.c.start,
    keys.c.scopes,
    keys.c.metadata,
    keys.c.delegated_by,
    keys.c.created_at,
    keys.c.updated_at,
    keys.c.expires_at,
    keys.c.revoked_at,
    keys.c.disabled_at,
    keys.c.last_used_at,
    keys.c.use_count,
    keys.c.max_uses,
    keys.c.allowed_ips,
    keys.c.identity_id,
    *(keys.c[name] for name in ANCESTORS),
)
_AUTH_COLUMNS = (
    *KEY_COLUMNS,
    keys.c.digest,
    keys.c.pepper_id,
    keys.c.previous_digest,
    keys.c.previous_pepper_id,
    keys.c.previous_until,
)


def new_key_row(
    *,
    key_id: str,
    org_id: str,
    project_id: str | None,
    product_id: str | None,
    name: str,
    start: str,
    digest: str,
    pepper_id: str,
    scopes: str,
    metadata: Mapping[str, Any],
    delegated_by: str | None,
    expires_at: datetime | None,
    max_uses: int | None,
    now: datetime,
    allowed_ips: str | None = None,
    identity_id: str | None = None,
) -> dict[str, Any]:
    """A key's row as created: never used, not revoked, not disabled."""
    return {
        "id": key_id,
        "org_id": org_id,
        "project_id": project_id,
        "product_id": product_id,
        "name": name,
        "start": start,
        "digest": digest,
        "pepper_id": pepper_id,
        "scopes": scopes,
        "metadata": metadata,
        "delegated_by": delegated_by,
        "created_at": now,
        "updated_at": now,
        "expires_at": expires_at,
        "revoked_at": None,
        "disabled_at": None,
        "last_used_at": None,
        "use_count": 0,
        "max_uses": max_uses,
        "allowed_ips": allowed_ips,
        "identity_id": identity_id,
    }


# --- administration -------------------------------------------------------------------


async def insert_key(conn: AsyncConnection, values: Mapping[str, Any]) -> None:
    """The composite foreign keys repeat the tenancy check at commit, so a project
    deleted or moved meanwhile cannot leave a key pointing across organizations."""
    await conn.execute(insert(keys).values(**values))


async def get_key(conn: AsyncConnection, key_id: str) -> AnyRow | None:
    return (await conn.execute(select(*KEY_COLUMNS).where(keys.c.id == key_id))).first()


async def get_key_state(conn: AsyncConnection, key_id: str) -> AnyRow | None:
    """The key with its identity's and ancestors' state: all the grant rule's state
    steps need (why a charge was refused)."""
    stmt = select(*KEY_COLUMNS, *state_columns())
    return (await conn.execute(stmt.where(keys.c.id == key_id))).first()


async def get_key_audited(conn: AsyncConnection, key_id: str) -> AnyRow | None:
    """The key as the audit log sees it: its public columns, and until when a
    rolled key's previous secret works (what a roll changes, besides digests)."""
    stmt = select(*KEY_COLUMNS, keys.c.previous_until).where(keys.c.id == key_id)
    return (await conn.execute(stmt)).first()


async def list_keys(
    conn: AsyncConnection,
    *,
    org_id: str | None,
    project_id: str | None,
    product_id: str | None,
    status: str | None,
    now: datetime,
    limit: int,
    offset: int,
    newest_first: bool = False,
    identity_id: str | None = None,
    descendants_of: str | None = None,
) -> Sequence[AnyRow]:
    order = (
        (keys.c.created_at.desc(), keys.c.id.desc())
        if newest_first
        else (
            keys.c.created_at,
            keys.c.id,
        )
    )
    stmt = select(*KEY_COLUMNS).order_by(*order).limit(limit).offset(offset)
    if org_id is not None:
        stmt = stmt.where(keys.c.org_id == org_id)
    if project_id is not None:
        stmt = stmt.where(keys.c.project_id == project_id)
    if product_id is not None:
        stmt = stmt.where(keys.c.product_id == product_id)
    if identity_id is not None:
        stmt = stmt.where(keys.c.identity_id == identity_id)
    if descendants_of is not None:
        stmt = stmt.where(delegated_from(descendants_of))
    if status is not None:
        stmt = stmt.where(status_filter(status, now))
    return (await conn.execute(stmt)).all()


async def lock_key_state(conn: AsyncConnection, key_id: str) -> AnyRow | None:
    """:func:`get_key_state`, after taking the key's row lock for the transaction
    (what a delegation and a narrowing of the same key serialize on)."""
    locked = select(keys.c.id).where(keys.c.id == key_id).with_for_update()
    if (await conn.execute(locked)).first() is None:
        return None
    return await get_key_state(conn, key_id)


async def children_of(conn: AsyncConnection, parent_ids: Sequence[str]) -> Sequence[AnyRow]:
    """The keys delegated directly from any of ``parent_ids``, locked for the
    transaction (by the index on ``ancestor_1``), in id order."""
    stmt = (
        select(*KEY_COLUMNS, keys.c.previous_until)
        .where(keys.c.ancestor_1.in_(parent_ids))
        .order_by(keys.c.id)
        .with_for_update()
    )
    return (await conn.execute(stmt)).all()


async def update_key(
    conn: AsyncConnection,
    key_id: str,
    values: Mapping[str, Any],
    *,
    only_if: ColumnElement[bool] | None = None,
) -> AnyRow | None:
    """Apply ``values`` (when ``only_if`` holds) and return the key as it now is, or None
    if there is no such key. Run in a transaction, the returned row is the written one.

    Each assignment names only its own column, so MySQL's left-to-right SET order
    cannot change the result.
    """
    stmt = update(keys).where(keys.c.id == key_id).values(**values)
    if only_if is not None:
        stmt = stmt.where(only_if)
    await conn.execute(stmt)
    return await get_key(conn, key_id)


async def revoke_key(conn: AsyncConnection, key_id: str, now: datetime) -> AnyRow | None:
    """Revoke; idempotent, and the first ``revoked_at`` is kept (the WHERE skips a revoked key)."""
    return await update_key(
        conn, key_id, {"revoked_at": now, "updated_at": now}, only_if=keys.c.revoked_at.is_(None)
    )


async def set_disabled(
    conn: AsyncConnection, key_id: str, now: datetime, disabled: bool
) -> AnyRow | None:
    """Disable (keeping the first ``disabled_at``) or enable; both idempotent."""
    values: dict[str, datetime | None] = {
        "disabled_at": now if disabled else None,
        "updated_at": now,
    }
    cond = keys.c.disabled_at.is_(None) if disabled else keys.c.disabled_at.is_not(None)
    return await update_key(conn, key_id, values, only_if=cond)


async def revoke_keys_where(conn: AsyncConnection, column: str, value: str, now: datetime) -> None:
    """Revoke every unrevoked key of :func:`selected_by`."""
    await conn.execute(
        update(keys)
        .where(selected_by(column, value), keys.c.revoked_at.is_(None))
        .values(revoked_at=now, updated_at=now)
    )


def selected_by(column: str, value: str) -> ColumnElement[bool]:
    """The keys whose ``column`` (id, project_id, product_id) is ``value``; for
    ``id``, with the keys delegated from it (deleting a key deletes them)."""
    match = keys.c[column] == value
    return or_(match, delegated_from(value)) if column == "id" else match


def delegated_from(key_id: str) -> ColumnElement[bool]:
    """The keys delegated from ``key_id``, at any depth (one of their ancestors)."""
    return or_(*(keys.c[name] == key_id for name in ANCESTORS))


async def upgrade_digest(
    conn: AsyncConnection,
    key_id: str,
    old_pepper: str,
    old_digest: str,
    new_pepper: str,
    new_digest: str,
) -> None:
    """Re-digest a key under the newest pepper. Conditional on the old pepper and
    digest, so two processes upgrading at once both leave the same, valid digest,
    and a rolled key's previous secret (still in its grace) never replaces the
    current one."""
    await conn.execute(
        update(keys)
        .where(keys.c.id == key_id, keys.c.pepper_id == old_pepper, keys.c.digest == old_digest)
        .values(digest=new_digest, pepper_id=new_pepper)
    )


async def roll_key(
    conn: AsyncConnection,
    key_id: str,
    *,
    digest: str,
    pepper_id: str,
    previous_until: datetime,
    now: datetime,
) -> AnyRow | None:
    """Give a key a new secret; the current one becomes the previous one, accepted
    until ``previous_until``. None if the key is not there, or revoked."""
    k = keys.c
    stmt = (
        update(keys)
        .where(k.id == key_id, k.revoked_at.is_(None))
        .ordered_values(  # the previous columns first: MySQL assigns left to right
            (k.previous_digest, k.digest),
            (k.previous_pepper_id, k.pepper_id),
            (k.previous_until, previous_until),
            (k.digest, digest),
            (k.pepper_id, pepper_id),
            (k.updated_at, now),
        )
    )
    if (await conn.execute(stmt)).rowcount != 1:
        return None
    return (await conn.execute(select(*KEY_COLUMNS).where(k.id == key_id))).first()


# --- validation: the read path --------------------------------------------------------


async def lookup_for_validation(execute: Execute, key_id: str, req: Requirement) -> AnyRow | None:
    """The key's row and the facts about the asked-for project/product, in one SELECT
    (run by ``execute``: ``Database.read_rows``).

    Read-only: this is the whole read path when use tracking is off, and the
    diagnosis of a refusal otherwise.
    """
    found = await execute(_lookup_stmt(req), {"hot_key_id": key_id})
    return found[0] if found else None


@lru_cache(maxsize=HOT_CACHE)
def _lookup_stmt(req: Requirement) -> Any:
    k = keys.c
    key_id, _, _ = hot_binds(())
    project_org: Any = null()
    product_org: Any = null()
    product_linked: Any = false()
    if req.project_id is not None:
        project_org = (
            select(projects.c.org_id).where(projects.c.id == req.project_id).scalar_subquery()
        )
    asked_id: Any = null()
    if (asked := asked_product(req)) is not None:
        asked_id = literal(asked) if isinstance(asked, str) else asked
        product_org = select(products.c.org_id).where(products.c.id == asked).scalar_subquery()
        product_linked = exists().where(
            project_products.c.org_id == k.org_id,
            project_products.c.project_id == k.project_id,
            project_products.c.product_id == asked,
        )
    return select(
        *_AUTH_COLUMNS,
        *state_columns(),
        has_rate_limits().label("has_rate_limits"),
        project_org.label("asked_project_org_id"),
        product_org.label("asked_product_org_id"),
        product_linked.label("asked_product_linked"),
        asked_id.label("asked_product_id"),
    ).where(k.id == key_id)


# --- validation: recording a use ------------------------------------------------------


async def record_use_returning(
    execute: Execute,
    dialect: str,
    key_id: str,
    digests: Mapping[str, str],
    req: Requirement,
    now: datetime,
    client: ips.Address | None = None,
) -> AnyRow | None:
    """PostgreSQL and SQLite: decide, record the use and return the key, in one
    statement (``UPDATE ... RETURNING``, run by ``execute``: ``Database.rows``).
    None: the rule did not hold; nothing written."""
    stmt = _record_use_stmt(req, tuple(digests), dialect, True)
    found = await execute(stmt, hot_params(key_id, now, digests, client))
    return found[0] if found else None


async def record_use(
    written: Callable[[Any, Mapping[str, Any]], Awaitable[int]],
    dialect: str,
    key_id: str,
    digests: Mapping[str, str],
    req: Requirement,
    now: datetime,
    client: ips.Address | None = None,
) -> bool:
    """MySQL/MariaDB (no ``UPDATE ... RETURNING``): record the use if the rule still
    holds (run by ``written``: ``Database.written``); the caller read the row just
    before. False: nothing written."""
    stmt = _record_use_stmt(req, tuple(digests), dialect, False)
    return await written(stmt, hot_params(key_id, now, digests, client)) == 1


@lru_cache(maxsize=HOT_CACHE)
def _record_use_stmt(
    req: Requirement, peppers: tuple[str, ...], dialect: str, returning: bool
) -> Any:
    # use_count = use_count + 1 is computed by the database under the row lock the
    # UPDATE takes, so concurrent validations from any number of processes never
    # lose a count; the WHERE re-decides the grant rule at the moment of writing.
    # Only for keys no rate limit applies to (those go through a metered
    # transaction); the usage cap lives on this row, so it is checked here too.
    key_id, digests, now = hot_binds(peppers)
    stmt = (
        update(keys)
        .where(
            keys.c.id == key_id,
            grant_predicate(digests, req, now, dialect),
            or_(keys.c.max_uses.is_(None), keys.c.use_count < keys.c.max_uses),
            ~has_rate_limits(),
        )
        .values(use_count=keys.c.use_count + 1, last_used_at=now)
    )
    return stmt.returning(*_AUTH_COLUMNS) if returning else stmt


# --- the key inside a metered transaction ---------------------------------------------


async def lock_live_key(conn: AsyncConnection, key_id: str, now: datetime) -> KeyRef | None:
    """Take the key's row lock for this transaction, if the key is live.

    A charge is a use of the key, so it sets ``last_used_at``; the UPDATE both
    checks the key's state and makes a concurrent revoke wait for this
    transaction, which is also what starts SQLite's write transaction before
    anything is read.
    """
    row = await changed(conn, _lock_key(), {"m_key_id": key_id, "m_now": now})
    return None if row is None else KeyRef.of(key_id, row)


@lru_cache(maxsize=1)
def _lock_key() -> Changing:
    k = keys.c
    stmt = update(keys).where(k.id == KEY_ID, *key_is_live_now(NOW)).values(last_used_at=NOW)
    ids_ = (k.org_id, k.project_id, k.identity_id, *(k[name] for name in ANCESTORS))
    return changing(stmt, select(*ids_).where(k.id == KEY_ID))


async def record_metered_use(
    conn: AsyncConnection,
    key_id: str,
    digests: Mapping[str, str],
    req: Requirement,
    now: datetime,
    *,
    track: bool,
    client: ips.Address | None = None,
    uses: int = 1,
) -> AnyRow | None:
    """In a metered validation: the whole grant rule and the usage cap
    (``use_count < max_uses``) in the WHERE, with the use counted unless tracking
    is off and the key has no cap. Returns the key's row after it (with
    ``pepper_id`` and ``rate_limit_count``), or None: refused, nothing written.

    ``uses``: a lease's slice of that many validations (``keycap._ops.leases``):
    the cap must leave room for all of them, counted as one use would be; what
    the slice does not spend is given back (:func:`give_back_uses`)."""
    params = hot_params(key_id, now, digests, client)
    if uses != 1:
        params["hot_uses"] = uses
    stmt = _metered_use(req, tuple(digests), conn.dialect.name, track, sliced=uses != 1)
    return await changed(conn, stmt, params)


async def give_back_uses(conn: AsyncConnection, key_id: str, uses: int) -> None:
    """Uncount ``uses`` a slice counted and never spent."""
    k = keys.c
    await conn.execute(
        update(keys)
        .where(k.id == key_id, k.use_count >= uses)
        .values(use_count=k.use_count - uses),
    )


def metered_use(track: bool, now: Any, uses: Any = 1) -> tuple[tuple[Any, Any], ...]:
    """What a metered validation writes to the key's row: the use counted (``uses``
    of them, for a slice), unless tracking is off and the key has no cap."""
    k = keys.c
    capped = k.max_uses.is_not(None)
    if track:
        return ((k.use_count, k.use_count + uses), (k.last_used_at, now))
    # A capped key is counted all the same. An uncapped one is written to
    # itself: the UPDATE is what takes the key's lock and re-decides the rule,
    # but it records nothing. (use_count first: last_used_at's CASE reads
    # only max_uses, so MySQL's left-to-right SET gives the same result.)
    return (
        (k.use_count, case((capped, k.use_count + uses), else_=k.use_count)),
        (k.last_used_at, case((capped, now), else_=k.last_used_at)),
    )


def usage_cap_open(uses: Any = None) -> ColumnElement[bool]:
    """The key's usage cap leaves room for one more use (or for ``uses`` more)."""
    k = keys.c
    if uses is None:
        return or_(k.max_uses.is_(None), k.use_count < k.max_uses)
    return or_(k.max_uses.is_(None), k.use_count + uses <= k.max_uses)


@lru_cache(maxsize=HOT_CACHE)
def _metered_use(
    req: Requirement, peppers: tuple[str, ...], dialect: str, track: bool, sliced: bool = False
) -> Changing:
    k = keys.c
    key_id, digests, now = hot_binds(peppers)
    uses = int_param("hot_uses") if sliced else None
    values = metered_use(track, now, 1 if uses is None else uses)
    stmt = (
        update(keys)
        .where(
            k.id == key_id,
            grant_predicate(digests, req, now, dialect),
            usage_cap_open(uses),
        )
        .ordered_values(*values)
    )
    returned = (*KEY_COLUMNS, k.pepper_id, rate_limit_count(key_id))
    return changing(stmt, select(*returned).where(k.id == key_id))
