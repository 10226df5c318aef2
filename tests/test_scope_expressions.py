"""required_scopes with any_of(...), and an organization's allowed scopes."""

from __future__ import annotations

from decimal import Decimal as D
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI

from keycap import (
    APIKey,
    APIKeyClient,
    Budget,
    InsufficientScopeError,
    InvalidArgumentError,
    NotFoundError,
    RateLimit,
    any_of,
)
from keycap._rules import scopes
from keycap.integrations.fastapi import KeycapMiddleware, require_scope

# --- the rule, without a database ---------------------------------------------------


def test_required_scopes_are_groups_one_of_each_needed() -> None:
    groups = scopes.required(["files:read", any_of("chat:write", "chat:admin"), "files:read"])
    assert groups == (("chat:admin", "chat:write"), ("files:read",))
    assert scopes.unmet(["files:read", "chat:admin"], groups) == ()
    assert scopes.unmet(["chat:*"], groups) == (("files:read",),)
    assert scopes.unmet(["files:read"], groups) == (("chat:admin", "chat:write"),)
    assert scopes.unmet([], groups) == groups
    assert scopes.required(any_of("a", "b")) == (("a", "b"),)
    assert scopes.required([any_of("a")]) == scopes.required(["a"])  # one choice is a scope
    assert scopes.expressed(groups) == [any_of("chat:admin", "chat:write"), "files:read"]
    assert str(any_of("b", "a")) == "any_of(a, b)"


@pytest.mark.parametrize(
    "bad",
    ["chat:write", [["chat:write"]], [any_of("a"), 3], {"a": 1}, ["bad scope"]],
)
def test_required_scopes_of_another_shape_are_refused(bad: Any) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        scopes.required(bad)
    assert refused.value.field == "required_scopes"


def test_any_of_needs_a_valid_scope() -> None:
    for bad in ((), ("no spaces",), (1,)):
        with pytest.raises(InvalidArgumentError):
            any_of(*bad)


def test_an_unmet_any_of_is_reported_as_a_group() -> None:
    error = InsufficientScopeError.of([("files:read",), ("chat:admin", "chat:write")])
    assert error.missing_scopes == ("files:read",)
    assert error.missing_any_of == (("chat:admin", "chat:write"),)
    assert str(error) == "API key lacks required scopes: files:read, any_of(chat:admin, chat:write)"
    plain = InsufficientScopeError.of([("files:read",)])
    assert "missing_any_of" not in plain.to_dict()  # as before any_of existed


# --- validation, on every database and every path -----------------------------------

PATHS = {
    "read": {},
    "tracked": {"track_usage": True},
    "metered": {"cost": D("0.01")},
}


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_validation_admits_a_key_with_one_scope_of_each_any_of(
    client: APIKeyClient, path: str
) -> None:
    org = (await client.create_organization("Acme")).id
    needed = ["files:read", any_of("chat:write", "chat:admin")]
    admin = await client.create_key(
        org,
        scopes=["files:read", "chat:admin"],
        budgets=[Budget(D("1"))],
        rate_limits=[RateLimit(100, "minute")],
    )
    writer = await client.create_key(org, scopes=["files:*", "chat:*"], budgets=[Budget(D("1"))])
    reader = await client.create_key(org, scopes=["files:read"], budgets=[Budget(D("1"))])
    chat = await client.create_key(org, scopes=["chat:write"], budgets=[Budget(D("1"))])
    options = PATHS[path]
    for ok in (admin, writer):
        assert (
            await client.validate_key(ok.plaintext, required_scopes=needed, **options)
        ).id == ok.id
    with pytest.raises(InsufficientScopeError) as refused:
        await client.validate_key(reader.plaintext, required_scopes=needed, **options)
    assert refused.value.missing_scopes == ()
    assert refused.value.missing_any_of == (("chat:admin", "chat:write"),)
    with pytest.raises(InsufficientScopeError) as refused:
        await client.validate_key(chat.plaintext, required_scopes=needed, **options)
    assert (refused.value.missing_scopes, refused.value.missing_any_of) == (("files:read",), None)
    if path == "metered":  # refused calls spent nothing; admitted ones did
        assert [b.used for b in await client.get_budgets(reader.id)] == [D(0)]
        assert [b.used for b in await client.get_budgets(admin.id)] == [D("0.01")]


