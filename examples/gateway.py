"""A small "LLM gateway" on keycap: keys with a monthly budget, a reserve before
each (fake, deterministic) streamed completion, the real cost settled after.

    export KEYCAP_DATABASE_URL=sqlite:///gateway.db KEYCAP_SIGNING_SECRET=...
    keycap db upgrade
    keycap org create Acme
    ADMIN=$(keycap key create --org Acme --scope admin --name ops)
    uvicorn --factory --app-dir examples gateway:app_from_env

    # an admin issues a customer key with a $5 monthly budget
    curl -s -X POST localhost:8000/admin/keys -H "Authorization: Bearer $ADMIN" \
         -H 'content-type: application/json' -d '{"name": "agent-1", "monthly_budget": "5.00"}'
    # the customer streams completions until the budget says 402
    curl -N -X POST localhost:8000/v1/completions -H "Authorization: Bearer $KEY" \
         -H 'content-type: application/json' -d '{"prompt": "hello there", "max_tokens": 50}'

    # or an admin opens http://localhost:8000/admin/login in a browser, signs in
    # with the admin key, and manages the organization's keys on keycap's page

Pricing: PRICE_PER_TOKEN for every generated token. A completion reserves its
worst case (max_tokens x price) first, so a key can never start work it cannot
pay for, then the middleware settles what was really generated.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, Field

from keycap import APIKey, APIKeyClient, Budget, KeycapError, NotFoundError
from keycap.integrations.fastapi import (
    KeycapMiddleware,
    Manager,
    key_management_router,
    keycap_client,
    open_meter,
    require_scope,
)

PRICE_PER_TOKEN = Decimal("0.001")
PRODUCT = "chat-api"
MAX_TOKENS = 1000
#: The admin's session: the admin key itself, in a cookie scripts cannot read and
#: other sites cannot send (a real app would keep its own session here).
ADMIN_COOKIE = "gateway_admin"
PORTAL = "/admin/portal"

# Dependencies as module-level aliases (they also work under
# `from __future__ import annotations`, which hides function locals from FastAPI).
ChatKey = Annotated[APIKey, Depends(require_scope("chat:write", product=PRODUCT))]
AdminKey = Annotated[APIKey, Depends(require_scope("admin"))]
Keycap = Annotated[APIKeyClient, Depends(keycap_client)]


class CompletionRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=10_000)
    max_tokens: int = Field(default=100, ge=1, le=MAX_TOKENS)


class NewKey(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    monthly_budget: Decimal = Field(ge=0, decimal_places=6)


class IssuedKeyOut(BaseModel):
    id: str
    key: str  # shown once


class KeyOut(BaseModel):
    id: str
    name: str
    status: str
    used: Decimal | None
    limit: Decimal | None
    resets_at: datetime | None


def fake_completion(prompt: str, max_tokens: int) -> list[str]:
    """Deterministic "tokens": five per prompt word, at most max_tokens."""
    words = prompt.split() or ["…"]
    count = min(max_tokens, 5 * len(words))
    return [f"{words[i % len(words)]}#{i}" for i in range(count)]


async def admin_manager(request: Request, kc: Keycap) -> Manager:
    """Who manages keys on the page: the admin key in the login cookie. Without
    one, the browser is sent to the login form."""
    presented = request.cookies.get(ADMIN_COOKIE)
    if presented is None:
        raise HTTPException(303, "log in", headers={"Location": "/admin/login"})
    key = await kc.validate_key(presented, required_scopes=["admin"])  # else a 401/403 problem
    return Manager(actor=key.id, org_id=key.org_id, grantable=frozenset({"chat:write"}))


LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Sign in</title></head><body><main><h1>Gateway admin</h1>{error}
<form method="post" action="/admin/login"><label>Admin key
<input name="key" type="password" autocomplete="off" required></label>
<button type="submit">Sign in</button></form></main></body></html>"""


