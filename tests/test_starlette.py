"""The Starlette authentication backend, through a real HTTP server."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keycap import APIKeyClient, RateLimit
from keycap.integrations.starlette import KeycapBackend, KeycapUser
from tests._server import serve


def make_app(client: APIKeyClient) -> Starlette:
    async def whoami(request: Request) -> JSONResponse:
        user = request.user
        return JSONResponse(
            {
                "authenticated": user.is_authenticated,
                "scopes": sorted(request.auth.scopes),
                "key": user.key.id if isinstance(user, KeycapUser) else None,
                "chat_write": isinstance(user, KeycapUser) and user.has_scope("chat:write"),
            }
        )

    backend = KeycapBackend(client, product="chat-api")
    return Starlette(
        routes=[Route("/whoami", whoami)],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=backend, on_error=backend.on_error)
        ],
    )


async def test_the_backend_authenticates_keys_and_exposes_their_scopes(
    client: APIKeyClient,
) -> None:
    org = (await client.create_organization("Acme")).id
    await client.create_product(org, "chat-api")
    issued = await client.create_key(org, scopes=["chat:*"], rate_limits=[RateLimit(2, "minute")])
    revoked = await client.create_key(org)
    await client.revoke_key(revoked.id)
    async with serve(make_app(client)) as base, httpx.AsyncClient(base_url=base) as http:
        anonymous = (await http.get("/whoami")).json()
        assert anonymous == {
            "authenticated": False,
            "scopes": [],
            "key": None,
            "chat_write": False,
        }
        ok = await http.get("/whoami", headers={"Authorization": f"Bearer {issued.plaintext}"})
        assert ok.json() == {
            "authenticated": True,
            "scopes": ["authenticated", "chat:*"],
            "key": issued.id,
            "chat_write": True,
        }
        response = await http.get("/whoami", headers={"X-API-Key": revoked.plaintext})
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "revoked_key"
        response = await http.get("/whoami", headers={"X-API-Key": "sk_live_garbage"})
        assert (response.status_code, response.json()["code"]) == (401, "invalid_key")
        await http.get("/whoami", headers={"X-API-Key": issued.plaintext})
        response = await http.get("/whoami", headers={"X-API-Key": issued.plaintext})
        assert (response.status_code, response.json()["code"]) == (429, "rate_limited")
        assert int(response.headers["retry-after"]) >= 1