async def test_a_cached_validation_decides_any_of_alike(
    db_url: str, clock: Any, client: APIKeyClient
) -> None:
    org = (await client.create_organization("Acme")).id
    key = await client.create_key(org, scopes=["chat:admin"])
    async with APIKeyClient(
        db_url, signing_secret=client_secret(), clock=clock, auth_cache_ttl=30
    ) as cached:
        for _ in range(2):  # the second from the cache
            assert (
                await cached.validate_key(
                    key.plaintext, required_scopes=[any_of("chat:admin", "x")]
                )
            ).id == key.id
            with pytest.raises(InsufficientScopeError):
                await cached.validate_key(key.plaintext, required_scopes=[any_of("x", "y")])


def client_secret() -> str:
    from tests.conftest import SECRET

    return SECRET


async def test_require_scope_takes_any_of_and_answers_403_with_the_group(
    client: APIKeyClient,
) -> None:
    app = FastAPI()
    app.add_middleware(KeycapMiddleware, client=client, close_client=False)

    @app.get("/chat")
    async def chat(
        key: Annotated[APIKey, Depends(require_scope(any_of("chat:write", "chat:admin")))],
    ) -> str:
        return key.id

    org = (await client.create_organization("Acme")).id
    admin = await client.create_key(org, scopes=["chat:admin"])
    reader = await client.create_key(org, scopes=["chat:read"])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://a"
    ) as http:
        ok = await http.get("/chat", headers={"Authorization": f"Bearer {admin.plaintext}"})
        assert ok.status_code == 200
        refused = await http.get("/chat", headers={"Authorization": f"Bearer {reader.plaintext}"})
        assert refused.status_code == 403
        body = refused.json()
        assert body["code"] == "insufficient_scope"
        assert body["missing_any_of"] == [["chat:admin", "chat:write"]]
        assert refused.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
        spec = (await http.get("/openapi.json")).json()
        security = spec["paths"]["/chat"]["get"]["security"]
        assert {"APIKeyBearer": ["chat:admin", "chat:write"]} in security


# --- an organization's allowed scopes --------------------------------------------------


async def test_an_organization_with_allowed_scopes_refuses_keys_with_others(
    client: APIKeyClient,
) -> None:
    org = (await client.create_organization("Acme")).id
    before = await client.create_key(org, scopes=["legacy:thing"])
    fixed = await client.set_allowed_scopes(org, ["chat:*", "files:read"])
    assert fixed.allowed_scopes == ("chat:*", "files:read")
    assert (await client.get_organization(org)).allowed_scopes == ("chat:*", "files:read")
    ok = await client.create_key(org, scopes=["chat:write", "chat:admin:read", "files:read"])
    assert ok.key.scopes == ("chat:admin:read", "chat:write", "files:read")
    for unknown in (["files:write"], ["chat:write", "billing"], ["*"], ["files:*"]):
        with pytest.raises(InvalidArgumentError) as refused:
            await client.create_key(org, name="refused", scopes=unknown)
        assert refused.value.field == "scopes" and "not allowed in the organization" in str(
            refused.value
        )
    assert "refused" not in [k.name for k in await client.list_keys(org_id=org)]
    with pytest.raises(InvalidArgumentError):
        await client.update_key(ok.id, scopes=["files:write"])
    assert (await client.get_key(ok.id)).scopes == ok.key.scopes  # unchanged
    assert (await client.update_key(ok.id, scopes=["chat:read"])).scopes == ("chat:read",)
    assert (await client.validate_key(before.plaintext)).scopes == ("legacy:thing",)  # kept
    await client.set_allowed_scopes(org, None)
    assert (await client.get_organization(org)).allowed_scopes is None
    assert (await client.create_key(org, scopes=["anything"])).key.scopes == ("anything",)
    other = (await client.create_organization("Other")).id
    assert (await client.create_key(other, scopes=["files:write"])).key.scopes == ("files:write",)


async def test_allowed_scopes_need_an_organization_and_valid_scopes(client: APIKeyClient) -> None:
    with pytest.raises(NotFoundError):
        await client.set_allowed_scopes("org_000000000000", ["chat:write"])
    org = (await client.create_organization("Acme")).id
    with pytest.raises(InvalidArgumentError):
        await client.set_allowed_scopes(org, "chat:write")  # type: ignore[arg-type]
    empty = await client.set_allowed_scopes(org, [])  # no scope at all may be granted
    assert empty.allowed_scopes == ()
    with pytest.raises(InvalidArgumentError):
        await client.create_key(org, scopes=["chat:write"])
    assert (await client.create_key(org)).key.scopes == ()
