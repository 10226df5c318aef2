"""Delegated keys: a child never exceeds its parent, spends from every ancestor's
budgets at once, and dies with them."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D
from typing import Any

import pytest

from keycap import (
    APIKeyClient,
    Budget,
    BudgetExceededError,
    ConfigurationError,
    DisabledKeyError,
    ExpiredKeyError,
    ForbiddenError,
    InsufficientScopeError,
    InvalidArgumentError,
    NotFoundError,
    RateLimit,
    RateLimitedError,
    RevokedKeyError,
)
from tests._ledger import assert_balances_match_ledger
from tests.conftest import REPORT, SECRET, FakeClock


async def _org(client: APIKeyClient) -> str:
    return (await client.create_organization("Acme")).id


async def test_a_child_inherits_what_it_leaves_out(client: APIKeyClient, clock: FakeClock) -> None:
    org = await _org(client)
    project = (await client.create_project(org, "web")).id
    ada, _ = await client.get_or_create_identity(org, "ada")
    root = await client.create_key(
        org,
        project_id=project,
        identity_id=ada.id,
        scopes=["chat:*", "files:read"],
        expires_in="7d",
        allowed_ips=["10.0.0.0/8"],
    )
    child = await client.delegate(root.id, name="agent")
    key = child.key
    assert (key.parent_id, key.ancestors, key.delegated_by) == (root.id, (root.id,), root.id)
    assert key.scopes == ("chat:*", "files:read")
    assert (key.project_id, key.identity_id, key.org_id) == (project, ada.id, org)
    assert key.expires_at == clock.now + timedelta(days=7)
    assert key.allowed_ips == ("10.0.0.0/8",)
    assert await client.get_key(child.id) == key
    await client.validate_key(child.plaintext, required_scopes=["chat:write"], client_ip="10.1.2.3")
    grandchild = await client.delegate(child.id, scopes=["chat:write"], expires_in="1h")
    assert grandchild.key.ancestors == (child.id, root.id)
    assert grandchild.key.expires_at == clock.now + timedelta(hours=1)
    with pytest.raises(InsufficientScopeError):
        await client.validate_key(
            grandchild.plaintext, required_scopes=["files:read"], client_ip="10.1.2.3"
        )


@pytest.mark.parametrize(
    ("asked", "field"),
    [
        ({"scopes": ["admin"]}, "scopes"),
        ({"scopes": ["chat:*"]}, "scopes"),  # the parent has chat:write only
        ({"expires_in": "8d"}, "expires_at"),
        ({"allowed_ips": ["192.168.0.0/16"]}, "allowed_ips"),
        ({"allowed_ips": ["0.0.0.0/0"]}, "allowed_ips"),
        ({"product_id": "other"}, "product_id"),
    ],
)
async def test_a_child_never_exceeds_its_parent(
    client: APIKeyClient, asked: dict[str, Any], field: str
) -> None:
    org = await _org(client)
    product = (await client.create_product(org, "chat")).id
    other = (await client.create_product(org, "files")).id
    root = await client.create_key(
        org,
        product_id=product,
        scopes=["chat:write", "files:read"],
        expires_in="7d",
        allowed_ips=["10.0.0.0/8"],
    )
    if asked.get("product_id") == "other":
        asked = {"product_id": other}
    with pytest.raises(InvalidArgumentError) as refused:
        await client.delegate(root.id, **asked)
    assert refused.value.field == field
    assert await client.list_keys(descendants_of=root.id) == []
    narrower = await client.delegate(
        root.id, scopes=["chat:write"], expires_in="1d", allowed_ips=["10.2.0.0/16"]
    )
    assert narrower.key.product_id == product


async def test_a_child_of_a_key_without_an_expiry_or_ranges_may_set_its_own(
    client: APIKeyClient,
) -> None:
    org = await _org(client)
    project = (await client.create_project(org, "web")).id
    root = await client.create_key(org, scopes=["*"])
    child = await client.delegate(
        root.id, project_id=project, scopes=["chat:write"], expires_in="1h", allowed_ips=["::1"]
    )
    assert (child.key.project_id, child.key.allowed_ips) == (project, ("::1/128",))


async def test_delegation_depth_is_bounded(client: APIKeyClient, db_url: str) -> None:
    org = await _org(client)
    chain = [await client.create_key(org, scopes=["*"])]
    for _ in range(4):
        chain.append(await client.delegate(chain[-1].id))
    assert chain[-1].key.ancestors == tuple(k.id for k in reversed(chain[:-1]))
    with pytest.raises(InvalidArgumentError) as refused:
        await client.delegate(chain[-1].id)
    assert refused.value.field == "key_id"
    async with APIKeyClient(db_url, signing_secret=SECRET, max_delegation_depth=1) as shallow:
        with pytest.raises(InvalidArgumentError):
            await shallow.delegate(chain[1].id)
        await shallow.delegate(chain[0].id)
    for wrong in (-1, 5, True, "2"):
        with pytest.raises(ConfigurationError):
            APIKeyClient(db_url, signing_secret=SECRET, max_delegation_depth=wrong)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        await client.delegate("key_AAAAAAAAAAAA")


PATHS: dict[str, dict[str, Any]] = {
    "read": {},
    "tracked": {"track_usage": True},
    "rate-limited": {"track_usage": True},
    "metered": {"cost": D("0.01")},
}


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_revoking_or_disabling_a_parent_refuses_every_descendant_on_the_next_call(
    client: APIKeyClient, clock: FakeClock, path: str
) -> None:
    org = await _org(client)
    limits = [RateLimit(1000, "minute")] if path == "rate-limited" else []
    root = await client.create_key(org, scopes=["*"], budgets=[Budget(D("10"))])
    child = await client.delegate(root.id, rate_limits=limits)
    grandchild = await client.delegate(child.id, rate_limits=limits)
    options = PATHS[path]
    for issued in (root, child, grandchild):
        await client.validate_key(issued.plaintext, **options)

    disabled = await client.disable_key(root.id)
    for issued in (child, grandchild):
        with pytest.raises(DisabledKeyError) as refused:
            await client.validate_key(issued.plaintext, **options)
        assert refused.value.ancestor is True and refused.value.to_dict()["ancestor"] is True
        assert refused.value.disabled_at == disabled.disabled_at
        with pytest.raises(DisabledKeyError):
            await client.charge(issued.id, D("0.01"))
        with pytest.raises(DisabledKeyError):
            await client.reserve(issued.id, D("0.01"))
    await client.enable_key(root.id)
    await client.validate_key(grandchild.plaintext, **options)

    clock.advance(seconds=1)
    revoked = await client.revoke_key(child.id)
    with pytest.raises(RevokedKeyError) as refused_rev:
        await client.validate_key(grandchild.plaintext, **options)
    assert refused_rev.value.ancestor is True
    assert refused_rev.value.revoked_at == revoked.revoked_at
    with pytest.raises(RevokedKeyError) as own:
        await client.validate_key(child.plaintext, **options)
    assert own.value.ancestor is None
    with pytest.raises(RevokedKeyError):
        await client.charge(grandchild.id, D("0.01"))
    await client.validate_key(root.plaintext, **options)  # the root is untouched
    with pytest.raises(RevokedKeyError):  # and a revoked key delegates nothing
        await client.delegate(child.id)
    with pytest.raises(RevokedKeyError) as below:
        await client.delegate(grandchild.id)
    assert below.value.ancestor is True


async def test_a_cached_validation_sees_the_parent_revoked(
    client: APIKeyClient, db_url: str, clock: FakeClock
) -> None:
    async with APIKeyClient(db_url, signing_secret=SECRET, clock=clock, auth_cache_ttl=60) as kc:
        org = await _org(kc)
        root = await kc.create_key(org)
        child = await kc.delegate(root.id)
        await kc.validate_key(child.plaintext)
        await kc.validate_key(child.plaintext)  # from the cache
        await kc.revoke_key(root.id)
        with pytest.raises(RevokedKeyError):
            await kc.validate_key(child.plaintext)


async def test_a_child_expires_with_its_parent(client: APIKeyClient, clock: FakeClock) -> None:
    org = await _org(client)
    root = await client.create_key(org, expires_in="1h")
    child = await client.delegate(root.id)
    clock.advance(hours=1)
    for issued in (root, child):
        with pytest.raises(ExpiredKeyError):
            await client.validate_key(issued.plaintext)
    with pytest.raises(ExpiredKeyError):
        await client.delegate(root.id)


async def test_every_ancestors_budget_and_rate_limit_is_debited_with_the_childs(
    client: APIKeyClient,
) -> None:
    org = await _org(client)
    root = await client.create_key(
        org, budgets=[Budget(D("1.00"))], rate_limits=[RateLimit(50, "minute")]
    )
    child = await client.delegate(root.id, budgets=[Budget(D("0.60"))])
    grandchild = await client.delegate(child.id)
    sibling = await client.delegate(root.id)

    await client.charge(grandchild.id, D("0.30"))
    await client.validate_key(grandchild.plaintext, cost=D("0.20"))
    with pytest.raises(BudgetExceededError) as refused:
        await client.charge(grandchild.id, D("0.20"))  # the child's 0.60 binds
    assert (refused.value.scope, refused.value.subject_id) == ("key", child.id)
    hold = await client.reserve(grandchild.id, D("0.10"))
    await client.settle(hold.id, D("0.04"))
    [left] = await client.remaining(grandchild.id)
    assert (left.binding.subject_id, left.amount) == (child.id, D("0.06"))

    await client.charge(sibling.id, D("0.40"))  # the root has 0.46 left
    with pytest.raises(BudgetExceededError) as root_refused:
        await client.validate_key(sibling.plaintext, cost=D("0.07"))
    assert root_refused.value.subject_id == root.id
    (root_budget,) = await client.get_budgets(root.id)
    (child_budget,) = await client.get_budgets(child.id)
    assert (root_budget.used, child_budget.used) == (D("0.94"), D("0.54"))
    await assert_balances_match_ledger(client)

    # The root's rate limit counts every call in its tree.
    (limit,) = await client.get_rate_limits(root.id)
    assert limit.remaining == 50 - 1  # the one metered validation of the grandchild
    await client.set_rate_limit(root.id, RateLimit(2, "minute", name="tight"))
    await client.validate_key(child.plaintext)
    await client.validate_key(sibling.plaintext)
    with pytest.raises(RateLimitedError) as limited:
        await client.validate_key(grandchild.plaintext)
    assert limited.value.subject_id == root.id


async def test_narrowing_a_parent_narrows_its_descendants(
    client: APIKeyClient, clock: FakeClock
) -> None:
    org = await _org(client)
    root = await client.create_key(org, scopes=["chat:*", "files:read"])
    child = await client.delegate(root.id, expires_in="30d")
    grandchild = await client.delegate(child.id, scopes=["chat:write"], allowed_ips=["10.0.0.0/8"])
    with client.acting_as("admin"):
        await client.update_key(
            root.id, scopes=["chat:write"], expires_in="1d", allowed_ips=["10.1.0.0/16", "::1"]
        )
    after = await client.get_key(child.id)
    assert after.scopes == ("chat:write",)  # of chat:* only chat:write; files:read went
    assert after.expires_at == clock.now + timedelta(days=1)
    assert after.allowed_ips == ("10.1.0.0/16", "::1/128")
    below = await client.get_key(grandchild.id)
    assert (below.scopes, below.allowed_ips) == (("chat:write",), ("10.1.0.0/16",))
    assert below.expires_at == after.expires_at
    logged = await client.audit_log(org, subject_id=grandchild.id, limit=1)
    assert (logged[0].action, logged[0].actor) == ("key.narrowed", "admin")
    with pytest.raises(ForbiddenError):
        await client.validate_key(grandchild.plaintext, client_ip="10.2.0.1")
    await client.validate_key(grandchild.plaintext, client_ip="10.1.0.1")

    # A child cannot be widened past its parent; the parent cut to no range cuts it too.
    for wrong in ({"scopes": ["files:read"]}, {"expires_at": None}, {"allowed_ips": None}):
        with pytest.raises(InvalidArgumentError):
            await client.update_key(child.id, **wrong)
    await client.update_key(root.id, allowed_ips=["192.168.0.0/16"])
    assert (await client.get_key(grandchild.id)).allowed_ips == ()
    with pytest.raises(ForbiddenError):
        await client.validate_key(grandchild.plaintext, client_ip="10.1.0.1")


async def test_descendants_are_listed_and_deleted_with_their_root(client: APIKeyClient) -> None:
    org = await _org(client)
    root = await client.create_key(org, budgets=[Budget(D("1"))])
    child = await client.delegate(root.id, name="child")
    grandchild = await client.delegate(child.id, name="grandchild")
    await client.create_key(org, name="unrelated")
    listed = await client.list_keys(descendants_of=root.id)
    assert sorted(k.name for k in listed) == ["child", "grandchild"]
    assert [k.name for k in await client.list_keys(descendants_of=child.id)] == ["grandchild"]
    hold = await client.reserve(grandchild.id, D("0.40"))
    await client.delete_key(root.id)
    for gone in (root, child, grandchild):
        with pytest.raises(NotFoundError):
            await client.get_key(gone.id)
    assert (await client.get_hold(hold.id)).status == "released"
    await assert_balances_match_ledger(client)


async def test_delegation_is_in_the_audit_log(client: APIKeyClient) -> None:
    org = await _org(client)
    root = await client.create_key(org)
    with client.acting_as("agent-runner"):
        child = await client.delegate(root.id, budgets=[Budget(D("2"))])
    (entry,) = await client.audit_log(org, subject_id=child.id)
    assert (entry.action, entry.actor) == ("key.delegated", "agent-runner")
    assert entry.after is not None and entry.after["ancestors"] == [root.id]
    assert entry.after["budgets"] == [{"limit": "2", "period": "month", "meter": "spend"}]


@pytest.mark.concurrency
async def test_a_tree_of_agents_never_spends_more_than_its_root_from_4_processes(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    """A root with 3.00; two children with 2.00 each; under each, two grandchildren
    with 1.00 each. Every grandchild and child spends at once from 4 processes,
    by charge and by metered validation."""
    from tests.test_metering_concurrency import _fire

    org = await _org(client)
    root = await client.create_key(org, budgets=[Budget(D("3.00"))])
    children = [await client.delegate(root.id, budgets=[Budget(D("2.00"))]) for _ in range(2)]
    grandchildren = [
        await client.delegate(c.id, budgets=[Budget(D("1.00"))]) for c in children for _ in range(2)
    ]
    jobs = [
        (db_url, "charge", grandchildren[0].id, "0.10", 40, None),
        (db_url, "validate", grandchildren[1].plaintext, "0.10", 40, None),
        (db_url, "charge", grandchildren[2].id, "0.10", 40, None),
        (db_url, "validate", grandchildren[3].plaintext, "0.10", 40, None),
    ]
    jobs += [(db_url, "charge", c.id, "0.10", 20, None) for c in children]
    outcomes, _ = _fire(jobs)

    async def used(key_id: str) -> D:
        (status,) = await client.get_budgets(key_id)
        return status.used

    root_used = await used(root.id)
    child_used = [await used(c.id) for c in children]
    grand_used = [await used(g.id) for g in grandchildren]
    ledger = await assert_balances_match_ledger(client)
    REPORT.append(
        f"{backend}: delegation tree root 3.00 / 2 children 2.00 / 4 grandchildren 1.00, "
        f"200 calls of 0.10 from 6 processes -> admitted={outcomes['ok']}, root used={root_used}, "
        f"children={[str(u) for u in child_used]}, grandchildren={[str(u) for u in grand_used]}; "
        f"{len(ledger)} budgets = ledger"
    )
    assert outcomes["ok"] == 30 and root_used == D("3.00")
    assert all(u <= D("2.00") for u in child_used) and sum(child_used) == root_used
    assert all(u <= D("1.00") for u in grand_used)
    assert sum(outcomes.values()) == 200


async def test_a_key_with_keys_delegate_mints_lists_and_revokes_its_children_over_http(
    client: APIKeyClient,
) -> None:
    import httpx
    from fastapi import FastAPI

    from keycap.integrations.fastapi import KeycapMiddleware, delegation_router

    app = FastAPI()
    app.add_middleware(KeycapMiddleware, client=client, close_client=False)
    app.include_router(delegation_router(), prefix="/v1")
    org = await _org(client)
    agent = await client.create_key(
        org, scopes=["keys:delegate", "chat:write"], budgets=[Budget(D("5"))]
    )
    plain = await client.create_key(org, scopes=["chat:write"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        auth = {"Authorization": f"Bearer {agent.plaintext}"}
        made = await http.post(
            "/v1/keys/children",
            headers=auth,
            json={"name": "sub-agent", "scopes": ["chat:write"], "budgets": [{"limit": "0.50"}]},
        )
        assert made.status_code == 201, made.text
        assert made.headers["cache-control"] == "no-store"
        child = made.json()
        assert child["key"]["ancestors"] == [agent.id] and child["plaintext"].startswith("sk_")
        await client.validate_key(child["plaintext"], required_scopes=["chat:write"])
        wider = await http.post("/v1/keys/children", headers=auth, json={"scopes": ["admin"]})
        assert (wider.status_code, wider.json()["code"]) == (400, "invalid_argument")
        listed = (await http.get("/v1/keys/children", headers=auth)).json()
        assert [k["id"] for k in listed] == [child["key"]["id"]]
        assert child["plaintext"] not in str(listed)
        other = await http.post(f"/v1/keys/children/{plain.id}/revoke", headers=auth)
        assert other.status_code == 404
        revoked = await http.post(f"/v1/keys/children/{child['key']['id']}/revoke", headers=auth)
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        forbidden = await http.post(
            "/v1/keys/children", headers={"Authorization": f"Bearer {plain.plaintext}"}, json={}
        )
        assert (forbidden.status_code, forbidden.json()["code"]) == (403, "insufficient_scope")
    logged = await client.audit_log(org, subject_id=child["key"]["id"])
    assert [(e.action, e.actor) for e in logged] == [
        ("key.revoked", f"key:{agent.id}"),
        ("key.delegated", f"key:{agent.id}"),
    ]


async def test_a_child_gets_no_scope_its_organization_does_not_allow(client: APIKeyClient) -> None:
    org = await _org(client)
    root = await client.create_key(org, scopes=["*"])
    await client.set_allowed_scopes(org, ["chat:*"])
    with pytest.raises(InvalidArgumentError) as refused:
        await client.delegate(root.id, scopes=["admin"])
    assert refused.value.field == "scopes"
    assert (await client.delegate(root.id, scopes=["chat:write"])).key.scopes == ("chat:write",)
