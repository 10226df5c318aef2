"""The key management page's routes: ``key_management_router(..., page=True)``.

``GET {prefix}/`` is the page; its forms post to ``{prefix}/ui/...``, which do what
the JSON endpoints do, inside the manager's organization only, and answer HTML.
Every form carries a CSRF token (keycap's own double-submit cookie, or the app's
token through ``csrf_token=``) and a cross-site ``Origin`` is refused.
docs/portal.md.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints'
# annotations, which name dependencies local to add_page.
import hmac
import inspect
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from decimal import Decimal
from html import escape
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from keycap._client import APIKeyClient
from keycap._errors import DatabaseError, InvalidArgumentError, KeycapError, NotFoundError
from keycap._models import KeyStatus
from keycap._rules.budgets import Budget
from keycap._rules.rate_limits import RateLimit
from keycap.integrations import _html
from keycap.integrations._portal import Manager, change_state, grantable, own_key

#: keycap's CSRF cookie (when the app gives no ``csrf_token``) and the form field.
CSRF_COOKIE = "keycap_csrf"
CSRF_FIELD = "csrf_token"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
_AMOUNT = re.compile(r"\d{1,13}(\.\d{1,6})?")
_COUNT = re.compile(r"\d{1,9}")
#: A form is a few short fields; anything bigger is refused before it is parsed.
MAX_FORM_BYTES = 8192
PAGE_SIZE = 50
#: What the page says after a change; the query carries the word, never free text.
_DONE = {
    "revoke": "The key is revoked.",
    "disable": "The key is disabled.",
    "enable": "The key is enabled.",
}
#: Sent with every page: it is never cached, never framed, and loads only its own files.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}
_ASSETS = {"portal.css": "text/css", "portal.js": "text/javascript"}

CsrfToken = Callable[[Request], str | Awaitable[str]]


class _Refused(Exception):
    """A form that must not be acted on (bad CSRF token, cross-site, not a form)."""


def _asset(name: str) -> str:
    return (resources.files("keycap.integrations") / "static" / name).read_text("utf-8")


def add_page(
    router: APIRouter,
    *,
    manager: Any,
    client: Callable[[Request], APIKeyClient],
    csrf_token: CsrfToken | None,
    title: str,
) -> None:
    """Add the page's routes to ``router``: ``manager`` is the app's dependency for
    the :class:`Manager`, ``client`` the router's for the client."""
    Who = Annotated[Manager, Depends(manager)]
    Client = Annotated[APIKeyClient, Depends(client)]
    assets = {name: _asset(name) for name in _ASSETS}

    async def token(request: Request) -> tuple[str, str | None]:
        """The request's CSRF token, and a new cookie to set if it had none."""
        if csrf_token is not None:
            found = csrf_token(request)
            return (await found if inspect.isawaitable(found) else found), None
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if _TOKEN.fullmatch(cookie):
            return cookie, None
        fresh = secrets.token_urlsafe(32)
        return fresh, fresh

    async def form(request: Request) -> dict[str, str]:
        """The posted form, once its CSRF token and origin are checked."""
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            raise _Refused("This form came from another site.")
        if request.headers.get("content-type", "").split(";")[0].strip() != (
            "application/x-www-form-urlencoded"
        ):
            raise _Refused("This is not a form of this page.")
        body = b""
        async for chunk in request.stream():  # stop reading past the bound
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise _Refused("This form is too big.")
        try:
            fields = dict(
                parse_qsl(
                    body.decode("utf-8"),
                    keep_blank_values=True,
                    max_num_fields=20,
                    errors="strict",
                )
            )
        except (UnicodeDecodeError, ValueError):
            raise _Refused("This form could not be read.") from None
        expected, _ = await token(request)
        posted = fields.pop(CSRF_FIELD, "")
        if not hmac.compare_digest(posted.encode(), expected.encode()):
            raise _Refused("This form has expired. Reload the page and try again.")
        return fields

    def base(request: Request) -> str:
        """The page's path as the browser sees it (``{prefix}/``), from the request's
        own path: the page's route is ``{prefix}/``, every form's starts
        ``{prefix}/ui/keys``, and a key id holds no ``/``."""
        path: str = request.scope["path"]
        return path if request.method == "GET" else path[: path.rindex("/ui/keys") + 1]

    async def render(
        request: Request,
        manager: Manager,
        kc: APIKeyClient,
        *,
        status_code: int = 200,
        key_id: str | None = None,
        dialog: _html.Dialog | str | None = None,
        notice: str | None = None,
        error: str | None = None,
        status: KeyStatus | None = None,
        offset: int = 0,
    ) -> HTMLResponse:
        csrf, cookie = await token(request)
        keys = await kc.list_keys(
            org_id=manager.org_id,
            status=status,
            limit=PAGE_SIZE + 1,
            offset=offset,
            newest_first=True,
        )
        selected = None
        if key_id is not None:
            try:
                key = await own_key(kc, manager, key_id)
            except NotFoundError:
                error, status_code, dialog = "There is no such key.", 404, None
            else:
                selected = _html.Selected(
                    key=key,
                    remaining=await kc.remaining(key.id),
                    usage=await kc.usage(
                        key_id=key.id,
                        since=kc.now() - timedelta(days=_html.CHART_DAYS),
                        per="day",
                    ),
                )
        if isinstance(dialog, str):
            if dialog == "create":
                dialog = _html.Dialog("create")
            elif dialog in _html.ACTIONS and selected is not None:
                dialog = _html.Dialog(dialog, key=selected.key)
            else:
                dialog = None
        view = _html.View(
            base=base(request),
            org_id=manager.org_id,
            actor=manager.actor,
            now=kc.now(),
            keys=keys[:PAGE_SIZE],
            more=len(keys) > PAGE_SIZE,
            csrf=csrf,
            status=status,
            offset=offset,
            limit=PAGE_SIZE,
            selected=selected,
            dialog=dialog,
            notice=notice,
            error=error,
            title=title,
            grantable=manager.grantable,
        )
        response = HTMLResponse(_html.page(view), status_code=status_code, headers=PAGE_HEADERS)
        if cookie is not None:
            response.set_cookie(
                CSRF_COOKIE,
                cookie,
                path=view.base,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
        return response

    def refused(request: Request, why: _Refused) -> HTMLResponse:
        back = escape(base(request))
        return HTMLResponse(
            f'<!doctype html><html lang="en"><title>Not done</title><main><h1>Not done</h1>'
            f'<p role="alert">{escape(str(why))}</p><p><a href="{back}">Back to the '
            "keys</a></p></main></html>",
            status_code=403,
            headers=PAGE_HEADERS,
        )

    @router.get("/", include_in_schema=False)
    async def key_page(
        request: Request,
        manager: Who,
        kc: Client,
        status: KeyStatus | None = None,
        offset: int = 0,
        key: str | None = None,
        dialog: str | None = None,
        done: str | None = None,
    ) -> HTMLResponse:
        return await render(
            request,
            manager,
            kc,
            key_id=key,
            dialog=dialog,
            notice=_DONE.get(done or ""),
            status=status,
            offset=max(0, offset),
        )

    @router.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in _ASSETS:
            raise NotFoundError("file", name)
        return Response(
            assets[name],
            media_type=_ASSETS[name],
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    @router.post("/ui/keys", include_in_schema=False)
    async def create_from_form(request: Request, manager: Who, kc: Client) -> HTMLResponse:
        try:
            fields = await form(request)
        except _Refused as why:
            return refused(request, why)
        try:
            arguments = _create(manager, fields)
            with kc.acting_as(manager.actor):
                issued = await kc.create_key(
                    manager.org_id, delegated_by=manager.actor, **arguments
                )
        except KeycapError as error:
            return await render(
                request,
                manager,
                kc,
                status_code=400,
                dialog=_html.Dialog("create", values=fields, error=_said(error)),
            )
        return await render(
            request,
            manager,
            kc,
            status_code=201,
            key_id=issued.key.id,
            dialog=_html.Dialog("secret", key=issued.key, plaintext=issued.plaintext),
        )

    @router.post("/ui/keys/{key_id}/roll", include_in_schema=False)
    async def roll_from_form(
        request: Request, key_id: str, manager: Who, kc: Client
    ) -> HTMLResponse:
        try:
            fields = await form(request)
        except _Refused as why:
            return refused(request, why)
        grace = fields.get("grace", "24h")
        try:
            if grace not in _html.GRACES:
                raise InvalidArgumentError("grace", "choose one of the offered periods")
            await own_key(kc, manager, key_id)
            with kc.acting_as(manager.actor):
                rolled = await kc.roll_key(key_id, grace=grace)
        except KeycapError as error:
            return await render(
                request, manager, kc, status_code=_status(error), error=_said(error)
            )
        return await render(
            request,
            manager,
            kc,
            key_id=key_id,
            dialog=_html.Dialog("secret", key=rolled.key, plaintext=rolled.plaintext),
            notice="The key is rolled.",
        )

    for action in _DONE:

        def _changer(action: str = action) -> Any:
            async def change_from_form(
                request: Request, key_id: str, manager: Who, kc: Client
            ) -> Response:
                try:
                    await form(request)
                except _Refused as why:
                    return refused(request, why)
                try:
                    await change_state(kc, manager, key_id, action)
                except KeycapError as error:
                    return await render(
                        request, manager, kc, status_code=_status(error), error=_said(error)
                    )
                return RedirectResponse(
                    base(request) + "?" + urlencode({"key": key_id, "done": action}),
                    status_code=303,
                )

            change_from_form.__name__ = f"{action}_from_form"
            return change_from_form

        router.post(f"/ui/keys/{{key_id}}/{action}", include_in_schema=False)(_changer())


def _create(manager: Manager, fields: Mapping[str, str]) -> dict[str, Any]:
    """``create_key``'s arguments from the create form; InvalidArgumentError for
    what cannot be one."""
    name = fields.get("name", "").strip()
    if not name:
        raise InvalidArgumentError("name", "give the key a name")
    budget = fields.get("budget", "").strip()
    period = fields.get("period", "month")
    per_minute = fields.get("per_minute", "").strip()
    expires_in = fields.get("expires_in", "")
    if period not in _html.PERIODS:
        raise InvalidArgumentError("period", "choose one of the offered periods")
    if expires_in not in _html.EXPIRIES:
        raise InvalidArgumentError("expires_in", "choose one of the offered expiries")
    if budget and not _AMOUNT.fullmatch(budget):
        raise InvalidArgumentError("budget", "write an amount such as 5 or 12.50")
    if per_minute and not (_COUNT.fullmatch(per_minute) and int(per_minute) > 0):
        raise InvalidArgumentError("per_minute", "write a whole number of requests, such as 60")
    return {
        "name": name,
        "scopes": grantable(manager, fields.get("scopes", "").replace(",", " ").split()),
        "budgets": [Budget(Decimal(budget), period)] if budget else [],
        "rate_limits": [RateLimit(int(per_minute), "minute")] if per_minute else [],
        "expires_in": expires_in or None,
    }


def _said(error: KeycapError) -> str:
    """What the page tells the person about a refused change: keycap's own message
    (it never holds a secret). A database failure is not the person's to fix: it
    goes on to the app (with KeycapMiddleware, a 503 problem)."""
    if isinstance(error, DatabaseError):
        raise error
    return error.message


def _status(error: KeycapError) -> int:
    return 404 if isinstance(error, NotFoundError) else 400
