"""Identities: a person or system of the user's, owning keys; disabling it refuses them all."""

from __future__ import annotations

import asyncio
from decimal import Decimal as D
from typing import Any

import pytest

from keycap import (
    APIKeyClient,
    Budget,
    BudgetExceededError,
    DisabledKeyError,
    InvalidArgumentError,
    NotFoundError,
    RateLimit,
    RateLimitedError,
)
from tests._ledger import assert_balances_match_ledger
from tests.conftest import REPORT, SECRET, FakeClock


async def test_an_identity_is_found_by_its_external_id_and_created_once(
    client: APIKeyClient,
) -> None:
    org = (await client.create_organization("Acme")).id
    made = await asyncio.gather(
        *(
            client.get_or_create_identity(org, "auth0|42", name="Ada", metadata={"plan": "pro"})
            for _ in range(8)
        )
    )
    assert sum(created for _, created in made) == 1
    assert len({identity.id for identity, _ in made}) == 1
    identity = made[0][0]
    assert identity.id.startswith("idn_") and identity.external_id == "auth0|42"
    again, created = await client.get_or_create_identity(org, "auth0|42", name="ignored")
    assert (again.id, again.name, created) == (identity.id, "Ada", False)
    other = (await client.create_organization("Other")).id
    theirs, _ = await client.get_or_create_identity(other, "auth0|42")
    assert theirs.id != identity.id  # external ids are per organization
    assert [i.id for i in await client.list_identities(org)] == [identity.id]
    renamed = await client.update_identity(identity.id, name="Ada L.")
    assert renamed.name == "Ada L." and renamed.metadata == {"plan": "pro"}
    with pytest.raises(NotFoundError):
        await client.get_or_create_identity("org_AAAAAAAAAAAAAAAA", "x")
    with pytest.raises(InvalidArgumentError):
        await client.get_or_create_identity(org, "")
    with pytest.raises(NotFoundError):
        await client.get_identity("idn_AAAAAAAAAAAAAAAA")


async def test_keys_belong_to_an_identity_of_their_own_organization(
    client: APIKeyClient,
) -> None:
    org = (await client.create_organization("Acme")).id
    other = (await client.create_organization("Other")).id
    ada, _ = await client.get_or_create_identity(org, "ada")
    theirs, _ = await client.get_or_create_identity(other, "bob")
    first = await client.create_key(org, name="laptop", identity_id=ada.id)
    await client.create_key(org, name="server")
    assert first.key.identity_id == ada.id
    assert (await client.get_key(first.id)).identity_id == ada.id
    listed = await client.list_keys(org_id=org, identity_id=ada.id)
    assert [k.name for k in listed] == ["laptop"]
    with pytest.raises(NotFoundError) as refused:
        await client.create_key(org, identity_id=theirs.id)
    assert refused.value.resource == "identity"


PATHS: dict[str, dict[str, Any]] = {
    "read": {},
    "tracked": {"track_usage": True},
    "metered": {"cost": D("0.01")},
}


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_disabling_an_identity_refuses_all_its_keys_at_once(
    client: APIKeyClient, clock: FakeClock, path: str
) -> None:
    org = (await client.create_organization("Acme")).id
    ada, _ = await client.get_or_create_identity(org, "ada")
    hers = [
        await client.create_key(org, identity_id=ada.id, budgets=[Budget(D("1"))]),
        await client.create_key(org, identity_id=ada.id, rate_limits=[RateLimit(100, "minute")]),
    ]
    someone_elses = await client.create_key(org, budgets=[Budget(D("1"))])
    options = PATHS[path]
    for issued in hers:
        await client.validate_key(issued.plaintext, **options)
    disabled = await client.disable_identity(ada.id)
    assert disabled.disabled_at == clock.now
    clock.advance(seconds=1)
    assert (await client.disable_identity(ada.id)).disabled_at == disabled.disabled_at
    for issued in hers:
        with pytest.raises(DisabledKeyError) as refused:
            await client.validate_key(issued.plaintext, **options)
        assert refused.value.identity is True
        assert refused.value.to_dict()["identity"] is True
        assert refused.value.disabled_at == disabled.disabled_at
    await client.validate_key(someone_elses.plaintext, **options)
    with pytest.raises(DisabledKeyError):  # a charge by key id too
        await client.charge(hers[0].id, D("0.01"))
    await client.enable_identity(ada.id)
    for issued in hers:
        await client.validate_key(issued.plaintext, **options)


