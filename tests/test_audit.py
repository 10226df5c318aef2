"""The audit log: every administrative change leaves one row, in its own transaction."""

from __future__ import annotations

import asyncio
import itertools
from decimal import Decimal as D
from typing import Any

import pytest
from sqlalchemy import func, select

from keycap import (
    APIKeyClient,
    Budget,
    InvalidArgumentError,
    NotFoundError,
    RateLimit,
)
from keycap._db.schema import audit
from tests.conftest import FakeClock


async def test_every_change_to_a_key_is_recorded_with_who_and_what(
    client: APIKeyClient, clock: FakeClock
) -> None:
    org = (await client.create_organization("Acme")).id
    with client.acting_as("alice@acme"):
        issued = await client.create_key(
            org, name="agent", scopes=["chat:write"], budgets=[Budget(D("5"))],
            rate_limits=[RateLimit(10, "minute")],
        )  # fmt: skip
        await client.validate_key(issued.plaintext)  # use is not an administrative change
        clock.advance(minutes=1)
        await client.update_key(issued.id, name="billing agent")
        await client.roll_key(issued.id, grace="0s")
        await client.disable_key(issued.id)
        await client.disable_key(issued.id)  # no change: no row
        await client.enable_key(issued.id)
    await client.revoke_key(issued.id)  # no actor said
    entries = await client.audit_log(org, subject_id=issued.id)
    assert [e.action for e in entries] == [
        "key.revoked",
        "key.enabled",
        "key.disabled",
        "key.rolled",
        "key.updated",
        "key.created",
    ]
    assert [e.actor for e in entries] == [None] + ["alice@acme"] * 5
    created, updated = entries[-1], entries[-2]
    assert created.before is None and created.after is not None
    assert created.after["name"] == "agent" and created.after["scopes"] == ["chat:write"]
    assert created.after["budgets"] == [{"limit": "5", "period": "month", "meter": "spend"}]
    [limit] = await client.get_rate_limits(issued.id)
    assert [r["id"] for r in created.after["rate_limits"]] == [limit.id]  # the row inserted
    assert updated.before is not None and updated.after is not None
    assert (updated.before["name"], updated.after["name"]) == ("agent", "billing agent")
    assert updated.at == clock.now and created.at < updated.at
    assert entries[0].after is not None and entries[0].after["revoked_at"] is not None
    # No secret anywhere: not the plaintext, not a digest.
    text = repr([e.model_dump() for e in entries])
    assert issued.plaintext not in text and "digest" not in text and "pepper" not in text
    assert all(e.id > f.id for e, f in itertools.pairwise(entries))


async def test_budget_limit_and_tenancy_changes_are_recorded(client: APIKeyClient) -> None:
    org = (await client.create_organization("Acme")).id
    with client.acting_as("ops"):
        project = await client.create_project(org, "agents")
        product = await client.create_product(org, "chat")
        await client.add_product_to_project(product.id, project.id)
        await client.remove_product_from_project(product.id, project.id)
        budget = await client.set_budget(org, Budget(D("100")))
        await client.set_budget(org, Budget(D("150")))
        await client.grant_credit(budget.id, D("25"))
        await client.remove_budget(budget.id)
        limit = await client.set_rate_limit(project.id, RateLimit(50, "minute"))
        assert await client.remove_rate_limit(project.id, limit.name)
        await client.set_allowed_scopes(org, ["chat:*"])
        await client.delete_product(product.id)
    actions = [e.action for e in reversed(await client.audit_log(org))]
    assert actions == [
        "organization.created",  # recorded without an actor: before acting_as
        "project.created",
        "product.created",
        "project.product_linked",
        "project.product_unlinked",
        "budget.set",
        "budget.set",
        "budget.credited",
        "budget.removed",
        "rate_limit.set",
        "rate_limit.removed",
        "organization.allowed_scopes",
        "product.deleted",
    ]
    changed = (await client.audit_log(org, action="budget.set"))[0]
    assert changed.before is not None and changed.after is not None
    assert (changed.before["limit_micros"], changed.after["limit_micros"]) == (
        100_000_000,
        150_000_000,
    )
    credited = (await client.audit_log(org, action="budget.credited"))[0]
    assert credited.after is not None and credited.after["credit_micros"] == 25_000_000
    scoped = (await client.audit_log(org, action="organization.allowed_scopes"))[0]
    assert scoped.after is not None and scoped.after["allowed_scopes"] == " chat:* "


async def test_the_log_pages_newest_first_and_stays_in_its_organization(
    client: APIKeyClient,
) -> None:
    org = (await client.create_organization("Acme")).id
    other = (await client.create_organization("Other")).id
    for n in range(7):
        await client.create_key(org, name=f"k{n}")
    await client.create_key(other, name="theirs")
    first = await client.audit_log(org, limit=3)
    second = await client.audit_log(org, limit=3, before=first[-1].id)
    third = await client.audit_log(org, limit=3, before=second[-1].id)
    names = [e.after["name"] for e in first + second + third if e.after and "name" in e.after]
    assert names == ["k6", "k5", "k4", "k3", "k2", "k1", "k0", "Acme"]
    assert all(e.org_id == org for e in first + second + third)
    with pytest.raises(InvalidArgumentError):
        await client.audit_log(org, before="x")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        await client.audit_log(org, limit=0)
    with pytest.raises(InvalidArgumentError), client.acting_as(" padded "):
        pass


async def test_a_refused_change_leaves_no_row_and_the_row_outlives_its_subject(
    client: APIKeyClient,
) -> None:
    org = (await client.create_organization("Acme")).id
    await client.set_allowed_scopes(org, ["chat:*"])
    before = await count_rows(client)
    with pytest.raises(InvalidArgumentError):
        await client.create_key(org, scopes=["admin"])
    with pytest.raises(NotFoundError):
        await client.revoke_key("key_AAAAAAAAAAAA")
    assert await count_rows(client) == before
    issued = await client.create_key(org, name="short-lived")
    await client.delete_key(issued.id)
    await client.delete_organization(org)
    entries = await client.audit_log(org)  # the organization is gone; its record is not
    assert [e.action for e in entries[:3]] == ["organization.deleted", "key.deleted", "key.created"]
    assert entries[1].before is not None and entries[1].before["revoked_at"] is not None


async def test_concurrent_requests_each_keep_their_actor(client: APIKeyClient) -> None:
    org = (await client.create_organization("Acme")).id

    async def as_(actor: str) -> None:
        with client.acting_as(actor):
            for _ in range(3):
                await client.create_key(org, name=actor)
                await asyncio.sleep(0)

    await asyncio.gather(as_("alice"), as_("bob"))
    entries = [e for e in await client.audit_log(org, action="key.created")]
    assert len(entries) == 6
    assert all(e.after is not None and e.after["name"] == e.actor for e in entries)


async def count_rows(client: APIKeyClient) -> Any:
    async with client.engine.connect() as conn:
        return await conn.scalar(select(func.count()).select_from(audit))
