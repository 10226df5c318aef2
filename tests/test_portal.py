"""key_management_router: customers manage their own organization's keys, over JSON."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal as D
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException

from keycap import APIKey, APIKeyClient, RolledKeyError
from keycap.integrations.fastapi import (
    KeycapMiddleware,
    Manager,
    key_management_router,
    require_scope,
)

#: The app's own sessions: a token -> (user, organization). keycap never sees them.
SESSIONS: dict[str, tuple[str, str]] = {}


async def current_manager(authorization: Annotated[str, Header()] = "") -> Manager:
    """The app's login, as a dependency: keycap only asks who and which organization."""
    found = SESSIONS.get(authorization.removeprefix("Session "))
    if found is None:
        raise HTTPException(401, "log in")
    user, org_id = found
    return Manager(actor=user, org_id=org_id, grantable=frozenset({"chat:*"}))


def _app(client: APIKeyClient) -> FastAPI:
    app = FastAPI()
    app.add_middleware(KeycapMiddleware, client=client, close_client=False)
    app.include_router(key_management_router(manager=current_manager), prefix="/account")

    @app.get("/v1/chat")
    async def chat(key: Annotated[APIKey, Depends(require_scope("chat:write"))]) -> str:
        return key.id

    return app


@pytest.fixture
async def portal(client: APIKeyClient) -> AsyncIterator[tuple[httpx.AsyncClient, str, str]]:
    """An HTTP client on the app, logged in as alice of Acme; and Acme's and Globex's ids."""
    acme = (await client.create_organization("Acme")).id
    globex = (await client.create_organization("Globex")).id
    SESSIONS.update({"alice": ("alice@acme", acme), "gina": ("gina@globex", globex)})
    transport = httpx.ASGITransport(app=_app(client))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://app", headers={"Authorization": "Session alice"}
    ) as http:
        yield http, acme, globex


async def test_a_customer_creates_sees_rolls_and_revokes_their_own_keys(
    portal: tuple[httpx.AsyncClient, str, str], client: APIKeyClient
) -> None:
    http, _, _ = portal
    created = await http.post(
        "/account/keys",
        json={
            "name": "agent",
            "scopes": ["chat:write"],
            "budgets": [{"limit": "5.00", "period": "month"}],
        },
    )
    assert created.status_code == 201, created.text
    plaintext, key_id = created.json()["plaintext"], created.json()["key"]["id"]
    assert created.json()["key"]["delegated_by"] == "alice@acme"  # who made it
    listed = (await http.get("/account/keys")).json()
    assert [k["id"] for k in listed] == [key_id] and plaintext not in str(listed)
    assert (
        await http.get("/v1/chat", headers={"Authorization": f"Bearer {plaintext}"})
    ).status_code == 200
    await client.charge(key_id, D("1.25"))
    shown = (await http.get(f"/account/keys/{key_id}")).json()
    assert shown["status"] == "active" and plaintext not in str(shown)
    spend = shown["remaining"][0]
    assert (spend["meter"], D(spend["amount"])) == ("spend", D("3.75"))  # exact, as a string
    usage = (await http.get(f"/account/keys/{key_id}/usage")).json()
    assert [(u["meter"], D(u["amount"])) for u in usage] == [("spend", D("1.25"))]
    rolled = await http.post(f"/account/keys/{key_id}/roll", json={"grace": "0s"})
    assert rolled.status_code == 200 and rolled.json()["key"]["id"] == key_id
    with pytest.raises(RolledKeyError):
        await client.validate_key(plaintext)
    new = rolled.json()["plaintext"]
    revoked = await http.post(f"/account/keys/{key_id}/revoke")
    assert revoked.json()["status"] == "revoked"
    refused = await http.get("/v1/chat", headers={"Authorization": f"Bearer {new}"})
    assert refused.status_code == 401 and refused.json()["code"] == "revoked_key"
    # Every change through the router is in the audit log, with the manager as actor.
    org_id = created.json()["key"]["org_id"]
    logged = await client.audit_log(org_id, subject_id=key_id)
    assert [(e.action, e.actor) for e in logged] == [
        ("key.revoked", "alice@acme"),
        ("key.rolled", "alice@acme"),
        ("key.created", "alice@acme"),
    ]


async def test_another_organizations_key_does_not_exist_for_a_customer(
    portal: tuple[httpx.AsyncClient, str, str], client: APIKeyClient
) -> None:
    http, _, globex = portal
    theirs = await client.create_key(globex, name="globex-secret")
    for method, path in (
        ("GET", f"/account/keys/{theirs.id}"),
        ("PATCH", f"/account/keys/{theirs.id}"),
        ("POST", f"/account/keys/{theirs.id}/revoke"),
        ("POST", f"/account/keys/{theirs.id}/roll"),
        ("GET", f"/account/keys/{theirs.id}/usage"),
    ):
        body = {} if method != "GET" else None
        response = await http.request(method, path, json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert "globex-secret" not in response.text
    assert (await http.get("/account/keys")).json() == []
    assert (await client.get_key(theirs.id)).revoked_at is None


async def test_a_customer_grants_only_the_scopes_they_may_and_must_log_in(
    portal: tuple[httpx.AsyncClient, str, str],
) -> None:
    http, _, _ = portal
    refused = await http.post("/account/keys", json={"scopes": ["admin"]})
    assert refused.status_code == 400 and "not yours to grant: admin" in refused.text
    assert (await http.post("/account/keys", json={"scopes": ["chat:read"]})).status_code == 201
    anonymous = await http.get("/account/keys", headers={"Authorization": ""})
    assert anonymous.status_code == 401


async def test_the_router_is_documented_in_openapi(
    portal: tuple[httpx.AsyncClient, str, str],
) -> None:
    http, _, _ = portal
    spec = (await http.get("/openapi.json")).json()
    paths = set(spec["paths"])
    assert {"/account/keys", "/account/keys/{key_id}", "/account/keys/{key_id}/roll"} <= paths
    assert {"/account/keys/{key_id}/revoke", "/account/keys/{key_id}/usage"} <= paths
    assert "KeyIssued" in spec["components"]["schemas"]
