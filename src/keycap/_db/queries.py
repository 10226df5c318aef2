"""Every SQL statement keycap runs, and why each is safe under concurrency.

Each function here is one unit of work and opens its own transaction (or runs
one self-contained statement in autocommit), so the transaction boundary is
visible right where the SQL is. Nothing here decides policy: the client passes
in what to check, and ``keycap._rules.policy`` decides why a refused key was refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, TypeAlias

from sqlalchemy import (
    ColumnElement,
    Row,
    Table,
    and_,
    bindparam,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    update,
)

from keycap._db.engine import Conflict, Database
from keycap._db.schema import (
    keys,
    organizations,
    products,
    project_products,
    projects,
    rate_limits,
)
from keycap._errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from keycap._rules import scopes as scope_rules
from keycap._rules.policy import Requirement

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
)
_AUTH_COLUMNS = (*KEY_COLUMNS, keys.c.digest, keys.c.pepper_id)

#: A result row of any width.
AnyRow: TypeAlias = Row[*tuple[Any, ...]]


# --- organizations, projects, products ------------------------------------------------


async def insert_named(
    db: Database, table: Table, values: Mapping[str, Any], resource: str
) -> None:
    """Insert an organization, project or product.

    The unique constraint on (parent, name) decides a race between two creators;
    the loser gets AlreadyExistsError naming the winner, never a duplicate.
    """
    try:
        async with db.begin() as conn:
            await conn.execute(insert(table).values(**values))
    except Conflict:
        existing = await find_named(db, table, values["name"], values.get("org_id"))
        if existing is not None:
            raise AlreadyExistsError(resource, existing.id) from None
        # No name clash, so the parent organization vanished (foreign key).
        raise NotFoundError("organization", values.get("org_id") or "") from None


async def find_named(db: Database, table: Table, name: str, org_id: str | None) -> AnyRow | None:
    stmt = select(table).where(table.c.name == name)
    if org_id is not None:
        stmt = stmt.where(table.c.org_id == org_id)
    async with db.autocommit() as conn:
        return (await conn.execute(stmt)).first()


async def get_by_id(db: Database, table: Table, id_: str) -> AnyRow | None:
    async with db.autocommit() as conn:
        return (await conn.execute(select(table).where(table.c.id == id_))).first()


async def list_rows(
    db: Database, table: Table, org_id: str | None, limit: int, offset: int
) -> Sequence[AnyRow]:
    stmt = select(table).order_by(table.c.created_at, table.c.id).limit(limit).offset(offset)
    if org_id is not None:
        stmt = stmt.where(table.c.org_id == org_id)
    async with db.autocommit() as conn:
        return (await conn.execute(stmt)).all()


async def delete_by_id(db: Database, table: Table, id_: str) -> bool:
    """Delete one row; ON DELETE CASCADE removes what hangs under it on every database."""
    async with db.begin() as conn:
        result = await conn.execute(delete(table).where(table.c.id == id_))
    return result.rowcount == 1


async def link_product(
    db: Database, org_id: str, project_id: str, product_id: str, now: datetime
) -> bool:
    """Link a product to a project of the same organization. Returns False if already linked.

    The composite foreign keys (org_id, project_id) and (org_id, product_id)
    make a cross-organization link impossible even if the caller is wrong.
    """
    try:
        async with db.begin() as conn:
            await conn.execute(
                insert(project_products).values(
                    org_id=org_id, project_id=project_id, product_id=product_id, created_at=now
                )
            )
    except Conflict:
        async with db.autocommit() as conn:
            linked = (
                await conn.execute(
                    select(literal(1)).where(
                        project_products.c.org_id == org_id,
                        project_products.c.project_id == project_id,
                        project_products.c.product_id == product_id,
                    )
                )
            ).first()
        if linked is None:
            raise
        return False
    return True


async def unlink_product(db: Database, project_id: str, product_id: str) -> bool:
    async with db.begin() as conn:
        result = await conn.execute(
            delete(project_products).where(
                project_products.c.project_id == project_id,
                project_products.c.product_id == product_id,
            )
        )
    return result.rowcount == 1


# --- keys: administration -------------------------------------------------------------


async def insert_key(
    db: Database,
    values: Mapping[str, Any],
    project_id: str | None,
    product_id: str | None,
    extra: Sequence[tuple[Table, Sequence[Mapping[str, Any]]]] = (),
) -> None:
    """Insert a key after checking, in the same transaction, that its project and
    product belong to its organization (and are linked, when both are given).

    The composite foreign keys repeat the tenancy check at commit, so a project
    deleted or moved meanwhile cannot leave a key pointing across organizations.
    ``extra`` rows (the key's rate limits and budgets) are inserted in the same
    transaction.
    """
    org_id = values["org_id"]
    try:
        async with db.begin() as conn:
            for table, resource, id_ in (
                (projects, "project", project_id),
                (products, "product", product_id),
            ):
                if (
                    id_ is not None
                    and await conn.scalar(
                        select(table.c.id).where(table.c.id == id_, table.c.org_id == org_id)
                    )
                    is None
                ):
                    raise NotFoundError(resource, id_)
            if project_id is not None and product_id is not None:
                linked = await conn.scalar(
                    select(literal(1)).where(
                        project_products.c.org_id == org_id,
                        project_products.c.project_id == project_id,
                        project_products.c.product_id == product_id,
                    )
                )
                if linked is None:
                    raise InvalidArgumentError(
                        "product_id",
                        "is not linked to the key's project (add_product_to_project first)",
                    )
            await conn.execute(insert(keys).values(**values))
            # The key's own limits and budgets commit with it: never a key without its caps.
            for table, rows in extra:
                if rows:
                    await conn.execute(insert(table), list(rows))
    except Conflict:
        if await get_by_id(db, organizations, org_id) is None:
            raise NotFoundError("organization", org_id) from None
        raise


async def get_key(db: Database, key_id: str) -> AnyRow | None:
    async with db.autocommit() as conn:
        return (await conn.execute(select(*KEY_COLUMNS).where(keys.c.id == key_id))).first()


def status_filter(status: str, now: datetime) -> ColumnElement[bool]:
    """The SQL twin of ``APIKey.status_at``: revoked, then disabled, then expired."""
    k = keys.c
    live = and_(k.revoked_at.is_(None), k.disabled_at.is_(None))
    if status == "revoked":
        return k.revoked_at.is_not(None)
    if status == "disabled":
        return and_(k.revoked_at.is_(None), k.disabled_at.is_not(None))
    if status == "expired":
        return and_(live, k.expires_at.is_not(None), k.expires_at <= now)
    return and_(live, or_(k.expires_at.is_(None), k.expires_at > now))


async def list_keys(
    db: Database,
    *,
    org_id: str | None,
    project_id: str | None,
    product_id: str | None,
    status: str | None,
    now: datetime,
    limit: int,
    offset: int,
) -> Sequence[AnyRow]:
    stmt = select(*KEY_COLUMNS).order_by(keys.c.created_at, keys.c.id).limit(limit).offset(offset)
    if org_id is not None:
        stmt = stmt.where(keys.c.org_id == org_id)
    if project_id is not None:
        stmt = stmt.where(keys.c.project_id == project_id)
    if product_id is not None:
        stmt = stmt.where(keys.c.product_id == product_id)
    if status is not None:
        stmt = stmt.where(status_filter(status, now))
    async with db.autocommit() as conn:
        return (await conn.execute(stmt)).all()


async def update_key(
    db: Database, key_id: str, values: Mapping[str, Any], *, only_if: ColumnElement[bool] | None
) -> AnyRow | None:
    """Apply ``values`` (when ``only_if`` holds) and return the key as it now is, or None
    if there is no such key. One transaction, so the returned row is the written one.

    Each assignment names only its own column, so MySQL's left-to-right SET order
    cannot change the result.
    """
    async with db.begin() as conn:
        stmt = update(keys).where(keys.c.id == key_id).values(**values)
        if only_if is not None:
            stmt = stmt.where(only_if)
        await conn.execute(stmt)
        return (await conn.execute(select(*KEY_COLUMNS).where(keys.c.id == key_id))).first()


# --- keys: validation (the hot path) --------------------------------------------------


def key_is_live_now(now: Any) -> list[ColumnElement[bool]]:
    """A key row that is not revoked, not disabled and not expired at ``now``
    (steps 4-6 of the grant rule; every statement that charges re-checks them)."""
    k = keys.c
    return [
        k.revoked_at.is_(None),
        k.disabled_at.is_(None),
        or_(k.expires_at.is_(None), k.expires_at > now),
    ]


def contains(column: Any, needle: str, dialect: str) -> ColumnElement[bool]:
    # A plain, case-sensitive substring test. LIKE would need escaping of "_" and
    # is case-insensitive on SQLite; strpos/instr are neither.
    if dialect == "postgresql":
        return func.strpos(column, needle) > 0
    return func.instr(column, needle) > 0


def grant_predicate(
    digests: Mapping[str, Any], req: Requirement, now: Any, dialect: str
) -> ColumnElement[bool]:
    """The grant rule of ``keycap._rules.policy`` steps 3-10, as one SQL condition on ``keys``.

    Used as the WHERE of the statement that records a use, so a key revoked,
    disabled or expired by another process between any two of our statements can
    never have a use recorded: the database re-decides at the moment of writing.
    """
    k = keys.c
    conds: list[ColumnElement[bool]] = [
        or_(*(and_(k.pepper_id == pid, k.digest == d) for pid, d in digests.items())),
        *key_is_live_now(now),
    ]
    if req.org_id is not None:
        conds.append(k.org_id == req.org_id)
    if req.project_id is not None:
        conds.append(
            or_(
                k.project_id == req.project_id,
                and_(
                    k.project_id.is_(None),
                    exists().where(projects.c.id == req.project_id, projects.c.org_id == k.org_id),
                ),
            )
        )
    asked = asked_product(req)
    if asked is not None:
        conds.append(exists().where(products.c.id == asked, products.c.org_id == k.org_id))
        conds.append(or_(k.product_id.is_(None), k.product_id == asked))
        conds.append(
            or_(
                k.project_id.is_(None),
                exists().where(
                    project_products.c.org_id == k.org_id,
                    project_products.c.project_id == k.project_id,
                    project_products.c.product_id == asked,
                ),
            )
        )
    for required in req.scopes:
        conds.append(
            or_(
                *(
                    contains(k.scopes, f" {grant} ", dialect)
                    for grant in scope_rules.covering(required)
                )
            )
        )
    return and_(*conds)


def asked_product(req: Requirement) -> Any:
    """The asked-for product's id: the id given, or the id of the product with the
    given name in the key's own organization (NULL when there is none)."""
    if req.product_id is not None:
        return req.product_id
    if req.product_name is None:
        return None
    # An alias, correlated to keys only: inside an EXISTS over products, the plain
    # table would be auto-correlated to that EXISTS instead.
    named = products.alias("named_product")
    return (
        select(named.c.id)
        .where(named.c.org_id == keys.c.org_id, named.c.name == req.product_name)
        .correlate(keys)
        .scalar_subquery()
    )


# The hot path's statements are built once per requirement (and pepper set) and
# reused: building and cache-keying a statement costs more than executing it.
# The per-call values are bind parameters, filled in by hot_params.
_HOT_CACHE = 512


def hot_params(key_id: str, now: datetime, digests: Mapping[str, str]) -> dict[str, Any]:
    params: dict[str, Any] = {"hot_key_id": key_id, "hot_now": now}
    for i, digest in enumerate(digests.values()):
        params[f"hot_digest_{i}"] = digest
    return params


def hot_binds(peppers: tuple[str, ...]) -> tuple[Any, dict[str, Any], Any]:
    """Bind parameters for the key id, ``now`` and one digest per pepper id."""
    now = bindparam("hot_now", type_=keys.c.last_used_at.type)
    digests = {
        pid: bindparam(f"hot_digest_{i}", type_=keys.c.digest.type) for i, pid in enumerate(peppers)
    }
    return bindparam("hot_key_id", type_=keys.c.id.type), digests, now


async def lookup_for_validation(db: Database, key_id: str, req: Requirement) -> AnyRow | None:
    """The key's row and the facts about the asked-for project/product, in one SELECT.

    Read-only: this is the whole read path when use tracking is off, and the
    diagnosis of a refusal otherwise.
    """
    async with db.autocommit() as conn:
        return (await conn.execute(_lookup_stmt(req), {"hot_key_id": key_id})).first()


@lru_cache(maxsize=_HOT_CACHE)
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
        has_rate_limits().label("has_rate_limits"),
        project_org.label("asked_project_org_id"),
        product_org.label("asked_product_org_id"),
        product_linked.label("asked_product_linked"),
        asked_id.label("asked_product_id"),
    ).where(k.id == key_id)


