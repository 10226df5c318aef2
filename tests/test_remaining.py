"""``remaining(key_id)``: what a key can still spend, which budget binds, and when
it resets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

import pytest

from keycap import APIKeyClient, Budget, NotFoundError
from tests.conftest import FakeClock


async def _org_and_project(client: APIKeyClient) -> tuple[str, str]:
    org = await client.create_organization("A")
    project = await client.create_project(org.id, "agents")
    return org.id, project.id


async def test_an_organization_budget_alone_is_what_the_key_can_spend(
    client: APIKeyClient,
) -> None:
    org, _ = await _org_and_project(client)
    issued = await client.create_key(org)
    await client.set_budget(org, Budget(D("20.00"), "lifetime"))
    await client.charge(issued.id, D("1.25"))
    assert await client.get_budgets(issued.id) == []  # nothing on the key itself
    [spend] = await client.remaining(issued.id)
    assert (spend.meter, spend.amount, spend.binding.scope) == ("spend", D("18.75"), "organization")
    assert spend.reset_at is None  # a lifetime budget never resets


async def test_the_tightest_budget_binds_and_says_when_it_resets(
    client: APIKeyClient, clock: FakeClock
) -> None:
    org, project = await _org_and_project(client)
    issued = await client.create_key(org, project_id=project, budgets=[Budget(D("10.00"), "month")])
    await client.set_budget(project, Budget(D("3.00"), "day"))
    await client.set_budget(org, Budget(D("100.00"), "lifetime"))
    await client.charge(issued.id, D("1.00"))
    [spend] = await client.remaining(issued.id)
    assert (spend.amount, spend.binding.scope, spend.binding.period) == (
        D("2.00"),
        "project",
        "day",
    )
    midnight = datetime(clock.now.year, clock.now.month, clock.now.day, tzinfo=UTC)
    assert spend.reset_at == midnight + timedelta(days=1)
    assert [b.scope for b in spend.budgets] == ["project", "key", "organization"]
    assert [b.remaining for b in spend.budgets] == [D("2.00"), D("9.00"), D("99.00")]


async def test_each_meter_is_listed_on_its_own_and_a_tie_binds_the_most_specific(
    client: APIKeyClient,
) -> None:
    org, _ = await _org_and_project(client)
    issued = await client.create_key(
        org, budgets=[Budget(D(5), "lifetime"), Budget(D(1000), "month", meter="tokens")]
    )
    await client.set_budget(org, Budget(D(5), "lifetime"))
    await client.set_budget(org, Budget(D(400), "month", meter="tokens"))
    found = await client.remaining(issued.id)
    assert [(r.meter, r.amount, r.binding.scope) for r in found] == [
        ("spend", D(5), "key"),  # equal to the organization's: the key's own binds
        ("tokens", D(400), "organization"),
    ]


async def test_a_hold_past_its_ttl_is_returned_before_reporting(
    client: APIKeyClient, clock: FakeClock
) -> None:
    org, _ = await _org_and_project(client)
    issued = await client.create_key(org, budgets=[Budget(D(1), "lifetime")])
    await client.reserve(issued.id, D("0.40"), ttl="60s")
    assert (await client.remaining(issued.id))[0].amount == D("0.60")
    clock.advance(seconds=61)
    assert (await client.remaining(issued.id))[0].amount == D(1)


async def test_a_key_without_budgets_has_nothing_listed(client: APIKeyClient) -> None:
    org, _ = await _org_and_project(client)
    assert await client.remaining((await client.create_key(org)).id) == []


async def test_an_unknown_key_is_not_found(client: APIKeyClient) -> None:
    with pytest.raises(NotFoundError):
        await client.remaining("key_AAAAAAAAAAAA")
