"""Administration as units of work: organizations, projects and products, keys,
rate limits and budgets. Each function opens its own transaction (or runs one
self-contained statement) and turns constraint conflicts into the error that
names what clashed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db import budgets, holds, keys, ledger, rate_limits, rows, tenancy
from keycap._db.build import AnyRow, KeyRef
from keycap._db.engine import Conflict, Database
from keycap._db.schema import ANCESTORS, identities, organizations, products, projects
from keycap._db.schema import keys as keys_table
from keycap._errors import AlreadyExistsError, HoldClosedError, InvalidArgumentError, NotFoundError
from keycap._ops import audit
from keycap._ops.release import release, sweep
from keycap._ops.units import retrying
from keycap._rules import delegation, ids, ips, money, movements, policy
from keycap._rules import scopes as scope_rules
from keycap._rules.budgets import BudgetSpec
from keycap._rules.money import MAX_UNITS
from keycap._rules.rate_limits import RateLimit

# --- organizations, projects, products ------------------------------------------------


async def create_named(
    db: Database, kind: str, org_id: str | None, name: str, now: datetime
) -> dict[str, Any]:
    """Create an organization, project or product; its row.

    The unique constraint on (parent, name) decides a race between two creators;
    the loser gets AlreadyExistsError naming the winner, never a duplicate.
    """
    table = tenancy.TABLES[kind]
    values: dict[str, Any] = {"id": ids.new_id(kind), "name": name}
    if kind != ids.ORG:
        values["org_id"] = org_id
    values["created_at"] = now

    async def unit(conn: AsyncConnection) -> None:
        await tenancy.insert_named(conn, table, values)
        await audit.write(
            conn,
            org_id=values.get("org_id") or values["id"],
            action=f"{ids.resource_name(kind)}.created",
            subject_id=values["id"],
            before=None,
            after=audit.plain_state(values, *_NAMED),
            now=now,
        )

    try:
        await db.run_in_transaction(unit)
    except Conflict:
        existing = await db.read(tenancy.find_named, table, name, org_id)
        if existing is not None:
            raise AlreadyExistsError(ids.resource_name(kind), existing.id) from None
        # No name clash, so the parent organization vanished (foreign key).
        raise NotFoundError("organization", org_id or "") from None
    return values


async def get_or_create_named(
    db: Database, kind: str, org_id: str | None, name: str, now: datetime
) -> tuple[AnyRow | Mapping[str, Any], bool]:
    """The organization, project or product of that name, created if missing. Safe
    to call concurrently: exactly one caller creates it."""
    table = tenancy.TABLES[kind]
    existing = await db.read(tenancy.find_named, table, name, org_id)
    if existing is not None:
        return existing, False
    try:
        return await create_named(db, kind, org_id, name, now), True
    except AlreadyExistsError:
        # Lost a race with another creator: theirs is the one.
        winner = await db.read(tenancy.find_named, table, name, org_id)
        if winner is None:  # created and deleted meanwhile
            raise
        return winner, False


async def get_named(db: Database, kind: str, id_: str) -> AnyRow:
    """Raises: NotFoundError."""
    row = await db.read(tenancy.get_by_id, tenancy.TABLES[kind], id_)
    if row is None:
        raise NotFoundError(ids.resource_name(kind), id_)
    return row


async def delete_named(db: Database, kind: str, id_: str, now: datetime) -> None:
    """Delete an organization, project, product or key with what hangs under it.

    Raises: NotFoundError.
    """
    table = keys_table if kind == ids.KEY else tenancy.TABLES[kind]
    removed = await _removed(
        db,
        lambda conn: tenancy.get_by_id(conn, table, id_),
        lambda conn: tenancy.delete_by_id(conn, table, id_),
        f"{ids.resource_name(kind)}.deleted",
        lambda row: (id_ if kind == ids.ORG else row.org_id, id_),
        audit.key_state if kind == ids.KEY else lambda row: audit.plain_state(row, *_NAMED),
        now,
    )
    if not removed:
        raise NotFoundError(ids.resource_name(kind), id_)


async def link_product(
    db: Database, org_id: str, project_id: str, product_id: str, now: datetime
) -> bool:
    """Link a product to a project of the same organization. False if already linked."""

    async def unit(conn: AsyncConnection) -> None:
        await tenancy.insert_link(conn, org_id, project_id, product_id, now)
        await audit.write(
            conn,
            org_id=org_id,
            action="project.product_linked",
            subject_id=project_id,
            before=None,
            after={"project_id": project_id, "product_id": product_id},
            now=now,
        )

    try:
        await db.run_in_transaction(unit)
    except Conflict:
        if not await db.read(tenancy.is_linked, org_id, project_id, product_id):
            raise
        return False
    return True


async def unlink_product(db: Database, project_id: str, product_id: str, now: datetime) -> bool:
    """Unlink a product from a project, with its audit row. False if not linked."""
    return await _removed(
        db,
        lambda conn: tenancy.get_by_id(conn, projects, project_id),
        lambda conn: tenancy.delete_link(conn, project_id, product_id),
        "project.product_unlinked",
        lambda project: (project.org_id, project_id),
        lambda _: {"project_id": project_id, "product_id": product_id},
        now,
    )


# --- keys ---------------------------------------------------------------------------------


async def create_key(
    db: Database,
    row: Mapping[str, Any],
    limits: Sequence[RateLimit],
    budget_specs: Sequence[BudgetSpec],
) -> None:
    """Insert a key with its own rate limits and budgets, in one transaction, after
    checking in that transaction that its project and product belong to its
    organization (and are linked, when both are given): never a key without its caps.

    Raises:
        NotFoundError: the organization, project or product.
        InvalidArgumentError: a product not linked to the key's project.
    """
    org_id = row["org_id"]

    async def unit() -> None:
        async with db.begin() as conn:
            await insert_key(conn, row, limits, budget_specs, "key.created")

    try:
        await db.guarded(unit)
    except Conflict:
        if await db.read(tenancy.get_by_id, tenancy.TABLES[ids.ORG], org_id) is None:
            raise NotFoundError("organization", org_id) from None
        raise


async def delegate(
    db: Database,
    parent_id: str,
    child_row: Callable[[AnyRow], Mapping[str, Any]],
    limits: Sequence[RateLimit],
    budget_specs: Sequence[BudgetSpec],
    max_depth: int,
    now: datetime,
) -> Mapping[str, Any]:
    """Mint a child of the key ``parent_id``, in one transaction that holds the
    parent's row lock (so a concurrent ``update_key`` narrows the child too):
    ``child_row(parent)`` decides the child's row from the parent's
    (``keycap._rules.delegation``); the row inserted.

    Raises:
        NotFoundError: no such parent (or its project or product went meanwhile).
        RevokedKeyError, DisabledKeyError, ExpiredKeyError: the parent (or one of
            its ancestors, or its identity) cannot delegate.
        InvalidArgumentError: too deep, or the child would exceed its parent.
    """

    async def unit() -> Mapping[str, Any]:
        async with db.begin() as conn:
            parent = await keys.lock_key_state(conn, parent_id)
            if parent is None:
                raise NotFoundError("key", parent_id)
            # The grant rule's state steps, as a validation would take them.
            facts = policy.without_addresses(rows.to_facts(parent, digest_ok=True))
            policy.check(facts, policy.Requirement(), now)
            depth = sum(1 for name in ANCESTORS if parent._mapping[name] is not None) + 1
            if depth > max_depth:
                raise InvalidArgumentError(
                    "key_id", f"delegated keys go at most {max_depth} levels below their root"
                )
            row = child_row(parent)
            await insert_key(conn, row, limits, budget_specs, "key.delegated")
            return row

    return await db.guarded(unit)


async def insert_key(
    conn: AsyncConnection,
    row: Mapping[str, Any],
    limits: Sequence[RateLimit],
    budget_specs: Sequence[BudgetSpec],
    action: str,
) -> None:
    org_id, project_id, product_id = row["org_id"], row["project_id"], row["product_id"]
    identity_id = row.get("identity_id")
    own = tenancy.Subject(row["id"], org_id, project_id, row["id"])
    now = row["created_at"]
    for table, resource, id_ in (
        (projects, "project", project_id),
        (products, "product", product_id),
        (identities, "identity", identity_id),
    ):
        if id_ is not None and not await tenancy.owned_by(conn, table, id_, org_id):
            raise NotFoundError(resource, id_)
    if (
        project_id is not None
        and product_id is not None
        and not await tenancy.is_linked(conn, org_id, project_id, product_id)
    ):
        raise InvalidArgumentError(
            "product_id",
            "is not linked to the key's project (add_product_to_project first)",
        )
    await tenancy.check_scopes(conn, org_id, scope_rules.decode(row["scopes"]))
    await keys.insert_key(conn, row)
    limit_rows = [rate_limits.new_rate_limit_row(own, limit, now) for limit in limits]
    await rate_limits.insert_rate_limits(conn, limit_rows)
    await budgets.insert_budgets(
        conn, [budgets.new_budget_row(own, spec, now) for spec in budget_specs]
    )
    after = audit.key_state(row)
    assert after is not None
    after["budgets"] = [
        {
            "limit": money.plain(money.from_micros(s.limit_micros)),
            "period": s.period.value,
            "meter": s.meter,
        }
        for s in budget_specs
    ]
    after["rate_limits"] = [audit.plain_state(r, *_LIMIT) for r in limit_rows]
    await audit.write(
        conn, org_id=org_id, action=action, subject_id=row["id"], before=None, after=after, now=now
    )


async def retire_keys(db: Database, column: str, value: str, now: datetime) -> None:
    """Before keys are deleted: revoke them, so no new hold can start, then release
    their open holds, so none is left holding a project's or organization's budget."""
    await db.run_in_transaction(keys.revoke_keys_where, column, value, now)
    for hold_id in await db.read(holds.open_hold_ids, column, value):
        with contextlib.suppress(HoldClosedError):  # settled or expired meanwhile
            await release(db, hold_id=hold_id, idempotency_key=None, now=now)


# --- rate limits and budgets ------------------------------------------------------------


async def subject(db: Database, subject_id: str) -> tenancy.Subject:
    """Raises: NotFoundError."""
    found = await db.read(tenancy.find_subject, subject_id)
    if found is None:
        raise NotFoundError(tenancy.scope_of(subject_id), subject_id)
    return found


async def set_rate_limit(db: Database, subject_id: str, limit: RateLimit, now: datetime) -> AnyRow:
    """Create or change (by name) a limit. Changing the window starts counting afresh."""
    owner = await subject(db, subject_id)
    row = rate_limits.new_rate_limit_row(owner, limit, now)

    async def limited(conn: AsyncConnection, write: Any) -> None:
        def find(c: AsyncConnection) -> Awaitable[AnyRow | None]:
            return rate_limits.get_rate_limit(c, row["subject_id"], row["name"])

        await _audited(
            conn,
            await find(conn),
            write,
            find,
            "rate_limit.set",
            lambda _: (owner.org_id, subject_id),
            lambda r: audit.plain_state(r, *_LIMIT),
            now,
        )

    try:
        await db.run_in_transaction(
            limited, lambda conn: rate_limits.insert_rate_limits(conn, [row])
        )
    except Conflict:
        await db.run_in_transaction(limited, lambda conn: rate_limits.change_rate_limit(conn, row))
    found = await db.read(rate_limits.get_rate_limit, row["subject_id"], row["name"])
    assert found is not None
    return found


async def remove_rate_limit(db: Database, subject_id: str, name: str, now: datetime) -> bool:
    """Delete a rate limit by name, with its audit row; False if there was none."""
    return await _removed(
        db,
        lambda conn: rate_limits.get_rate_limit(conn, subject_id, name),
        lambda conn: rate_limits.delete_rate_limit(conn, subject_id, name),
        "rate_limit.removed",
        lambda row: (row.org_id, subject_id),
        lambda row: audit.plain_state(row, *_LIMIT),
        now,
    )


async def set_budget(db: Database, subject_id: str, spec: BudgetSpec, now: datetime) -> AnyRow:
    """Create or change a budget (one per subject, meter and period). Changing the
    limit keeps what was used and held."""
    owner = await subject(db, subject_id)
    row = budgets.new_budget_row(owner, spec, now)

    async def budgeted(conn: AsyncConnection, write: Any) -> Any:
        def find(c: AsyncConnection) -> Awaitable[AnyRow | None]:
            return budgets.find_budget(c, row)

        done, _ = await _audited(
            conn,
            await find(conn),
            write,
            find,
            "budget.set",
            lambda _: (owner.org_id, subject_id),
            lambda r: audit.plain_state(r, *_BUDGET),
            now,
        )
        return done

    try:
        await db.run_in_transaction(budgeted, lambda conn: budgets.insert_budgets(conn, [row]))
    except Conflict:
        if not await db.run_in_transaction(
            budgeted, lambda conn: budgets.change_budget(conn, row, now)
        ):
            if await db.read(budgets.find_budget, row) is not None:
                raise InvalidArgumentError(
                    "limit", f"plus the budget's credit must be at most {MAX_UNITS}"
                ) from None
            raise  # removed meanwhile: the conflict stands as it is
    found = await db.read(budgets.find_budget, row)
    assert found is not None
    return found


async def swept_budgets(db: Database, subject_id: str, now: datetime) -> Sequence[AnyRow]:
    """The budgets attached to a subject, holds past their ttl returned to them first."""
    for budget in await db.read(budgets.budgets_of, subject_id):
        await sweep(db, now, budget_id=budget.id)
    return await db.read(budgets.budgets_of, subject_id)


async def key_budgets(db: Database, key: KeyRef, now: datetime) -> Sequence[AnyRow]:
    """Every budget that applies to the key, holds past their ttl returned first."""
    rows = await db.read(budgets.every_applicable_budget, key)
    swept = 0
    for row in rows:
        if row.held_micros:
            swept += await sweep(db, now, budget_id=row.id)
    return await db.read(budgets.every_applicable_budget, key) if swept else rows


async def grant_credit(db: Database, budget_id: str, micros: int, now: datetime) -> AnyRow:
    """Top up a budget for its current period, and record it in the ledger.

    Raises: NotFoundError.
    """

    async def unit() -> AnyRow:
        async with db.begin() as conn:
            row = await budgets.get_budget(conn, budget_id)
            if row is None:
                raise NotFoundError("budget", budget_id)
            after = await budgets.add_credit(conn, row, micros, now)
            if after is None:
                raise InvalidArgumentError(
                    "amount", f"would take the budget's limit plus credit above {MAX_UNITS}"
                )
            await ledger.insert_ledger(conn, [movements.topup(after, micros, now)])
            await audit.write(
                conn,
                org_id=row.org_id,
                action="budget.credited",
                subject_id=row.subject_id,
                before=audit.plain_state(row, *_BUDGET),
                after=audit.plain_state(after, *_BUDGET),
                now=now,
            )
            return after

    return await retrying(db, unit)


async def update_key(db: Database, key_id: str, values: Mapping[str, Any]) -> AnyRow | None:
    """Apply ``values`` to the key in one transaction, with its audit row; new
    ``scopes`` are checked there against its organization's allowed scopes. None:
    no such key."""

    now = values["updated_at"]
    grants = values.keys() & _GRANTS

    async def change(conn: AsyncConnection) -> AnyRow | None:
        if grants:  # scopes among them
            current = await keys.get_key(conn, key_id)
            if current is None:
                return None
            if "scopes" in values:
                scopes = scope_rules.decode(values["scopes"])
                await tenancy.check_scopes(conn, current.org_id, scopes)
            parent_id = current._mapping["ancestor_1"]
            if parent_id is not None:  # a delegated key stays inside its parent
                parent = await keys.lock_key_state(conn, parent_id)
                assert parent is not None  # deleting it deletes this key
                asked = delegation.Grants.of({**rows.as_mapping(current), **values})
                delegation.child(delegation.Grants.of(parent._mapping), asked, inherit=frozenset())
        changed = await keys.update_key(conn, key_id, values)
        if changed is not None and grants:
            await _narrow_descendants(conn, changed, now)
        return changed

    return await change_key(db, key_id, "key.updated", change, now)


#: What a delegated key must stay within its parent in, among ``update_key``'s values.
_GRANTS = frozenset({"scopes", "expires_at", "allowed_ips"})


async def _narrow_descendants(conn: AsyncConnection, key: AnyRow, now: datetime) -> None:
    """After ``key``'s grants changed: bring each of its descendants, a generation at
    a time, back inside its parent (``delegation.narrowed``), each change with its
    audit row. The validation statement can then trust a child's own row."""
    granted = {key.id: delegation.Grants.of(key._mapping)}
    generation = [key.id]
    while generation:
        children = await keys.children_of(conn, generation)
        generation = []
        for child in children:
            had = delegation.Grants.of(child._mapping)
            now_has = delegation.narrowed(granted[child.ancestor_1], had)
            granted[child.id] = now_has
            generation.append(child.id)
            if now_has == had:
                continue
            values = {
                "scopes": scope_rules.encode(now_has.scopes),
                "expires_at": now_has.expires_at,
                "allowed_ips": ips.stored(now_has.allowed_ips),
                "updated_at": now,
            }
            after = await keys.update_key(conn, child.id, values)
            await audit.write(
                conn,
                org_id=child.org_id,
                action="key.narrowed",
                subject_id=child.id,
                before=audit.key_state(child),
                after=audit.key_state(after),
                now=now,
            )