@lru_cache(maxsize=_HOT_CACHE)
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


def has_rate_limits() -> ColumnElement[bool]:
    """A rate limit applies to the key: its own, its project's or its organization's."""
    k = keys.c
    return exists().where(
        or_(
            rate_limits.c.subject_id == k.id,
            rate_limits.c.subject_id == k.org_id,
            and_(k.project_id.is_not(None), rate_limits.c.subject_id == k.project_id),
        )
    )


async def record_use_returning(
    db: Database, key_id: str, digests: Mapping[str, str], req: Requirement, now: datetime
) -> AnyRow | None:
    """PostgreSQL and SQLite: decide, record the use and return the key, in one
    statement (``UPDATE ... RETURNING``). None: the rule did not hold; nothing written."""
    stmt = _record_use_stmt(req, tuple(digests), db.dialect, True)
    async with db.autocommit() as conn:
        return (await conn.execute(stmt, hot_params(key_id, now, digests))).first()


async def record_use(
    db: Database, key_id: str, digests: Mapping[str, str], req: Requirement, now: datetime
) -> bool:
    """MySQL/MariaDB (no ``UPDATE ... RETURNING``): record the use if the rule still
    holds; the caller read the row just before. False: nothing written."""
    stmt = _record_use_stmt(req, tuple(digests), db.dialect, False)
    async with db.autocommit() as conn:
        result = await conn.execute(stmt, hot_params(key_id, now, digests))
    return result.rowcount == 1


