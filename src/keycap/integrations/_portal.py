"""Self-serve key management: JSON endpoints an app mounts for its customers.

``key_management_router(manager=...)`` returns a FastAPI ``APIRouter``. The
``manager`` dependency is the app's own: it says who is calling (``actor``) and
which organization they may manage (``org_id``), and optionally which scopes
they may grant. Every endpoint works inside that organization only: another
organization's key is a 404, as if it did not exist. docs/portal.md.

``delegation_router()`` lets a key itself (one granted ``keys:delegate``) mint,
list and revoke its own delegated keys: for agents that start agents.
docs/agents.md.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints'
# annotations, which name dependencies local to key_management_router.
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from keycap._client import APIKeyClient
from keycap._errors import InvalidArgumentError, NotFoundError
from keycap._models import AccessRequest, APIKey, KeyStatus, Remaining, UsageRow
from keycap._rules import scopes as scope_rules
from keycap._rules.budgets import Budget
from keycap._rules.rate_limits import RateLimit

if TYPE_CHECKING:
    from keycap.integrations._page import CsrfToken


@dataclass(frozen=True, slots=True)
class Manager:
    """Who manages keys through the router: the app's user, in one organization.

    ``grantable``: the scopes this manager may put on a key (patterns allowed,
    as in ``chat:*``); None: any scope.
    """

    actor: str
    org_id: str
    grantable: frozenset[str] | None = field(default=None)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetIn(_Body):
    limit: Decimal
    period: str = "month"
    meter: str = "spend"


class RateLimitIn(_Body):
    limit: int
    window: str = "minute"


class KeyCreate(_Body):
    name: str = ""
    scopes: list[str] = Field(default_factory=list)
    project_id: str | None = None
    product_id: str | None = None
    expires_in: str | None = Field(default=None, examples=["30d"])
    budgets: list[BudgetIn] = Field(default_factory=list)
    rate_limits: list[RateLimitIn] = Field(default_factory=list)


class KeyDelegate(_Body):
    """A child of the calling key; what is left out (None) is the caller's."""

    name: str = ""
    scopes: list[str] | None = None
    expires_in: str | None = Field(default=None, examples=["1h"])
    budgets: list[BudgetIn] = Field(default_factory=list)
    rate_limits: list[RateLimitIn] = Field(default_factory=list)
    max_uses: int | None = None


class AccessAsk(_Body):
    """An agent's or app's request for a key."""

    requester: str
    reason: str = ""
    scopes: list[str] = Field(default_factory=list)
    project_id: str | None = None
    product_id: str | None = None
    budgets: list[BudgetIn] = Field(default_factory=list)
    expires_in: str | None = Field(default=None, examples=["30d"])


class AccessAsked(BaseModel):
    """A pending request, and the secret that claims its key: shown once."""

    request: AccessRequest
    claim_secret: str


class AccessClaim(_Body):
    claim_secret: str


class AccessApproval(_Body):
    """Approve as asked, or narrower (fields left out: as asked)."""

    scopes: list[str] | None = None
    budgets: list[BudgetIn] | None = None
    expires_in: str | None = None
    note: str | None = None


class AccessDenial(_Body):
    reason: str


class KeyUpdate(_Body):
    name: str | None = None
    scopes: list[str] | None = None


class Roll(_Body):
    grace: str = Field(default="24h", examples=["24h", "0s"])


class KeyShown(BaseModel):
    """A key with what it can still spend."""

    key: APIKey
    status: KeyStatus
    remaining: list[Remaining]


class KeyIssued(BaseModel):
    """A new secret: shown in this response only."""

    key: APIKey
    plaintext: str


def client_dependency(client: APIKeyClient | None) -> Any:
    """A FastAPI dependency: ``client``, or by default the request's
    (KeycapMiddleware or ``app.state.keycap``)."""
    from keycap.integrations.fastapi import keycap_client

    def dependency(request: Request) -> APIKeyClient:
        return client if client is not None else keycap_client(request)

    return dependency


def _budget(b: BudgetIn) -> Budget:
    return Budget(b.limit, b.period, meter=b.meter)


