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

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPBearer

from keycap._client import APIKeyClient
from keycap._errors import ConfigurationError, KeycapError, MissingKeyError
from keycap._models import APIKey
from keycap._rules import money
from keycap._rules import scopes as scope_rules
from keycap.integrations import asgi
from keycap.integrations._http import (
    BUDGET_REMAINING_HEADER,
    HTTPOptions,
    credential,
    problem,
    success_headers,
    tightest,
)
from keycap.integrations.asgi import SCOPE_KEY, Meter, RequestContext

__all__ = [
    "KeycapMiddleware",
    "Manager",
    "Meter",
    "access_request_router",
    "delegation_router",
    "key_management_router",
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
    *scopes: str | scope_rules.AnyOf,
    product: str | None = None,
    product_id: str | None = None,
    project_id: str | None = None,
    org_id: str | None = None,
    cost: money.Amount | Mapping[str, money.Amount] | None = None,
    client: APIKeyClient | None = None,
) -> Callable[..., Awaitable[APIKey]]:
    """A dependency that validates the request's key and yields the :class:`~keycap.APIKey`.

    Args:
        scopes: every one must be granted to the key; ``any_of("a", "b")``
            is met by either.
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
    groups = scope_rules.required(scopes, "scopes")  # a bad scope fails at import
    required, named = scope_rules.expressed(groups), list(scope_rules.named(groups))
    if cost is not None:
        money.costs(cost)

    async def dependency(
        request: Request,
        _bearer_doc: Annotated[Any, Security(_bearer, scopes=named)],
        _header_doc: Annotated[Any, Security(_api_key, scopes=named)],
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
                client_ip=ctx.options.client_ip(
                    request.client.host if request.client else None, request.headers
                ),
            )
        except KeycapError as error:
            raise _refusal(ctx, kc, error) from None
        if ctx.options.limit_headers:
            ctx.response_headers.update(
                success_headers(key, kc.now(), ctx.options.rate_limit_headers)
            )
        return key

    setattr(dependency, _DOC, {"charges": cost is not None})
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

    setattr(dependency, _DOC, {"charges": True})
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


# --- OpenAPI ---------------------------------------------------------------------------

#: The attribute marking keycap's dependencies, with what their routes can answer.
_DOC = "__keycap_openapi__"
_PROBLEM = "KeycapProblem"
_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": _PROBLEM,
    "type": "object",
    "description": "An RFC 9457 problem, with keycap's `code` and the error's data.",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string", "examples": ["invalid_key", "rate_limited"]},
    },
    "required": ["type", "title", "status", "code"],
    "additionalProperties": True,
}


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


def _responses(charges: bool, options: HTTPOptions) -> dict[str, dict[str, Any]]:
    """What a route behind keycap can answer besides its own responses."""
    retry = _header("Seconds to wait before trying again")
    limits = {
        "Retry-After": retry,
        **(
            {
                "RateLimit-Limit": _header("The limit"),
                "RateLimit-Remaining": _header("What is left of it"),
                "RateLimit-Reset": _header("Seconds until the whole limit is back"),
            }
            if options.rate_limit_headers == "legacy"
            else {
                "RateLimit": _header("What is left, and seconds until the limit is back"),
                "RateLimit-Policy": _header("The limit and its window"),
            }
        ),
    }
    found: dict[str, tuple[str, dict[str, Any]]] = {
        "401": (
            "No key, or the key is invalid, expired, revoked or disabled",
            {"WWW-Authenticate": _header('Bearer, with error="invalid_token" if a key was sent')},
        ),
        "403": (
            "The key lacks a scope, or is not for this organization, project or product",
            {},
        ),
        "429": ("A rate limit of the key, its project or its organization is used up", limits),
        "503": ("The key could not be checked now (fail closed)", {"Retry-After": retry}),
    }
    if charges:
        budget = "A budget of the key, its project or its organization cannot take the cost"
        if options.budget_status == 402:
            found["402"] = (
                budget,
                {BUDGET_REMAINING_HEADER: _header("The tightest budget's remaining amount")},
            )
        else:
            found["429"] = (found["429"][0] + "; or a budget is used up", limits)
    problem_content = {
        "application/problem+json": {"schema": {"$ref": f"#/components/schemas/{_PROBLEM}"}}
    }
    return {
        status: {"description": text, "headers": headers, "content": problem_content}
        for status, (text, headers) in sorted(found.items())
    }


def _keycap_doc(dependant: Any) -> dict[str, Any] | None:
    """What keycap's dependency in this dependant tree says, or None without one."""
    found = getattr(dependant.call, _DOC, None)
    if found is not None:
        return dict(found)
    for sub in dependant.dependencies:
        if (inner := _keycap_doc(sub)) is not None:
            return inner
    return None