async def set_allowed_scopes(
    db: Database, org_id: str, allowed: tuple[str, ...] | None, now: datetime
) -> AnyRow | None:
    """Fix (or, with None, lift) the scopes an organization's keys may be granted;
    the organization as it now is, or None if there is none."""

    stored = None if allowed is None else scope_rules.encode(allowed)

    def find(conn: AsyncConnection) -> Awaitable[AnyRow | None]:
        return tenancy.get_by_id(conn, organizations, org_id)

    def write(conn: AsyncConnection) -> Awaitable[Any]:
        return conn.execute(
            update(organizations).where(organizations.c.id == org_id).values(allowed_scopes=stored)
        )

    async def unit(conn: AsyncConnection) -> AnyRow | None:
        before = await find(conn)
        if before is None:
            return None
        _, after = await _audited(
            conn,
            before,
            write,
            find,
            "organization.allowed_scopes",
            lambda _: (org_id, org_id),
            lambda r: audit.plain_state(r, *_NAMED),
            now,
        )
        return after

    return await db.run_in_transaction(unit)


# --- changes to a key, with their audit rows --------------------------------------------

#: What the audit log keeps of an organization, project or product; of a rate
#: limit; of a budget (what an administrator sets, not what use moves).
_NAMED = ("id", "org_id", "name", "allowed_scopes")
_LIMIT = ("id", "subject_id", "name", "meter", "limit_units", "window_ms")
_BUDGET = (
    "id",
    "subject_id",
    "meter",
    "period",
    "anchor_day",
    "limit_micros",
    "credit_micros",
    "thresholds",
)