def _rate_limit(r: RateLimitIn) -> RateLimit:
    return RateLimit(r.limit, r.window)


async def own_key(kc: APIKeyClient, who: Manager, key_id: str) -> APIKey:
    """The key, if it is in the manager's organization; else NotFoundError (a 404),
    as for a key that does not exist."""
    key = await kc.get_key(key_id)
    if key.org_id != who.org_id:
        raise NotFoundError("key", key_id)
    return key


def grantable(who: Manager, scopes: Sequence[str]) -> list[str]:
    """``scopes``, normalized, if the manager may grant them all; else InvalidArgumentError."""
    wanted = scope_rules.normalize(scopes, "scopes")
    if who.grantable is not None and (beyond := scope_rules.missing(who.grantable, wanted)):
        raise InvalidArgumentError("scopes", "not yours to grant: " + ", ".join(beyond))
    return list(wanted)


async def change_state(kc: APIKeyClient, who: Manager, key_id: str, action: str) -> APIKey:
    """Revoke, disable or enable the manager's own key, as the manager (audit log)."""
    await own_key(kc, who, key_id)
    method = {"revoke": kc.revoke_key, "disable": kc.disable_key, "enable": kc.enable_key}[action]
    with kc.acting_as(who.actor):
        return await method(key_id)


def key_management_router(
    *,
    manager: Any,
    client: APIKeyClient | None = None,
    page: bool = False,
    csrf_token: "CsrfToken | None" = None,
    title: str = "API keys",
) -> APIRouter:
    """The key management endpoints, to mount with ``app.include_router(router,
    prefix="/account/api-keys")``.

    Args:
        manager: a FastAPI dependency returning the :class:`Manager` of the
            request (the app's login, or a keycap key with a management scope).
        client: the client to use; by default the request's (KeycapMiddleware or
            ``app.state.keycap``).
        page: also serve the key management page at the prefix's root
            (``GET {prefix}/``), whose forms post to ``{prefix}/ui/...``.
        csrf_token: the page's CSRF token for a request, from the app's own CSRF
            protection (sync or async); by default keycap sets its own
            double-submit cookie. Either way every form is checked.
        title: the page's heading.
    """
    router = APIRouter(tags=["API keys"])
    Who = Annotated[Manager, Depends(manager)]

    _client = client_dependency(client)
    Client = Annotated[APIKeyClient, Depends(_client)]

    async def _shown(kc: APIKeyClient, key: APIKey) -> KeyShown:
        return KeyShown(
            key=key, status=key.status_at(kc.now()), remaining=await kc.remaining(key.id)
        )

    @router.get("/keys", summary="The organization's keys, newest first")
    async def list_keys(
        who: Who,
        kc: Client,
        limit: Annotated[int, Query(ge=1, le=100)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
        status: KeyStatus | None = None,
        project_id: str | None = None,
        identity_id: str | None = None,
    ) -> list[APIKey]:
        return await kc.list_keys(
            org_id=who.org_id,
            project_id=project_id,
            identity_id=identity_id,
            status=status,
            limit=limit,
            offset=offset,
            newest_first=True,
        )

    @router.post("/keys", status_code=201, summary="Create a key (its secret is shown once)")
    async def create_key(body: KeyCreate, who: Who, kc: Client) -> KeyIssued:
        with kc.acting_as(who.actor):
            issued = await kc.create_key(
                who.org_id,
                name=body.name,
                scopes=grantable(who, body.scopes),
                project_id=body.project_id,
                product_id=body.product_id,
                expires_in=body.expires_in,
                budgets=[_budget(b) for b in body.budgets],
                rate_limits=[_rate_limit(r) for r in body.rate_limits],
                delegated_by=who.actor,
            )
        return KeyIssued(key=issued.key, plaintext=issued.plaintext)

    @router.get("/keys/{key_id}", summary="A key, with what it can still spend")
    async def show_key(key_id: str, who: Who, kc: Client) -> KeyShown:
        return await _shown(kc, await own_key(kc, who, key_id))

    @router.patch("/keys/{key_id}", summary="Rename a key, or change its scopes")
    async def update_key(key_id: str, body: KeyUpdate, who: Who, kc: Client) -> KeyShown:
        await own_key(kc, who, key_id)
        changes: dict[str, Any] = {}
        if body.name is not None:
            changes["name"] = body.name
        if body.scopes is not None:
            changes["scopes"] = grantable(who, body.scopes)
        with kc.acting_as(who.actor):
            changed = await kc.update_key(key_id, **changes)
        return await _shown(kc, changed)

    @router.post("/keys/{key_id}/roll", summary="A new secret; the old one works for the grace")
    async def roll_key(key_id: str, body: Roll, who: Who, kc: Client) -> KeyIssued:
        await own_key(kc, who, key_id)
        with kc.acting_as(who.actor):
            rolled = await kc.roll_key(key_id, grace=body.grace)
        return KeyIssued(key=rolled.key, plaintext=rolled.plaintext)

    for action in ("revoke", "disable", "enable"):

        def _changer(action: str = action) -> Any:
            async def change(key_id: str, who: Who, kc: Client) -> KeyShown:
                return await _shown(kc, await change_state(kc, who, key_id, action))

            change.__name__ = f"{action}_key"
            return change

        router.post(f"/keys/{{key_id}}/{action}", summary=f"{action.capitalize()} a key")(
            _changer()
        )

    @router.get("/keys/{key_id}/usage", summary="Spending per day, per meter, from the ledger")
    async def usage(
        key_id: str,
        who: Who,
        kc: Client,
        days: Annotated[int, Query(ge=1, le=366)] = 30,
    ) -> list[UsageRow]:
        await own_key(kc, who, key_id)
        return await kc.usage(key_id=key_id, since=kc.now() - timedelta(days=days), per="day")

    @router.get("/access-requests", summary="Requests for keys, newest first")
    async def list_requests(
        who: Who,
        kc: Client,
        status: str | None = "pending",
        limit: Annotated[int, Query(ge=1, le=100)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[AccessRequest]:
        return await kc.list_access_requests(who.org_id, status=status, limit=limit, offset=offset)

    async def own_request(kc: APIKeyClient, who: Manager, request_id: str) -> None:
        if (await kc.get_access_request(request_id)).org_id != who.org_id:
            raise NotFoundError("access request", request_id)

    @router.post("/access-requests/{request_id}/approve", summary="Approve, as asked or narrower")
    async def approve(request_id: str, body: AccessApproval, who: Who, kc: Client) -> AccessRequest:
        await own_request(kc, who, request_id)
        scopes = None if body.scopes is None else grantable(who, body.scopes)
        budgets = None if body.budgets is None else [_budget(b) for b in body.budgets]
        with kc.acting_as(who.actor):
            return await kc.approve_access(
                request_id,
                scopes=scopes,
                budgets=budgets,
                expires_in=body.expires_in,
                note=body.note,
            )

    @router.post("/access-requests/{request_id}/deny", summary="Deny, saying why")
    async def deny(request_id: str, body: AccessDenial, who: Who, kc: Client) -> AccessRequest:
        await own_request(kc, who, request_id)
        with kc.acting_as(who.actor):
            return await kc.deny_access(request_id, reason=body.reason)

    if page:
        from keycap.integrations._page import add_page

        add_page(router, manager=manager, client=_client, csrf_token=csrf_token, title=title)
    return router


#: The scope a key needs to mint its own children over HTTP.
DELEGATE_SCOPE = "keys:delegate"


def delegation_router(
    *, client: APIKeyClient | None = None, scope: str = DELEGATE_SCOPE
) -> APIRouter:
    """Endpoints a key calls about its own delegated keys, authenticated by that key
    (granted ``scope``, ``keys:delegate`` by default), to mount with
    ``app.include_router(router, prefix="/v1")``:

    - ``POST /keys/children``: mint a child (``KeyDelegate``); 201 with its
      secret, shown once;
    - ``GET /keys/children``: the caller's descendants, newest first;
    - ``POST /keys/children/{key_id}/revoke``: revoke one of them (another key
      is a 404).

    Each change is in the audit log with the calling key as actor (``key:<id>``).
    A child may hold ``keys:delegate`` only if the caller does, so the tree grows
    only as deep as ``max_delegation_depth``.
    """
    from keycap.integrations.fastapi import require_scope

    router = APIRouter(tags=["Delegated keys"])
    Caller = Annotated[APIKey, Depends(require_scope(scope, client=client))]

    _client = client_dependency(client)
    Client = Annotated[APIKeyClient, Depends(_client)]

    @router.post("/keys/children", status_code=201, summary="Mint a child of this key (shown once)")
    async def delegate(
        body: KeyDelegate, caller: Caller, kc: Client, response: Response
    ) -> KeyIssued:
        response.headers["Cache-Control"] = "no-store"
        with kc.acting_as(f"key:{caller.id}"):
            issued = await kc.delegate(
                caller.id,
                name=body.name,
                scopes=body.scopes,
                expires_in=body.expires_in,
                budgets=[_budget(b) for b in body.budgets],
                rate_limits=[_rate_limit(r) for r in body.rate_limits],
                max_uses=body.max_uses,
            )
        return KeyIssued(key=issued.key, plaintext=issued.plaintext)

    @router.get("/keys/children", summary="This key's delegated keys, newest first")
    async def children(
        caller: Caller,
        kc: Client,
        limit: Annotated[int, Query(ge=1, le=100)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[APIKey]:
        return await kc.list_keys(
            descendants_of=caller.id, limit=limit, offset=offset, newest_first=True
        )

    @router.post("/keys/children/{key_id}/revoke", summary="Revoke one of this key's children")
    async def revoke(key_id: str, caller: Caller, kc: Client) -> APIKey:
        if caller.id not in (await kc.get_key(key_id)).ancestors:
            raise NotFoundError("key", key_id)
        with kc.acting_as(f"key:{caller.id}"):
            return await kc.revoke_key(key_id)

    return router


def access_request_router(*, org_id: Any, client: APIKeyClient | None = None) -> APIRouter:
    """Endpoints an agent or app calls to ask for a key, before it has one, to
    mount with ``app.include_router(router, prefix="/v1")``:

    - ``POST /access-requests`` (``AccessAsk``): 201 with the pending request and
      its claim secret, shown once;
    - ``POST /access-requests/{request_id}/claim`` with ``{"claim_secret": ...}``:
      201 with the key and its plaintext, once; until then 409
      ``access_not_granted`` says where the request stands (``pending``,
      ``denied`` with the owner's ``reason``, ``claimed``, ``expired``), so the
      requester polls this. A wrong secret is a 404, like an unknown request.

    ``org_id``: a FastAPI dependency returning the organization requests go to
    (the app's choice: a fixed one, or one from the path or host). Owners decide
    through ``key_management_router``'s ``/access-requests`` endpoints.
    """
    router = APIRouter(tags=["Access requests"])
    Org = Annotated[str, Depends(org_id)]

    _client = client_dependency(client)
    Client = Annotated[APIKeyClient, Depends(_client)]

    @router.post("/access-requests", status_code=201, summary="Ask for a key")
    async def ask(body: AccessAsk, org: Org, kc: Client, response: Response) -> AccessAsked:
        response.headers["Cache-Control"] = "no-store"
        request, secret = await kc.request_access(
            org,
            requester=body.requester,
            reason=body.reason,
            scopes=body.scopes,
            project_id=body.project_id,
            product_id=body.product_id,
            budgets=[_budget(b) for b in body.budgets],
            expires_in=body.expires_in,
        )
        return AccessAsked(request=request, claim_secret=secret)

    @router.post(
        "/access-requests/{request_id}/claim",
        status_code=201,
        summary="Claim the key of an approved request (shown once)",
    )
    async def claim(
        request_id: str, body: AccessClaim, org: Org, kc: Client, response: Response
    ) -> KeyIssued:
        response.headers["Cache-Control"] = "no-store"
        if (await kc.get_access_request(request_id)).org_id != org:
            raise NotFoundError("access request", request_id)
        issued = await kc.claim_access(request_id, body.claim_secret)
        return KeyIssued(key=issued.key, plaintext=issued.plaintext)

    return router