def create_app(client: APIKeyClient, *, token_delay: float = 0.0) -> FastAPI:
    app = FastAPI(title="keycap example gateway")
    app.add_middleware(KeycapMiddleware, client=client)
    # keycap's key management page (and its JSON endpoints) for the admins.
    app.include_router(key_management_router(manager=admin_manager, page=True), prefix=PORTAL)

    @app.get("/admin/login", include_in_schema=False)
    async def login_form() -> HTMLResponse:
        return HTMLResponse(LOGIN_PAGE.format(error=""))

    @app.post("/admin/login", include_in_schema=False)
    async def login(request: Request, kc: Keycap) -> Any:
        presented = dict(parse_qsl((await request.body()).decode("utf-8", "replace"))).get(
            "key", ""
        )
        try:
            await kc.validate_key(presented, required_scopes=["admin"])
        except KeycapError:
            error = '<p role="alert">That is not an admin key.</p>'
            return HTMLResponse(LOGIN_PAGE.format(error=error), status_code=401)
        signed_in = RedirectResponse(f"{PORTAL}/", status_code=303)
        signed_in.set_cookie(
            ADMIN_COOKIE,
            presented,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/admin",
        )
        return signed_in

    @app.post("/v1/completions")
    async def completions(
        body: CompletionRequest,
        request: Request,
        key: ChatKey,
    ) -> StreamingResponse:
        # Reserve the worst case; 402 here, before any work, if it does not fit.
        meter = await open_meter(request, key, PRICE_PER_TOKEN * body.max_tokens)

        async def stream() -> AsyncIterator[str]:
            for token in fake_completion(body.prompt, body.max_tokens):
                meter.add(
                    PRICE_PER_TOKEN
                )  # counted as produced: a client gone mid-stream pays for these
                yield token + " "
                await asyncio.sleep(token_delay)

        return StreamingResponse(stream(), media_type="text/plain")

    @app.post("/admin/keys", status_code=201)
    async def create_key(
        new: NewKey,
        me: AdminKey,
        kc: Keycap,
    ) -> IssuedKeyOut:
        product, _ = await kc.get_or_create_product(me.org_id, PRODUCT)
        issued = await kc.create_key(
            me.org_id,
            product_id=product.id,
            name=new.name,
            scopes=["chat:write"],
            budgets=[Budget(new.monthly_budget, period="month", alert_thresholds=(80, 100))],
            delegated_by=me.id,
        )
        return IssuedKeyOut(id=issued.id, key=issued.plaintext)

    @app.get("/admin/keys")
    async def list_keys(
        me: AdminKey,
        kc: Keycap,
    ) -> list[KeyOut]:
        out = []
        for key in await kc.list_keys(org_id=me.org_id):
            budgets = [b for b in await kc.get_budgets(key.id) if b.scope == "key"]
            spend = budgets[0] if budgets else None
            out.append(
                KeyOut(
                    id=key.id,
                    name=key.name,
                    status=key.status_at(kc.now()).value,
                    used=spend.used if spend else None,
                    limit=spend.limit + spend.credit if spend else None,
                    resets_at=spend.reset_at if spend else None,
                )
            )
        return out

    @app.delete("/admin/keys/{key_id}")
    async def revoke_key(
        key_id: str,
        me: AdminKey,
        kc: Keycap,
    ) -> dict[str, Any]:
        key = await kc.get_key(key_id)  # 404 problem if there is none
        if key.org_id != me.org_id:
            raise NotFoundError("key", key_id)  # another tenant's key does not exist for you
        revoked = await kc.revoke_key(key_id)
        return {"id": revoked.id, "revoked_at": revoked.revoked_at}

    return app


def app_from_env() -> FastAPI:
    """``uvicorn --factory --app-dir examples gateway:app_from_env``."""
    secret = os.environ.get("KEYCAP_SIGNING_SECRET")
    if not secret:
        raise SystemExit("set KEYCAP_SIGNING_SECRET")
    client = APIKeyClient(
        os.environ.get("KEYCAP_DATABASE_URL", "sqlite:///gateway.db"), signing_secret=secret
    )
    return create_app(client, token_delay=float(os.environ.get("GATEWAY_TOKEN_DELAY", "0")))