async def change_key(
    db: Database,
    key_id: str,
    action: str,
    change: Callable[[AsyncConnection], Awaitable[AnyRow | None]],
    now: datetime,
) -> AnyRow | None:
    """``change(conn)`` of the key, with its audit row, in one transaction; the key
    after it, or None if there is no such key."""

    def find(conn: AsyncConnection) -> Awaitable[AnyRow | None]:
        return keys.get_key_audited(conn, key_id)

    async def unit(conn: AsyncConnection) -> AnyRow | None:
        before = await find(conn)
        if before is None:
            return None
        changed: AnyRow | None
        changed, _ = await _audited(
            conn,
            before,
            change,
            find,
            action,
            lambda _: (before.org_id, key_id),
            audit.key_state,
            now,
        )
        return changed

    return await db.run_in_transaction(unit)


async def remove_budget(db: Database, budget_id: str, now: datetime) -> bool:
    """Delete a budget, with its audit row; False if there was none."""
    return await _removed(
        db,
        lambda conn: budgets.get_budget(conn, budget_id),
        lambda conn: budgets.delete_budget(conn, budget_id),
        "budget.removed",
        lambda row: (row.org_id, row.subject_id),
        lambda row: audit.plain_state(row, *_BUDGET),
        now,
    )


async def _removed(
    db: Database,
    find: Callable[[AsyncConnection], Awaitable[AnyRow | None]],
    delete: Callable[[AsyncConnection], Awaitable[bool]],
    action: str,
    where: Callable[[Any], tuple[str, str]],
    state: Callable[[Any], dict[str, Any] | None],
    now: datetime,
) -> bool:
    """``delete`` what ``find`` finds, with its audit row (``where``: its organization
    and subject; ``state``: what the log keeps of it), in one transaction. False:
    there was nothing to delete."""

    async def unit(conn: AsyncConnection) -> bool:
        before = await find(conn)
        if before is None or not await delete(conn):
            return False
        org_id, subject_id = where(before)
        await audit.write(
            conn,
            org_id=org_id,
            action=action,
            subject_id=subject_id,
            before=state(before),
            after=None,  # gone (for a link, ``find`` finds the project, still there)
            now=now,
        )
        return True

    return await db.run_in_transaction(unit)