def _security_schemes(options: HTTPOptions) -> tuple[dict[str, Any], list[str]]:
    """The schemes for the request headers keycap reads, in its order: the Bearer
    scheme for ``authorization``, an API key header for each other one."""
    schemes: dict[str, Any] = {}
    for name in options.headers:
        if name == "authorization":
            schemes["APIKeyBearer"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "An API key: `Authorization: Bearer sk_live_…`",
            }
        else:
            scheme = "APIKeyHeader" if "APIKeyHeader" not in schemes else f"APIKeyHeader-{name}"
            shown = "X-API-Key" if name == "x-api-key" else name  # any case will do
            schemes[scheme] = {
                "type": "apiKey",
                "in": "header",
                "name": shown,
                "description": f"An API key in the `{shown}` header",
            }
    return schemes, list(schemes)


def document(schema: dict[str, Any], routes: list[Any], options: HTTPOptions) -> dict[str, Any]:
    """Add keycap's responses (with the problem schema) to every operation behind a
    keycap dependency, and declare the security schemes for the request headers
    keycap actually reads, with each route's required scopes."""
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})[_PROBLEM] = _PROBLEM_SCHEMA
    schemes, names = _security_schemes(options)
    declared = components.setdefault("securitySchemes", {})
    for stale in ("APIKeyBearer", "APIKeyHeader"):
        declared.pop(stale, None)
    declared.update(schemes)
    for route in routes:
        if not isinstance(route, APIRoute) or (doc := _keycap_doc(route.dependant)) is None:
            continue
        path = schema.get("paths", {}).get(route.path_format, {})
        for method in route.methods or ():
            operation = path.get(method.lower())
            if operation is None:
                continue
            scopes: list[str] = []
            for requirement in operation.get("security", ()):
                scopes = (
                    requirement.get("APIKeyBearer") or requirement.get("APIKeyHeader") or scopes
                )
            operation["security"] = [{name: list(scopes)} for name in names]
            responses = operation.setdefault("responses", {})
            for status, response in _responses(doc["charges"], options).items():
                responses.setdefault(status, response)
    return schema


class KeycapMiddleware(asgi.KeycapMiddleware):
    """:class:`keycap.integrations.asgi.KeycapMiddleware`, which in a FastAPI app
    also documents keycap in the OpenAPI schema: every route behind
    ``require_scope`` or ``metered`` lists the 401/402/403/429/503 problems it
    can answer, its required scopes, and security schemes for the headers this
    middleware reads (``headers=``), so the docs page's Authorize button sends
    the key where keycap looks for it."""

    _documented: bool = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not self._documented:
            app = scope.get("app")
            if isinstance(app, FastAPI):
                self._document(app)
            self._documented = True
        await super().__call__(scope, receive, send)

    def _document(self, app: FastAPI) -> None:
        generate = app.openapi
        options = self.options

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                app.openapi_schema = document(generate(), app.routes, options)
            return app.openapi_schema

        app.openapi = openapi  # type: ignore[method-assign]


from keycap.integrations._portal import (  # noqa: E402
    Manager,
    access_request_router,
    delegation_router,
    key_management_router,
)
