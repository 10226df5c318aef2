"""The FastAPI integration, through a real HTTP server: every status and header."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from keycap import APIKey, APIKeyClient, Budget, NotFoundError, RateLimit
from keycap.integrations.fastapi import (
    KeycapMiddleware,
    Meter,
    keycap_client,
    metered,
    require_scope,
)
from tests._server import serve
from tests.conftest import SECRET, FakeClock

PROBLEM = "application/problem+json"
TOKEN_PRICE = Decimal("0.01")


@dataclass
class World:
    org: str
    product: str
    key: str  # chat:write, restricted to nothing


async def world(client: APIKeyClient) -> World:
    org = (await client.create_organization("Acme")).id
    product = (await client.create_product(org, "chat-api")).id
    await client.create_product(org, "images-api")
    issued = await client.create_key(org, scopes=["chat:write"])
    return World(org, product, issued.plaintext)


def make_app(client: APIKeyClient | None, **options: Any) -> FastAPI:
    app = FastAPI()
    if client is not None:
        app.add_middleware(KeycapMiddleware, client=client, close_client=False, **options)

    @app.get("/chat")
    async def chat(
        key: Annotated[APIKey, Depends(require_scope("chat:write", product="chat-api"))],
    ) -> dict[str, Any]:
        return {"key": key.id}

    @app.get("/images")
    async def images(
        key: Annotated[APIKey, Depends(require_scope("chat:write", product="images-api"))],
    ) -> dict[str, Any]:
        return {"key": key.id}

    @app.get("/admin")
    async def admin(key: Annotated[APIKey, Depends(require_scope("admin"))]) -> dict[str, Any]:
        return {"key": key.id}

    @app.get("/paid")
    async def paid(
        key: Annotated[APIKey, Depends(require_scope(cost=Decimal("0.25")))],
    ) -> dict[str, Any]:
        return {"key": key.id}

    @app.get("/lookup")
    async def lookup(
        key: Annotated[APIKey, Depends(require_scope())],
        kc: Annotated[APIKeyClient, Depends(keycap_client)],
    ) -> dict[str, Any]:
        await kc.get_key("key_AAAAAAAAAAAA")  # NotFoundError from the handler itself
        return {}

    @app.get("/stream")
    async def stream(
        meter: Annotated[Meter, Depends(metered(reserve=Decimal("0.10")))],
        tokens: int = 5,
        pause: float = 0.0,
    ) -> StreamingResponse:
        async def body() -> Any:
            for n in range(tokens):
                meter.add(TOKEN_PRICE)
                yield f"token{n} "
                await asyncio.sleep(pause)

        return StreamingResponse(body(), media_type="text/plain")

    return app


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def get(base: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base) as http:
        return await http.get(path, headers=headers)


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert (body["status"], body["code"], body["type"]) == (status, code, "about:blank")
    assert body["title"] and body["detail"]
    return dict(body)


async def test_accepted_and_every_way_to_present_the_key(client: APIKeyClient) -> None:
    w = await world(client)
    async with serve(make_app(client)) as base:
        for headers in (
            bearer(w.key),
            {"Authorization": f"bearer {w.key}"},
            {"Authorization": f"BEARER   {w.key}"},
            {"X-API-Key": w.key},
            {"x-api-key": w.key},
        ):
            response = await get(base, "/chat", headers)
            assert response.status_code == 200, (headers, response.text)
            assert response.json()["key"].startswith("key_")
        # No rate limit, no cost: no limit headers.
        assert not [h for h in response.headers if h.startswith("ratelimit")]


async def test_401_missing_invalid_expired(client: APIKeyClient, clock: FakeClock) -> None:
    w = await world(client)
    expiring = await client.create_key(w.org, scopes=["chat:write"], expires_in="1h")
    async with serve(make_app(client)) as base:
        for headers in (None, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}):
            response = await get(base, "/chat", headers)
            assert_problem(response, 401, "missing_key")
            assert response.headers["www-authenticate"] == "Bearer"
        wrong = w.key[:-1] + ("A" if w.key[-1] != "A" else "B")
        for headers in (bearer(wrong), bearer("x" * 5000), {"X-API-Key": "sk_live_nope"}):
            response = await get(base, "/chat", headers)
            body = assert_problem(response, 401, "invalid_key")
            assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
            assert wrong not in response.text and "key_id" not in body
        clock.advance(hours=2)
        response = await get(base, "/chat", bearer(expiring.plaintext))
        body = assert_problem(response, 401, "expired_key")
        assert body["expired_at"] and body["key_id"] == expiring.id


async def test_revoked_and_disabled_are_401_forbidden_and_scope_are_403(
    client: APIKeyClient,
) -> None:
    w = await world(client)
    chat_only = await client.create_key(w.org, product_id=w.product, scopes=["chat:write"])
    disabled = await client.create_key(w.org, scopes=["chat:write"])
    revoked = await client.create_key(w.org, scopes=["chat:write"])
    await client.disable_key(disabled.id)
    await client.revoke_key(revoked.id)
    async with serve(make_app(client)) as base:
        for plaintext, code in (
            (revoked.plaintext, "revoked_key"),
            (disabled.plaintext, "disabled_key"),
        ):
            response = await get(base, "/chat", bearer(plaintext))
            assert_problem(response, 401, code)
            assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert (await get(base, "/chat", bearer(chat_only.plaintext))).status_code == 200
        body = assert_problem(
            await get(base, "/images", bearer(chat_only.plaintext)), 403, "forbidden"
        )
        assert body["reason"] == "product"
        response = await get(base, "/admin", bearer(w.key))
        body = assert_problem(response, 403, "insufficient_scope")
        assert body["missing_scopes"] == ["admin"]
        assert (
            response.headers["www-authenticate"]
            == 'Bearer error="insufficient_scope", scope="admin"'
        )


async def test_429_rate_limited_with_the_ietf_ratelimit_headers(
    client: APIKeyClient,
) -> None:
    w = await world(client)
    limited = await client.create_key(
        w.org, scopes=["chat:write"], rate_limits=[RateLimit(3, "minute", name="chat")]
    )
    async with serve(make_app(client)) as base:
        for remaining in (2, 1, 0):
            response = await get(base, "/chat", bearer(limited.plaintext))
            assert response.status_code == 200
            assert response.headers["ratelimit-policy"] == '"chat";q=3;w=60'
            name, r, t = response.headers["ratelimit"].split(";")
            assert (name, r) == ('"chat"', f"r={remaining}")
            # A sliding window: the full limit is back within two windows.
            assert 0 < int(t.removeprefix("t=")) <= 120
        last_admitted = response.headers["ratelimit"]
        response = await get(base, "/chat", bearer(limited.plaintext))
        body = assert_problem(response, 429, "rate_limited")
        assert int(response.headers["retry-after"]) >= 1
        # The same state (the fake clock stood still) says the same on a 429.
        assert response.headers["ratelimit"] == last_admitted
        assert response.headers["ratelimit-policy"] == '"chat";q=3;w=60'
        assert body["retry_after"] > 0 and body["limit"] == 3 and body["window_seconds"] == "60"


async def test_the_legacy_ratelimit_headers_are_an_option(client: APIKeyClient) -> None:
    w = await world(client)
    limited = await client.create_key(
        w.org, scopes=["chat:write"], rate_limits=[RateLimit(3, "minute")]
    )
    async with serve(make_app(client, rate_limit_headers="legacy")) as base:
        for remaining in (2, 1, 0):
            response = await get(base, "/chat", bearer(limited.plaintext))
            assert response.headers["ratelimit-limit"] == "3"
            assert response.headers["ratelimit-remaining"] == str(remaining)
            assert "ratelimit" not in response.headers
        reset = response.headers["ratelimit-reset"]
        response = await get(base, "/chat", bearer(limited.plaintext))
        assert_problem(response, 429, "rate_limited")
        # Before, a 429 said Retry-After here: now both say when the limit is back.
        assert response.headers["ratelimit-reset"] == reset


async def test_402_budget_or_429_when_configured(client: APIKeyClient) -> None:
    w = await world(client)
    for status, code in ((402, "budget_exceeded"), (429, "budget_exceeded")):
        budget = Budget(Decimal("0.50"), period="month")
        capped = await client.create_key(w.org, budgets=[budget])
        async with serve(make_app(client, budget_status=status)) as base:
            seen = []
            for _ in range(3):
                response = await get(base, "/paid", bearer(capped.plaintext))
                seen.append(response.status_code)
                if response.status_code == 200:
                    remaining = response.headers["keycap-budget-remaining"]
            assert seen == [200, 200, status] and remaining == "0"
            body = assert_problem(response, status, code)
            assert Decimal(body["remaining"]) == 0 and Decimal(body["requested"]) == Decimal("0.25")
            assert response.headers["keycap-budget-remaining"] == "0"
            assert ("retry-after" in response.headers) == (status == 429)


async def test_usage_cap_is_403_by_default_or_429(client: APIKeyClient) -> None:
    w = await world(client)
    for status in (403, 429):
        once = await client.create_key(w.org, scopes=["chat:write"], max_uses=1)
        async with serve(make_app(client, usage_exhausted_status=status)) as base:
            assert (await get(base, "/chat", bearer(once.plaintext))).status_code == 200
            response = await get(base, "/chat", bearer(once.plaintext))
            assert assert_problem(response, status, "usage_exhausted")["max_uses"] == 1


async def test_503_when_the_database_is_unreachable(client: APIKeyClient) -> None:
    w = await world(client)
    async with (
        APIKeyClient("postgresql://nobody:nothing@127.0.0.1:1/none", signing_secret=SECRET) as down,
        serve(make_app(down)) as base,
    ):
        response = await get(base, "/chat", bearer(w.key))
        assert_problem(response, 503, "database_unavailable")
        assert "nothing" not in response.text  # no password, no URL


async def test_errors_from_the_handler_are_problems_too(client: APIKeyClient) -> None:
    w = await world(client)
    async with serve(make_app(client)) as base:
        body = assert_problem(await get(base, "/lookup", bearer(w.key)), 404, "not_found")
        assert body["resource"] == "key"
    assert issubclass(NotFoundError, Exception)


async def test_which_headers_are_read_is_configurable(client: APIKeyClient) -> None:
    w = await world(client)
    async with serve(make_app(client, headers=["X-Keycap-Key"])) as base:
        assert (await get(base, "/chat", {"X-Keycap-Key": w.key})).status_code == 200
        assert_problem(await get(base, "/chat", bearer(w.key)), 401, "missing_key")


async def test_openapi_has_an_authorize_button(client: APIKeyClient) -> None:
    async with serve(make_app(client)) as base:
        spec = (await get(base, "/openapi.json")).json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["APIKeyBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer sk_live_…`",
    }
    assert schemes["APIKeyHeader"]["in"] == "header"
    assert schemes["APIKeyHeader"]["name"] == "X-API-Key"
    assert {"APIKeyBearer": ["chat:write"]} in spec["paths"]["/chat"]["get"]["security"]


async def test_without_the_middleware_refusals_are_http_exceptions(client: APIKeyClient) -> None:
    w = await world(client)
    app = make_app(None)
    app.state.keycap = client
    async with serve(app) as base:
        assert (await get(base, "/chat", bearer(w.key))).status_code == 200
        response = await get(base, "/admin", bearer(w.key))
        assert response.status_code == 403
        assert response.json()["detail"]["code"] == "insufficient_scope"
        response = await get(base, "/chat")
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


async def test_a_stream_is_settled_before_its_last_byte(client: APIKeyClient) -> None:
    w = await world(client)
    capped = await client.create_key(w.org, budgets=[Budget(Decimal("0.20"), period="month")])
    async with serve(make_app(client)) as base:
        response = await get(base, "/stream?tokens=5", bearer(capped.plaintext))
        assert response.status_code == 200 and response.text.count("token") == 5
        assert response.headers["keycap-budget-remaining"] == "0.1"  # after the hold
        [budget] = await client.get_budgets(capped.id)
        assert (budget.used, budget.held) == (Decimal("0.05"), Decimal("0"))
        # Over the hold: 12 tokens reserve 0.10, use 0.12; 0.03 of budget is left.
        response = await get(base, "/stream?tokens=12", bearer(capped.plaintext))
        assert response.status_code == 200
        [budget] = await client.get_budgets(capped.id)
        assert budget.used == Decimal("0.17")
        # 0.03 left: the reserve of 0.10 is refused before any work.
        response = await get(base, "/stream", bearer(capped.plaintext))
        assert_problem(response, 402, "budget_exceeded")


async def test_a_client_gone_mid_stream_is_charged_for_what_was_used(
    client: APIKeyClient,
) -> None:
    w = await world(client)
    capped = await client.create_key(w.org, budgets=[Budget(Decimal("1.00"), period="month")])
    async with serve(make_app(client)) as base:
        async with (
            httpx.AsyncClient(base_url=base) as http,
            http.stream(
                "GET", "/stream?tokens=1000&pause=0.02", headers=bearer(capped.plaintext)
            ) as response,
        ):
            assert response.status_code == 200
            got = 0
            async for chunk in response.aiter_text():
                got += chunk.count("token")
                if got >= 3:
                    break  # leaving the block closes the connection mid-stream
        for _ in range(200):
            [budget] = await client.get_budgets(capped.id)
            if budget.held == 0:
                break
            await asyncio.sleep(0.05)
    assert budget.held == 0
    # Charged for what was produced (at least what we read), nowhere near the 1000 tokens.
    assert TOKEN_PRICE * 3 <= budget.used <= Decimal("0.10")


async def test_the_middleware_closes_the_client_at_shutdown(db_url: str) -> None:
    closed = []

    class Recording(APIKeyClient):
        async def aclose(self) -> None:
            closed.append(True)
            await super().aclose()

    app = FastAPI()
    app.add_middleware(KeycapMiddleware, client=Recording(db_url, signing_secret=SECRET))
    async with serve(app):
        assert closed == []
    assert closed == [True]


async def test_limit_headers_can_be_switched_off(client: APIKeyClient) -> None:
    w = await world(client)
    limited = await client.create_key(
        w.org, scopes=["chat:write"], rate_limits=[RateLimit(3, "minute")]
    )
    async with serve(make_app(client, limit_headers=False)) as base:
        response = await get(base, "/chat", bearer(limited.plaintext))
        assert response.status_code == 200
        assert not [h for h in response.headers if h.startswith(("ratelimit", "keycap"))]


async def test_403_for_another_organization_or_project(client: APIKeyClient) -> None:
    w = await world(client)
    project = (await client.create_project(w.org, "agents")).id
    elsewhere = (await client.create_project(w.org, "batch")).id
    project_key = await client.create_key(w.org, project_id=project)
    app = FastAPI()
    app.add_middleware(KeycapMiddleware, client=client, close_client=False)

    @app.get("/org/{org_id}")
    async def by_org(org_id: str, request: Request) -> dict[str, str]:
        key = await require_scope(org_id=org_id)(request, None, None)
        return {"key": key.id}

    @app.get("/project/{project_id}")
    async def by_project(project_id: str, request: Request) -> dict[str, str]:
        key = await require_scope(project_id=project_id)(request, None, None)
        return {"key": key.id}

    async with serve(app) as base:
        assert (await get(base, f"/org/{w.org}", bearer(w.key))).status_code == 200
        other = (await client.create_organization("Other")).id
        body = assert_problem(await get(base, f"/org/{other}", bearer(w.key)), 403, "forbidden")
        assert body["reason"] == "organization"
        ok = await get(base, f"/project/{project}", bearer(project_key.plaintext))
        assert ok.status_code == 200
        refused = await get(base, f"/project/{elsewhere}", bearer(project_key.plaintext))
        assert assert_problem(refused, 403, "forbidden")["reason"] == "project"


async def test_a_route_with_its_own_client_is_still_settled(client: APIKeyClient) -> None:
    w = await world(client)
    capped = await client.create_key(w.org, budgets=[Budget(Decimal("1.00"), period="month")])
    own = APIKeyClient(client.engine, signing_secret=SECRET)
    app = FastAPI()
    app.add_middleware(KeycapMiddleware, client=client, close_client=False)

    own_meter = metered(reserve=Decimal("0.50"), client=own)

    @app.get("/own")
    async def own_route(meter: Meter = Depends(own_meter)) -> dict[str, str]:  # noqa: B008
        meter.add(Decimal("0.2"))
        return {"hold": meter.hold.id}

    async with serve(app) as base:
        response = await get(base, "/own", bearer(capped.plaintext))
        assert response.status_code == 200
    [budget] = await client.get_budgets(capped.id)
    assert (budget.used, budget.held) == (Decimal("0.2"), Decimal(0))