async def _audited(
    conn: AsyncConnection,
    before: Any,
    write: Callable[[AsyncConnection], Awaitable[Any]],
    find: Callable[[AsyncConnection], Awaitable[AnyRow | None]],
    action: str,
    where: Callable[[Any], tuple[str, str]],
    state: Callable[[Any], dict[str, Any] | None],
    now: datetime,
) -> tuple[Any, AnyRow | None]:
    """In ``conn``'s transaction: ``write``, then the audit row of the change from
    ``before`` to what ``find`` finds after it (``where``: the organization and
    subject; ``state``: what the log keeps of a row; no row if nothing changed).
    ``(what write returned, the row after)``."""
    done = await write(conn)
    after = await find(conn)
    org_id, subject_id = where(before if before is not None else after)
    await audit.write(
        conn,
        org_id=org_id,
        action=action,
        subject_id=subject_id,
        before=state(before),
        after=state(after),
        now=now,
    )
    return done, after


# --- identities ---------------------------------------------------------------------------

_IDENTITY = ("id", "org_id", "external_id", "name", "metadata", "disabled_at", "allowed_ips")


async def get_or_create_identity(
    db: Database,
    org_id: str,
    external_id: str,
    name: str,
    meta: Mapping[str, Any],
    now: datetime,
    allowed_ips: str | None = None,
) -> tuple[AnyRow | Mapping[str, Any], bool]:
    """The organization's identity with that external id, created if missing (with
    its audit row). Safe to call concurrently: exactly one caller creates it.

    Raises: NotFoundError (the organization).
    """
    existing = await db.read(tenancy.find_identity, org_id, external_id)
    if existing is not None:
        return existing, False
    identity_id = ids.new_id(ids.IDENTITY)
    values: dict[str, Any] = {
        "id": identity_id,
        "org_id": org_id,
        "external_id": external_id,
        "name": name,
        "metadata": dict(meta),
        "created_at": now,
        "updated_at": now,
        "disabled_at": None,
        "allowed_ips": allowed_ips,
    }

    async def unit(conn: AsyncConnection) -> None:
        await tenancy.insert_identity(conn, values)
        await audit.write(
            conn,
            org_id=org_id,
            action="identity.created",
            subject_id=identity_id,
            before=None,
            after=audit.plain_state(values, *_IDENTITY),
            now=now,
        )

    try:
        await db.run_in_transaction(unit)
    except Conflict:
        winner = await db.read(tenancy.find_identity, org_id, external_id)
        if winner is not None:  # lost a race with another creator: theirs is the one
            return winner, False
        raise NotFoundError("organization", org_id) from None
    return values, True


async def update_identity(
    db: Database,
    identity_id: str,
    action: str,
    values: Mapping[str, Any],
    now: datetime,
    only_if: Any = None,
) -> AnyRow | None:
    """Change an identity (name, metadata, disabled), with its audit row, when
    ``only_if`` holds; the identity as it now is, or None if there is none."""

    def find(conn: AsyncConnection) -> Awaitable[AnyRow | None]:
        return tenancy.get_by_id(conn, identities, identity_id)

    async def unit(conn: AsyncConnection) -> AnyRow | None:
        before = await find(conn)
        if before is None:
            return None
        _, after = await _audited(
            conn,
            before,
            lambda c: tenancy.update_identity(c, identity_id, values, only_if),
            find,
            action,
            lambda _: (before.org_id, identity_id),
            lambda r: audit.plain_state(r, *_IDENTITY),
            now,
        )
        return after

    return await db.run_in_transaction(unit)
