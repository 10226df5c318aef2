"""FastAPI: ``Depends(require_scope(...))`` and metered requests.

::

    client = APIKeyClient(DATABASE_URL, signing_secret=SECRET)
    app = FastAPI()
    app.add_middleware(KeycapMiddleware, client=client)   # problem+json, headers, shutdown

    @app.post("/v1/chat")
    async def chat(key: APIKey = Depends(require_scope("chat:write", product="chat-api"))): ...

See docs/integrations/fastapi.md.
"""

from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer

from keycap._client import APIKeyClient
from keycap._errors import ConfigurationError, KeycapError, MissingKeyError
from keycap._models import APIKey
from keycap._rules import money
from keycap._rules import scopes as scope_rules
from keycap.integrations._http import (
    BUDGET_REMAINING_HEADER,
    HTTPOptions,
    credential,
    problem,
    success_headers,
    tightest,
)
from keycap.integrations.asgi import SCOPE_KEY, KeycapMiddleware, Meter, RequestContext

__all__ = [
    "KeycapMiddleware",
    "Meter",
    "keycap_client",
    "metered",
    "open_meter",
    "require_scope",
]

# Declared for OpenAPI only (the docs page's "Authorize" button); the key is read
# by keycap itself, from the headers KeycapMiddleware is configured with.
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APIKeyBearer",
    description="An API key: `Authorization: Bearer sk_live_…`",
)
_api_key = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="APIKeyHeader",
    description="An API key in the `X-API-Key` header",
)


def _context(request: Request, client: APIKeyClient | None) -> tuple[RequestContext, APIKeyClient]:
    """The request's context (the middleware's, or one made here without it) and
    the client to use: the one passed explicitly, else the context's."""
    ctx = request.scope.get(SCOPE_KEY)
    if isinstance(ctx, RequestContext):
        return ctx, client or ctx.client
    found = client if client is not None else getattr(request.app.state, "keycap", None)
    if not isinstance(found, APIKeyClient):
        raise ConfigurationError(
            "no keycap client: add KeycapMiddleware(client=...), set app.state.keycap, "
            "or pass client= to require_scope"
        )
    ctx = RequestContext(found, HTTPOptions(), middleware=False)
    request.scope[SCOPE_KEY] = ctx
    return ctx, found


def keycap_client(request: Request) -> APIKeyClient:
    """A dependency: the request's :class:`~keycap.APIKeyClient` (for ``charge`` and the like)."""
    return _context(request, None)[1]


def require_scope(
    *scopes: str,
    product: str | None = None,
    product_id: str | None = None,
    project_id: str | None = None,
    org_id: str | None = None,
    cost: money.Amount | Mapping[str, money.Amount] | None = None,
    client: APIKeyClient | None = None,
) -> Callable[..., Awaitable[APIKey]]:
    """A dependency that validates the request's key and yields the :class:`~keycap.APIKey`.

    Args:
        scopes: every one must be granted to the key.
        product: a product name, looked up in the key's organization; or
            ``product_id``. ``project_id`` and ``org_id`` restrict likewise.
        cost: charged by the validation itself, all or nothing with the rate
            limits (``Decimal``, or ``{meter: amount}``).
        client: the client to use; by default the one of ``KeycapMiddleware``
            (or ``app.state.keycap``).

    Refusals are keycap errors; with ``KeycapMiddleware`` they become
    ``application/problem+json`` responses (401/402/403/429/503), without it
    ``HTTPException`` with the same status, headers and data.
    """
    required = scope_rules.normalize(scopes, "scopes")  # a bad scope fails at import
    if cost is not None:
        money.costs(cost)

    async def dependency(
        request: Request,
        _bearer_doc: Annotated[Any, Security(_bearer)],
        _header_doc: Annotated[Any, Security(_api_key)],
    ) -> APIKey:
        ctx, kc = _context(request, client)
        try:
            presented = credential(request.headers, ctx.options.headers)
            if presented is None:
                raise MissingKeyError()
            key = await kc.validate_key(
                presented,
                required_scopes=required,
                product_name=product,
                product_id=product_id,
                project_id=project_id,
                org_id=org_id,
                cost=cost,
            )
        except KeycapError as error:
            raise _refusal(ctx, kc, error) from None
        if ctx.options.limit_headers:
            ctx.response_headers.update(
                success_headers(key, kc.now(), ctx.options.rate_limit_headers)
            )
        return key

    return dependency


def metered(
    *scopes: str,
    reserve: money.Amount,
    meter: str = money.DEFAULT_METER,
    ttl: str | timedelta = "5m",
    product: str | None = None,
    product_id: str | None = None,
    client: APIKeyClient | None = None,
) -> Callable[..., Awaitable[Meter]]:
    """A dependency for work whose cost is known only afterwards (a streamed completion).

    It validates the key like :func:`require_scope`, reserves ``reserve`` on the
    key's budgets (402 if they cannot take it), and yields a :class:`Meter`; see
    :func:`open_meter` for what happens next. When the amount to reserve depends
    on the request (its ``max_tokens``), use ``require_scope`` and ``open_meter``.
    """
    authenticate = require_scope(*scopes, product=product, product_id=product_id, client=client)
    reserved = money.from_micros(money.to_micros(reserve, "reserve"))

    async def dependency(request: Request, key: Annotated[APIKey, Depends(authenticate)]) -> Meter:
        return await open_meter(request, key, reserved, meter=meter, ttl=ttl, client=client)

    return dependency


async def open_meter(
    request: Request,
    key: APIKey,
    amount: money.Amount,
    *,
    meter: str = money.DEFAULT_METER,
    ttl: str | timedelta = "5m",
    client: APIKeyClient | None = None,
) -> Meter:
    """Reserve ``amount`` on ``key``'s budgets for this request and return its :class:`Meter`.

    The handler calls ``meter.add(cost)`` as the work goes. ``KeycapMiddleware``
    settles the hold with what was added just before the last byte of the
    response, or when the request ends early (an error, a client gone
    mid-stream): what was used is always charged and the rest returned.

    Raises: BudgetExceededError (a 402 response) when the budgets cannot take it.
    """
    ctx, kc = _context(request, client)
    if not ctx.middleware:
        raise ConfigurationError("open_meter() needs KeycapMiddleware to settle the hold")
    try:
        hold = await kc.reserve(key.id, amount, meter=meter, ttl=ttl)
    except KeycapError as error:
        raise _refusal(ctx, kc, error) from None
    found = Meter(kc, key, hold)
    ctx.meters.append(found)
    if ctx.options.limit_headers and hold.budgets:
        ctx.response_headers[BUDGET_REMAINING_HEADER] = money.plain(tightest(hold.budgets))
    return found


def _refusal(ctx: RequestContext, kc: APIKeyClient, error: KeycapError) -> Exception:
    """With the middleware, the error itself (it renders problem+json); without,
    an HTTPException carrying the same status, headers and data."""
    if ctx.middleware:
        return error
    found = problem(error, ctx.options, kc.now())
    return HTTPException(found.status, detail=found.body, headers=found.headers)