async def test_a_cached_validation_sees_the_identity_disabled(
    client: APIKeyClient, db_url: str, clock: FakeClock
) -> None:
    async with APIKeyClient(db_url, signing_secret=SECRET, clock=clock, auth_cache_ttl=60) as kc:
        org = (await kc.create_organization("Acme")).id
        ada, _ = await kc.get_or_create_identity(org, "ada")
        issued = await kc.create_key(org, identity_id=ada.id)
        await kc.validate_key(issued.plaintext)
        await kc.validate_key(issued.plaintext)  # from the cache
        await kc.disable_identity(ada.id)
        with pytest.raises(DisabledKeyError):
            await kc.validate_key(issued.plaintext)


async def test_identity_changes_are_in_the_audit_log(client: APIKeyClient) -> None:
    org = (await client.create_organization("Acme")).id
    with client.acting_as("admin"):
        ada, _ = await client.get_or_create_identity(org, "ada", name="Ada")
        await client.update_identity(ada.id, metadata={"team": "ml"})
        await client.disable_identity(ada.id)
        await client.enable_identity(ada.id)
    logged = await client.audit_log(org, subject_id=ada.id)
    assert [e.action for e in logged] == [
        "identity.enabled",
        "identity.disabled",
        "identity.updated",
        "identity.created",
    ]
    assert logged[-1].after is not None and logged[-1].after["external_id"] == "ada"


# --- an identity's own budgets and rate limits, shared by its keys ----------------------


async def test_an_identity_budget_is_shared_by_its_keys_on_every_path(
    client: APIKeyClient,
) -> None:
    org = (await client.create_organization("Acme")).id
    ada, _ = await client.get_or_create_identity(org, "ada")
    budget = await client.set_budget(ada.id, Budget(D("1.00")))
    assert budget.scope == "identity" and budget.subject_id == ada.id
    laptop = await client.create_key(org, identity_id=ada.id)
    agent = await client.create_key(org, identity_id=ada.id)
    stranger = await client.create_key(org)
    await client.charge(laptop.id, D("0.40"))
    await client.validate_key(agent.plaintext, cost=D("0.30"))
    hold = await client.reserve(agent.id, D("0.20"))
    with pytest.raises(BudgetExceededError) as refused:
        await client.charge(laptop.id, D("0.20"))
    assert (refused.value.scope, refused.value.subject_id) == ("identity", ada.id)
    with pytest.raises(BudgetExceededError):
        await client.validate_key(laptop.plaintext, cost=D("0.20"))
    await client.settle(hold.id, D("0.05"))
    await client.charge(laptop.id, D("0.25"))  # what the settle gave back
    await client.charge(stranger.id, D("5"))  # not hers: no identity budget applies
    (status,) = await client.get_budgets(ada.id)
    assert (status.used, status.held, status.remaining) == (D("1.00"), D(0), D(0))
    [remaining] = await client.remaining(agent.id)
    assert (remaining.binding.scope, remaining.amount) == ("identity", D(0))
    await assert_balances_match_ledger(client)


async def test_an_identity_rate_limit_counts_the_calls_of_all_its_keys(
    client: APIKeyClient,
) -> None:
    org = (await client.create_organization("Acme")).id
    ada, _ = await client.get_or_create_identity(org, "ada")
    limit = await client.set_rate_limit(ada.id, RateLimit(3, "minute"))
    assert limit.scope == "identity"
    first = await client.create_key(org, identity_id=ada.id)
    second = await client.create_key(org, identity_id=ada.id)
    for key in (first, second, first):
        await client.validate_key(key.plaintext)
    with pytest.raises(RateLimitedError) as refused:
        await client.validate_key(second.plaintext)
    assert refused.value.scope == "identity"
    assert await client.remove_rate_limit(ada.id, limit.name)
    await client.validate_key(second.plaintext)


