"""``KeycapMiddleware``: the ASGI half of the web integrations.

It gives each request the client and the HTTP options, turns any keycap error
into an ``application/problem+json`` response, adds the rate-limit and budget
headers of an accepted request, settles the holds of metered requests once the
response is over (also when the client went away mid-stream), and closes the
client when the application shuts down.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import anyio

from keycap._client import APIKeyClient
from keycap._errors import ConfigurationError, KeycapError
from keycap._models import APIKey, Hold, Settlement
from keycap._rules import money
from keycap.integrations._http import DEFAULT_HEADERS, PROBLEM_JSON, HTTPOptions, problem

__all__ = ["KeycapMiddleware", "Meter", "RequestContext"]

log = logging.getLogger("keycap")

#: Where the middleware puts the RequestContext in the ASGI scope.
SCOPE_KEY = "keycap"

Scope = dict[str, Any]
Message = dict[str, Any]


class Meter:
    """The hold of one metered request. Call :meth:`add` as the work costs money;
    the middleware settles the hold with :attr:`used` after the last byte of the
    response, or as soon as the request ends otherwise (error, disconnect)."""

    def __init__(self, client: APIKeyClient, key: APIKey, hold: Hold) -> None:
        self.client = client
        self.key = key
        self.hold = hold
        self.used = Decimal(0)
        #: Set once the hold is settled.
        self.settlement: Settlement | None = None

    def add(self, amount: money.Amount) -> None:
        """Count ``amount`` (a ``Decimal`` or an int, at most 6 decimal places) as used.

        Raises: InvalidArgumentError, before anything is counted."""
        self.used += money.from_micros(money.to_micros(amount, "amount"))

    @property
    def remaining(self) -> Decimal:
        """What is left of the hold; spending past it is charged as far as the budgets allow."""
        return self.hold.amount - self.used

    def __repr__(self) -> str:
        return f"Meter(hold={self.hold.id!r}, held={self.hold.amount}, used={self.used})"


@dataclass(eq=False)
class RequestContext:
    """What one request's keycap integration shares between its parts."""

    client: APIKeyClient
    options: HTTPOptions
    #: False when no KeycapMiddleware runs: errors then become HTTPExceptions.
    middleware: bool = True
    response_headers: dict[str, str] = field(default_factory=dict)
    meters: list[Meter] = field(default_factory=list)

    async def settle(self) -> None:
        """Settle every open meter of the request with what it used. Shielded from
        cancellation. With the database down the client keeps the settlement and
        retries it (``settle_eventually``); any other failure is logged, and the
        hold then returns at its ttl."""
        while self.meters:
            meter = self.meters.pop()
            with anyio.CancelScope(shield=True):
                try:
                    meter.settlement = await meter.client.settle_eventually(
                        meter.hold.id, meter.used
                    )
                except KeycapError as error:
                    log.warning(
                        "keycap: could not settle hold %s (%s); it expires at %s",
                        meter.hold.id,
                        error.code,
                        meter.hold.expires_at.isoformat(),
                    )


class KeycapMiddleware:
    """Add with ``app.add_middleware(KeycapMiddleware, client=client)``.

    Args:
        client: the :class:`~keycap.APIKeyClient` requests are checked with.
        headers: request headers that may carry the key (default ``Authorization:
            Bearer …`` then ``X-API-Key``).
        budget_status: 402 (default) or 429 for a refused budget.
        usage_exhausted_status: 403 (default) or 429 for a key past ``max_uses``.
        limit_headers: add rate limit and ``Keycap-Budget-Remaining`` headers.
        rate_limit_headers: ``"ietf"`` (default: ``RateLimit`` and
            ``RateLimit-Policy``, the current IETF draft) or ``"legacy"``
            (``RateLimit-Limit/Remaining/Reset``).
        close_client: close the client when the application shuts down (default True).
        trusted_proxies: CIDR ranges of your reverse proxies, whose
            ``X-Forwarded-For`` gives the client's address (for keys with
            ``allowed_ips``); without them the connection's peer is the client.
    """

    def __init__(
        self,
        app: Any,
        client: APIKeyClient,
        *,
        headers: Sequence[str] = DEFAULT_HEADERS,
        budget_status: int = 402,
        usage_exhausted_status: int = 403,
        limit_headers: bool = True,
        rate_limit_headers: str = "ietf",
        close_client: bool = True,
        trusted_proxies: Sequence[str] = (),
    ) -> None:
        if not isinstance(client, APIKeyClient):
            raise ConfigurationError("KeycapMiddleware needs client=APIKeyClient(...)")
        self.app = app
        self.client = client
        self.options = HTTPOptions(
            headers=tuple(headers),
            budget_status=budget_status,
            usage_exhausted_status=usage_exhausted_status,
            limit_headers=limit_headers,
            rate_limit_headers=rate_limit_headers,
            trusted_proxies=tuple(trusted_proxies),
        )
        self.close_client = close_client

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        else:
            await self.app(
                {**scope, SCOPE_KEY: RequestContext(self.client, self.options)}, receive, send
            )

    async def _http(self, scope: Scope, receive: Any, send: Any) -> None:
        ctx = RequestContext(self.client, self.options)
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if ctx.response_headers:
                    message = {
                        **message,
                        "headers": [*message.get("headers", ()), *_encode(ctx.response_headers)],
                    }
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Settled before the client sees the end, so its next request
                # finds the budget as this one left it.
                await ctx.settle()
            await send(message)

        try:
            await self.app({**scope, SCOPE_KEY: ctx}, receive, send_with_headers)
        except Exception as raised:
            error = _keycap_error(raised)
            if error is None or started:
                raise
            await ctx.settle()
            found = problem(error, self.options, self.client.now())
            await send_problem(
                send, found.status, {**ctx.response_headers, **found.headers}, found.body
            )
        finally:
            await ctx.settle()

    async def _lifespan(self, scope: Scope, receive: Any, send: Any) -> None:
        async def send_closing(message: Message) -> None:
            if self.close_client and message["type"] in (
                "lifespan.shutdown.complete",
                "lifespan.shutdown.failed",
            ):
                await self.client.aclose()
            await send(message)

        await self.app(scope, receive, send_closing)


def _keycap_error(raised: BaseException) -> KeycapError | None:
    while isinstance(raised, BaseExceptionGroup) and len(raised.exceptions) == 1:
        raised = raised.exceptions[0]
    return raised if isinstance(raised, KeycapError) else None


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def send_problem(
    send: Any, status: int, headers: dict[str, str], body: dict[str, Any]
) -> None:
    """Send an RFC 9457 problem response on a raw ASGI ``send``."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    raw = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(payload)).encode()),
        *_encode(headers),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
