"""Access requests as units of work: asking, deciding, claiming. Each runs in one
transaction with its audit row; a status changes only by a conditional UPDATE
from the status it starts from (``keycap._db.access.move``), so a request is
decided once and claimed once, whoever races."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db import access as statements
from keycap._db import rows, tenancy
from keycap._db.build import AnyRow
from keycap._db.engine import Database
from keycap._db.schema import identities, organizations, products, projects
from keycap._errors import AccessNotGrantedError, NotFoundError
from keycap._ops import admin, audit
from keycap._rules import access
from keycap._rules.budgets import BudgetSpec

#: What the audit log keeps of a request (never the claim secret's digest).
_STATE = (
    "id",
    "requester",
    "reason",
    "identity_id",
    "asked",
    "granted",
    "status",
    "expires_at",
    "decided_by",
    "decision_reason",
    "key_id",
)


def _state(row: Any) -> dict[str, Any] | None:
    return audit.plain_state(row, *_STATE)


def decision(status: str, now: datetime, reason: str | None, **more: Any) -> dict[str, Any]:
    """The values of a decision (approved or denied), by the current actor."""
    return {
        "status": status,
        "decided_at": now,
        "decided_by": audit.ACTOR.get(),
        "decision_reason": reason,
        **more,
    }


async def request(db: Database, values: Mapping[str, Any]) -> None:
    """Record a new request with its audit row, after checking that what it names
    is the organization's and its scopes are ones the organization allows.

    Raises: NotFoundError (the organization, project, product or identity),
    InvalidArgumentError (a scope the organization does not allow)."""

    org_id = values["org_id"]
    asked = access.Terms.from_json(values["asked"])

    async def unit(conn: AsyncConnection) -> None:
        if await tenancy.get_by_id(conn, organizations, org_id) is None:
            raise NotFoundError("organization", org_id)
        for table, resource, id_ in (
            (projects, "project", asked.project_id),
            (products, "product", asked.product_id),
            (identities, "identity", values["identity_id"]),
        ):
            if id_ is not None and not await tenancy.owned_by(conn, table, id_, org_id):
                raise NotFoundError(resource, id_)
        await tenancy.check_scopes(conn, org_id, asked.scopes)
        await statements.insert_request(conn, values)
        await audit.write(
            conn,
            org_id=values["org_id"],
            action="access.requested",
            subject_id=values["id"],
            before=None,
            after=_state(values),
            now=values["created_at"],
        )

    await db.run_in_transaction(unit)


async def decide(
    db: Database,
    request_id: str,
    values: Callable[[access.Terms], Mapping[str, Any]],
    action: str,
    now: datetime,
) -> AnyRow:
    """Approve or deny a pending request: ``values(asked)`` is what changes. The
    request after it.

    Raises: NotFoundError, AccessNotGrantedError (not pending), InvalidArgumentError.
    """

    async def unit(conn: AsyncConnection) -> AnyRow:
        before = await _found(conn, request_id)
        changes = values(access.Terms.from_json(before.asked))
        if not await statements.move(conn, request_id, "pending", changes, now):
            raise _not_open(await _found(conn, request_id), now, claiming=False)
        after = await statements.get_request(conn, request_id)
        assert after is not None
        await audit.write(
            conn,
            org_id=before.org_id,
            action=action,
            subject_id=request_id,
            before=_state(before),
            after=_state(after),
            now=now,
        )
        return after

    return await db.run_in_transaction(unit)


async def claim(
    db: Database,
    request_id: str,
    verify: Callable[[str, str], bool],
    key_row: Callable[[AnyRow, access.Terms], Mapping[str, Any]],
    now: datetime,
) -> Mapping[str, Any]:
    """Issue the key of an approved request, once: ``verify(pepper_id, digest)``
    checks the claim secret; ``key_row(request, granted)`` is the key's row. The
    key's row as inserted.

    Raises:
        NotFoundError: no such request, or the wrong claim secret (the same
            answer, so a guess learns nothing).
        AccessNotGrantedError: pending, denied, claimed or expired.
    """

    async def unit() -> Mapping[str, Any]:
        async with db.begin() as conn:
            found = await _found(conn, request_id)
            if not verify(found.claim_pepper_id, found.claim_digest):
                raise NotFoundError("access request", request_id)
            if found.granted is None or found.status != "approved":
                raise _not_open(found, now)
            granted = access.Terms.from_json(found.granted)
            row = key_row(found, granted)
            specs = [BudgetSpec.of(b) for b in granted.budgets]
            await admin.insert_key(conn, row, [], specs, "key.created")
            claimed = {"status": "claimed", "key_id": row["id"], "claimed_at": now}
            if not await statements.move(conn, request_id, "approved", claimed, now):
                raise _not_open(found, now)  # rolls the key back
            await audit.write(
                conn,
                org_id=found.org_id,
                action="access.claimed",
                subject_id=request_id,
                before=_state(found),
                after=_state({**rows.as_mapping(found), **claimed}),
                now=now,
            )
            return row

    return await db.guarded(unit)


async def _found(conn: AsyncConnection, request_id: str) -> AnyRow:
    found = await statements.get_request(conn, request_id)
    if found is None:
        raise NotFoundError("access request", request_id)
    return found


def _not_open(row: AnyRow, now: datetime, claiming: bool = True) -> AccessNotGrantedError:
    """Why the request ``row`` (as last read) could not be claimed (decided)."""
    status = access.status_at(row.status, row.expires_at, now)
    if claiming and status == "approved":  # a concurrent claim won, after our read
        status = "claimed"
    return AccessNotGrantedError(status, row.decision_reason if status == "denied" else None)