@pytest.mark.concurrency
async def test_an_identity_budget_is_exact_under_charges_from_4_processes_through_2_keys(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    from tests.test_metering_concurrency import _fire

    org = (await client.create_organization("Acme")).id
    ada, _ = await client.get_or_create_identity(org, "ada")
    await client.set_budget(ada.id, Budget(D("2.00")))
    a = await client.create_key(org, identity_id=ada.id, budgets=[Budget(D("1.50"))])
    b = await client.create_key(org, identity_id=ada.id, budgets=[Budget(D("1.50"))])
    outcomes, _ = _fire(
        [(db_url, "charge", a.id, "0.10", 50, None), (db_url, "charge", b.id, "0.10", 50, None)] * 2
    )
    (shared,) = await client.get_budgets(ada.id)
    (a_status,) = await client.get_budgets(a.id)
    (b_status,) = await client.get_budgets(b.id)
    ledger = await assert_balances_match_ledger(client)
    REPORT.append(
        f"{backend}: identity 2.00 + keys 1.50 each, 200 charges of 0.10 via 2 keys from "
        f"4 processes -> admitted={outcomes['ok']}, identity used={shared.used}, "
        f"key a={a_status.used}, key b={b_status.used}; {'; '.join(ledger)}"
    )
    assert outcomes["ok"] == 20 and shared.used == D("2.00")
    assert a_status.used + b_status.used == shared.used
    assert a_status.used <= D("1.50") and b_status.used <= D("1.50")


# --- an identity metered without a key ----------------------------------------------------


async def test_an_identity_is_charged_and_reserved_on_without_a_key(
    client: APIKeyClient,
) -> None:
    org = (await client.create_organization("Acme")).id
    await client.set_budget(org, Budget(D("10.00")))
    ada, _ = await client.get_or_create_identity(org, "ada")
    await client.set_budget(ada.id, Budget(D("1.00")))
    laptop = await client.create_key(org, identity_id=ada.id)
    charged = await client.charge(ada.id, D("0.40"))
    assert (charged.key_id, charged.identity_id) == (None, ada.id)
    assert sorted(b.scope for b in charged.budgets) == ["identity", "organization"]
    await client.charge(laptop.id, D("0.20"))  # her key shares the budget
    hold = await client.reserve(ada.id, D("0.30"))
    assert (hold.key_id, hold.identity_id) == (None, ada.id)
    with pytest.raises(BudgetExceededError) as refused:
        await client.charge(ada.id, D("0.20"))
    assert refused.value.scope == "identity"
    settled = await client.settle(hold.id, D("0.35"))  # 0.05 beyond the hold fits
    assert settled.charged == D("0.35")
    (status,) = await client.get_budgets(ada.id)
    assert (status.used, status.held) == (D("0.95"), D(0))
    again = await client.charge(ada.id, D("0.05"), idempotency_key="pay-1")
    assert (await client.charge(ada.id, D("0.05"), idempotency_key="pay-1")).replayed
    assert again.identity_id == ada.id
    await client.disable_identity(ada.id)
    with pytest.raises(DisabledKeyError) as disabled:
        await client.charge(ada.id, D("0.01"))
    assert disabled.value.identity is True
    with pytest.raises(DisabledKeyError):
        await client.reserve(ada.id, D("0.01"))
    with pytest.raises(NotFoundError):
        await client.charge("idn_AAAAAAAAAAAAAAAA", D("0.01"))
    await assert_balances_match_ledger(client)


async def test_an_identity_is_validated_with_its_rate_limits_and_budgets(
    client: APIKeyClient,
) -> None:
    org = (await client.create_organization("Acme")).id
    ada, _ = await client.get_or_create_identity(org, "ada")
    await client.set_rate_limit(ada.id, RateLimit(3, "minute"))
    await client.set_budget(ada.id, Budget(D("0.10")))
    first = await client.validate_identity(ada.id, cost=D("0.04"))
    assert first.id == ada.id and first.rate_limit is not None
    assert first.rate_limit.remaining == 2 and first.charge is not None
    assert first.charge.identity_id == ada.id
    with pytest.raises(BudgetExceededError):
        await client.validate_identity(ada.id, cost=D("0.07"))
    await client.validate_identity(ada.id)
    await client.validate_identity(ada.id, cost=D("0.06"))
    with pytest.raises(RateLimitedError) as limited:  # the refused call consumed nothing
        await client.validate_identity(ada.id)
    assert (limited.value.scope, limited.value.subject_id) == ("identity", ada.id)
    (budget,) = await client.get_budgets(ada.id)
    assert budget.used == D("0.10")
    await client.disable_identity(ada.id)
    with pytest.raises(DisabledKeyError):
        await client.validate_identity(ada.id)
    await assert_balances_match_ledger(client)


@pytest.mark.concurrency
async def test_an_identity_charged_without_a_key_and_through_its_key_is_exact_from_4_processes(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    from tests.test_metering_concurrency import _fire

    org = (await client.create_organization("Acme")).id
    ada, _ = await client.get_or_create_identity(org, "ada")
    await client.set_budget(ada.id, Budget(D("2.00")))
    key = await client.create_key(org, identity_id=ada.id)
    outcomes, _ = _fire(
        [(db_url, "charge", ada.id, "0.10", 50, None), (db_url, "charge", key.id, "0.10", 50, None)]
        * 2
    )
    (shared,) = await client.get_budgets(ada.id)
    ledger = await assert_balances_match_ledger(client)
    REPORT.append(
        f"{backend}: identity 2.00, 200 charges of 0.10 from 4 processes, half without a key "
        f"-> admitted={outcomes['ok']}, used={shared.used}; {'; '.join(ledger)}"
    )
    assert outcomes["ok"] == 20 and shared.used == D("2.00")
