"""Access requests: an agent asks, the owner approves (narrower) or denies, the
agent claims its key once."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal as D

import pytest
from sqlalchemy import select

from keycap import (
    AccessNotGrantedError,
    APIKeyClient,
    Budget,
    BudgetExceededError,
    InsufficientScopeError,
    InvalidArgumentError,
    NotFoundError,
)
from keycap._db.schema import access_requests
from tests.conftest import FakeClock


async def _ask(client: APIKeyClient, org: str, **more: object) -> tuple[str, str]:
    request, secret = await client.request_access(
        org,
        requester="research-agent",
        scopes=["chat:write", "files:read"],
        budgets=[Budget(D("5.00"), "month")],
        expires_in="30d",
        reason="summarize the weekly reports",
        **more,  # type: ignore[arg-type]
    )
    return request.id, secret


async def test_an_agent_asks_the_owner_narrows_and_the_agent_claims_its_key_once(
    client: APIKeyClient, clock: FakeClock
) -> None:
    org = (await client.create_organization("Acme")).id
    ada, _ = await client.get_or_create_identity(org, "ada")
    request_id, secret = await _ask(client, org, identity_id=ada.id)
    assert secret.startswith("kcr_")
    (pending,) = await client.list_access_requests(org)
    assert (pending.id, pending.status, pending.requester) == (
        request_id,
        "pending",
        "research-agent",
    )
    assert pending.asked.scopes == ("chat:write", "files:read")
    assert pending.asked.expires_in == timedelta(days=30) and pending.granted is None
    with pytest.raises(AccessNotGrantedError) as early:
        await client.claim_access(request_id, secret)
    assert early.value.status == "pending"

    with client.acting_as("owner@acme"):
        approved = await client.approve_access(
            request_id,
            scopes=["chat:write"],
            budgets=[Budget(D("2.00"), "month"), Budget(D("0.50"), "day")],
            expires_in="7d",
        )
    assert (approved.status, approved.decided_by) == ("approved", "owner@acme")
    assert approved.granted is not None and approved.granted.scopes == ("chat:write",)
    assert await client.list_access_requests(org) == []

    with pytest.raises(NotFoundError):  # another secret: as if there were no request
        await client.claim_access(request_id, "kcr_" + "x" * 32)
    issued = await client.claim_access(request_id, secret)
    key = issued.key
    assert (key.name, key.identity_id, key.scopes) == ("research-agent", ada.id, ("chat:write",))
    assert key.expires_at == clock.now + timedelta(days=7)
    assert key.metadata == {"access_request": request_id}
    await client.validate_key(issued.plaintext, required_scopes=["chat:write"])
    with pytest.raises(InsufficientScopeError):
        await client.validate_key(issued.plaintext, required_scopes=["files:read"])
    await client.charge(key.id, D("0.50"))
    with pytest.raises(BudgetExceededError):  # the day budget the owner added
        await client.charge(key.id, D("0.01"))

    with pytest.raises(AccessNotGrantedError) as again:
        await client.claim_access(request_id, secret)
    assert again.value.status == "claimed"
    claimed = await client.get_access_request(request_id)
    assert (claimed.status, claimed.key_id) == ("claimed", key.id)
    logged = await client.audit_log(org, subject_id=request_id)
    assert [(e.action, e.actor) for e in logged] == [
        ("access.claimed", None),
        ("access.approved", "owner@acme"),
        ("access.requested", None),
    ]
    assert secret not in str(logged) and secret not in repr(claimed)
    async with client.engine.connect() as conn:
        stored = (await conn.execute(select(access_requests))).all()
    assert secret not in str(stored)


async def test_a_denied_request_says_why_when_claimed(client: APIKeyClient) -> None:
    org = (await client.create_organization("Acme")).id
    request_id, secret = await _ask(client, org)
    denied = await client.deny_access(request_id, reason="use the team key")
    assert (denied.status, denied.decision_reason) == ("denied", "use the team key")
    with pytest.raises(AccessNotGrantedError) as refused:
        await client.claim_access(request_id, secret)
    assert refused.value.to_dict() == {
        "code": "access_not_granted",
        "message": "access request denied: use the team key",
        "status": "denied",
        "reason": "use the team key",
    }
    with pytest.raises(AccessNotGrantedError):  # decided once
        await client.approve_access(request_id)
    assert [r.id for r in await client.list_access_requests(org, status="denied")] == [request_id]


@pytest.mark.parametrize(
    ("grant", "field"),
    [
        ({"scopes": ["admin"]}, "scopes"),
        ({"budgets": [Budget(D("6.00"), "month")]}, "budgets"),
        ({"budgets": [Budget(D("1.00"), "day")]}, "budgets"),  # drops the month budget
        ({"expires_in": "31d"}, "expires_in"),
    ],
)
async def test_an_owner_cannot_grant_more_than_was_asked(
    client: APIKeyClient, grant: dict[str, object], field: str
) -> None:
    org = (await client.create_organization("Acme")).id
    request_id, _ = await _ask(client, org)
    with pytest.raises(InvalidArgumentError) as refused:
        await client.approve_access(request_id, **grant)  # type: ignore[arg-type]
    assert refused.value.field == field
    assert (await client.get_access_request(request_id)).status == "pending"


async def test_requests_expire_unclaimed(client: APIKeyClient, clock: FakeClock) -> None:
    org = (await client.create_organization("Acme")).id
    first, _ = await _ask(client, org, ttl="1h")
    second, secret = await _ask(client, org, ttl="1h")
    await client.approve_access(second)
    clock.advance(hours=1)
    assert {r.id for r in await client.list_access_requests(org, status="expired")} == {
        first,
        second,
    }
    with pytest.raises(AccessNotGrantedError) as late:
        await client.approve_access(first)
    assert late.value.status == "expired"
    with pytest.raises(AccessNotGrantedError) as unclaimed:
        await client.claim_access(second, secret)
    assert unclaimed.value.status == "expired"


async def test_concurrent_claims_issue_one_key(client: APIKeyClient) -> None:
    org = (await client.create_organization("Acme")).id
    request_id, secret = await _ask(client, org)
    await client.approve_access(request_id)
    results = await asyncio.gather(
        *(client.claim_access(request_id, secret) for _ in range(8)), return_exceptions=True
    )
    issued = [r for r in results if not isinstance(r, BaseException)]
    assert len(issued) == 1, results
    assert all(
        isinstance(r, AccessNotGrantedError) and r.status == "claimed"
        for r in results
        if isinstance(r, BaseException)
    )
    assert [k.id for k in await client.list_keys(org_id=org)] == [issued[0].id]


async def test_a_request_names_only_what_the_organization_has(client: APIKeyClient) -> None:
    org = (await client.create_organization("Acme")).id
    other = (await client.create_organization("Other")).id
    theirs = (await client.create_project(other, "web")).id
    with pytest.raises(NotFoundError):
        await _ask(client, org, project_id=theirs)
    with pytest.raises(NotFoundError):
        await _ask(client, "org_AAAAAAAAAAAAAAAA")
    await client.set_allowed_scopes(org, ["chat:*"])
    with pytest.raises(InvalidArgumentError):
        await _ask(client, org)  # files:read is not allowed there
    for bad in ({"ttl": "40d"}, {"requester": ""}, {"expires_in": "soon"}):
        with pytest.raises(InvalidArgumentError):
            await client.request_access(org, **{"requester": "x", **bad})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        await client.list_access_requests(org, status="open")


async def test_both_sides_over_http(client: APIKeyClient) -> None:
    import httpx
    from fastapi import FastAPI

    from keycap.integrations.fastapi import (
        KeycapMiddleware,
        Manager,
        access_request_router,
        key_management_router,
    )

    org = (await client.create_organization("Acme")).id
    other = (await client.create_organization("Other")).id

    def acme() -> str:
        return org

    def owner() -> Manager:
        return Manager(actor="owner@acme", org_id=org, grantable=frozenset({"chat:*"}))

    def stranger() -> Manager:
        return Manager(actor="x@other", org_id=other)

    app = FastAPI()
    app.add_middleware(KeycapMiddleware, client=client, close_client=False)
    app.include_router(access_request_router(org_id=acme), prefix="/v1")
    app.include_router(key_management_router(manager=owner), prefix="/account")
    app.include_router(key_management_router(manager=stranger), prefix="/other")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        asked = await http.post(
            "/v1/access-requests",
            json={
                "requester": "ci-bot",
                "scopes": ["chat:write"],
                "budgets": [{"limit": "3.00"}],
                "reason": "nightly evals",
            },
        )
        assert asked.status_code == 201, asked.text
        assert asked.headers["cache-control"] == "no-store"
        request_id, secret = asked.json()["request"]["id"], asked.json()["claim_secret"]
        claim = {"claim_secret": secret}
        early = await http.post(f"/v1/access-requests/{request_id}/claim", json=claim)
        assert (early.status_code, early.json()["code"]) == (409, "access_not_granted")
        assert early.json()["keycap_status"] == "pending"
        pending = (await http.get("/account/access-requests")).json()
        assert [(r["id"], r["requester"]) for r in pending] == [(request_id, "ci-bot")]
        assert secret not in str(pending)
        assert (await http.get("/other/access-requests")).json() == []
        theirs = await http.post(f"/other/access-requests/{request_id}/deny", json={"reason": "no"})
        assert theirs.status_code == 404
        approved = await http.post(
            f"/account/access-requests/{request_id}/approve",
            json={"budgets": [{"limit": "1.00"}]},
        )
        assert approved.status_code == 200, approved.text
        assert approved.json()["decided_by"] == "owner@acme"
        wrong = await http.post(
            f"/v1/access-requests/{request_id}/claim", json={"claim_secret": "kcr_nope"}
        )
        assert wrong.status_code == 404
        issued = await http.post(f"/v1/access-requests/{request_id}/claim", json=claim)
        assert issued.status_code == 201, issued.text
        assert issued.headers["cache-control"] == "no-store"
        key = await client.validate_key(issued.json()["plaintext"], cost=D("0.40"))
        assert key.id == issued.json()["key"]["id"]
        twice = await http.post(f"/v1/access-requests/{request_id}/claim", json=claim)
        assert (twice.status_code, twice.json()["keycap_status"]) == (409, "claimed")