async def upgrade_digest(
    db: Database, key_id: str, old_pepper: str, new_pepper: str, new_digest: str
) -> None:
    """Re-digest a key under the newest pepper. Conditional on the old pepper, so two
    processes upgrading at once both leave the same, valid digest."""
    async with db.autocommit() as conn:
        await conn.execute(
            update(keys)
            .where(keys.c.id == key_id, keys.c.pepper_id == old_pepper)
            .values(digest=new_digest, pepper_id=new_pepper)
        )


async def revoke_keys_where(db: Database, column: str, value: str, now: datetime) -> None:
    """Revoke every unrevoked key whose ``column`` (id, project_id, product_id) is ``value``."""
    async with db.begin() as conn:
        await conn.execute(
            update(keys)
            .where(keys.c[column] == value, keys.c.revoked_at.is_(None))
            .values(revoked_at=now, updated_at=now)
        )


async def revoke_key(db: Database, key_id: str, now: datetime) -> AnyRow | None:
    """Revoke; idempotent, and the first ``revoked_at`` is kept (the WHERE skips a revoked key)."""
    return await update_key(
        db, key_id, {"revoked_at": now, "updated_at": now}, only_if=keys.c.revoked_at.is_(None)
    )


async def set_disabled(db: Database, key_id: str, now: datetime, disabled: bool) -> AnyRow | None:
    """Disable (keeping the first ``disabled_at``) or enable; both idempotent."""
    values: dict[str, datetime | None] = {
        "disabled_at": now if disabled else None,
        "updated_at": now,
    }
    cond = keys.c.disabled_at.is_(None) if disabled else keys.c.disabled_at.is_not(None)
    return await update_key(db, key_id, values, only_if=cond)
