"""What keycap means in HTTP, framework-free: where a request carries its key,
which status and headers each error gets, the RFC 9457 problem body, and the
rate-limit and budget headers of an accepted request.

The FastAPI and Starlette integrations share this one mapping (docs/integrations/fastapi.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from http import HTTPStatus
from typing import Any

from keycap._errors import (
    AccessNotGrantedError,
    AlreadyExistsError,
    BudgetExceededError,
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailableError,
    DisabledKeyError,
    ExpiredKeyError,
    HoldClosedError,
    IdempotencyConflictError,
    InsufficientScopeError,
    InvalidArgumentError,
    InvalidKeyError,
    KeycapError,
    KeyRejectedError,
    MissingKeyError,
    NotFoundError,
    RateLimitedError,
    RevokedKeyError,
    UsageExhaustedError,
)
from keycap._models import APIKey, BudgetStatus
from keycap._rules import ips
from keycap._rules.money import plain

#: Read in this order; the first present wins.
DEFAULT_HEADERS = ("authorization", "x-api-key")
PROBLEM_JSON = "application/problem+json"
_PROBLEM_MEMBERS = frozenset({"type", "title", "status", "detail", "instance"})
BUDGET_REMAINING_HEADER = "Keycap-Budget-Remaining"
# A presented key longer than this is not a key; the client rejects it anyway,
# this only keeps absurd headers from being copied around.
_MAX_CREDENTIAL = 512


@dataclass(frozen=True, slots=True)
class HTTPOptions:
    """How an integration speaks HTTP.

    Args:
        headers: request headers that may carry the key, lower case, in order.
            ``authorization`` is read as ``Bearer <key>`` (scheme case-insensitive);
            any other header holds the key alone.
        budget_status: the status of a refused budget: 402 (default) or 429.
        usage_exhausted_status: the status of a key past ``max_uses``: 403
            (default: it never comes back) or 429.
        limit_headers: add rate limit and ``Keycap-Budget-Remaining`` headers.
        rate_limit_headers: ``"ietf"`` (default): ``RateLimit`` and
            ``RateLimit-Policy`` as in draft-ietf-httpapi-ratelimit-headers-11;
            ``"legacy"``: ``RateLimit-Limit``, ``RateLimit-Remaining`` and
            ``RateLimit-Reset`` (the 2022 drafts), for clients that read those.
        trusted_proxies: CIDR ranges of the app's own reverse proxies. The client's
            address (for keys with ``allowed_ips``) is the connection's peer; only
            when that peer is one of these is ``X-Forwarded-For`` read, from the
            right, skipping these proxies: the first other address is the client.
    """

    headers: tuple[str, ...] = DEFAULT_HEADERS
    budget_status: int = 402
    usage_exhausted_status: int = 403
    limit_headers: bool = True
    rate_limit_headers: str = "ietf"
    trusted_proxies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.headers, str) or not self.headers:
            raise ConfigurationError("headers must be a non-empty sequence of header names")
        object.__setattr__(self, "headers", tuple(h.lower() for h in self.headers))
        if self.budget_status not in (402, 429):
            raise ConfigurationError("budget_status must be 402 or 429")
        if self.usage_exhausted_status not in (403, 429):
            raise ConfigurationError("usage_exhausted_status must be 403 or 429")
        if self.rate_limit_headers not in ("ietf", "legacy"):
            raise ConfigurationError('rate_limit_headers must be "ietf" or "legacy"')
        proxies = self.trusted_proxies
        if isinstance(proxies, str):
            raise ConfigurationError("trusted_proxies must be a list of CIDR ranges")
        try:
            ranges = ips.ranges(proxies, "trusted_proxies") if proxies else ()
        except InvalidArgumentError as error:
            raise ConfigurationError(f"trusted_proxies: {error.message}") from None
        object.__setattr__(self, "trusted_proxies", ranges)

    def client_ip(self, peer: str | None, headers: Mapping[str, str]) -> str | None:
        """The client's address: ``peer`` (the connection's), or, when ``peer`` is a
        trusted proxy, the rightmost address of ``X-Forwarded-For`` that is not
        one. None: no address (a test transport, a Unix socket) or an unreadable
        one, which keys with ``allowed_ips`` refuse. When every hop is a trusted
        proxy, the request began at one of them: the leftmost is the client."""
        if peer is None:
            return None
        hops = [peer]
        forwarded = headers.get("x-forwarded-for")
        if forwarded and self.trusted_proxies:
            hops = [h.strip() for h in forwarded.split(",")][-32:] + hops
        address = None
        for hop in reversed(hops):
            try:
                address = ips.address(hop)
            except InvalidArgumentError:
                return None
            if not (self.trusted_proxies and ips.allows(self.trusted_proxies, address)):
                break
        return None if address is None else str(address)


def credential(headers: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    """The presented key, or None. ``headers.get`` must be case-insensitive
    (Starlette's ``Headers`` is)."""
    for name in names:
        value = headers.get(name)
        if value is None:
            continue
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer":
                continue
            value = token
        value = value.strip()
        if value:
            return value[: _MAX_CREDENTIAL + 1]
    return None


@dataclass(frozen=True, slots=True)
class Problem:
    """An error as an HTTP response: status, headers and an RFC 9457 body."""

    status: int
    headers: dict[str, str]
    body: dict[str, Any]


def problem(error: KeycapError, options: HTTPOptions, now: datetime) -> Problem:
    """Map any keycap error to its response. Nothing here is ever a bare 500:
    an unreachable database is 503 (fail closed), any other failure 500 with a body."""
    status, headers = _status(error, options, now)
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        # A database error's message carries the driver's words (host names, SQL
        # fragments): they go to the logs, never to the caller.
        "detail": _DATABASE_DETAIL.get(error.code, "database error")
        if isinstance(error, DatabaseError)
        else error.message,
    }
    for name, value in error.to_dict().items():
        if name == "message":
            continue  # it is "detail"
        # An error field named like a problem member (HoldClosedError.status) is
        # renamed rather than allowed to change what the member means.
        body[f"keycap_{name}" if name in _PROBLEM_MEMBERS else name] = value
    return Problem(status, headers, body)


#: Seconds a caller is told to wait after a 503 (``Retry-After``).
UNAVAILABLE_RETRY_AFTER = 1
_DATABASE_DETAIL = {"database_unavailable": "the service is temporarily unavailable"}


def _status(error: KeycapError, options: HTTPOptions, now: datetime) -> tuple[int, dict[str, str]]:
    if isinstance(error, MissingKeyError):
        return 401, {"WWW-Authenticate": "Bearer"}
    if isinstance(error, InvalidKeyError | ExpiredKeyError | RevokedKeyError | DisabledKeyError):
        # RFC 6750: a token that is expired, revoked or otherwise invalid gets 401
        # invalid_token (a new key may work); the body's code says which it was.
        return 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    if isinstance(error, InsufficientScopeError):
        # RFC 6750's scope lists scopes all needed: an unmet any_of(...) is in the
        # body's missing_any_of only.
        scope = " ".join(error.missing_scopes)
        said = f', scope="{scope}"' if scope else ""
        return 403, {"WWW-Authenticate": f'Bearer error="insufficient_scope"{said}'}
    if isinstance(error, RateLimitedError):
        limit = RateLimitView(
            error.name, error.limit, error.remaining, error.window_seconds, error.meter
        )
        headers = rate_limit_headers(limit, error.reset_at, now, options.rate_limit_headers)
        if error.retry_after is not None:
            # When the same call fits again; RateLimit's t (or RateLimit-Reset) says
            # when the whole limit is back, as on a 200 in the same state.
            headers["Retry-After"] = str(math.ceil(error.retry_after))
        return 429, headers
    if isinstance(error, UsageExhaustedError):
        return options.usage_exhausted_status, {}
    if isinstance(error, KeyRejectedError):  # revoked, disabled, forbidden
        return 403, {}
    if isinstance(error, BudgetExceededError):
        headers = {BUDGET_REMAINING_HEADER: plain(error.remaining)}
        if options.budget_status == 429 and error.reset_at is not None:
            headers["Retry-After"] = str(_seconds_until(error.reset_at, now))
        return options.budget_status, headers
    if isinstance(error, DatabaseUnavailableError):
        return 503, {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)}
    if isinstance(error, DatabaseError):
        return 500, {}  # a statement failed (a bug or a schema mismatch), not an outage
    if isinstance(error, NotFoundError):
        return 404, {}
    if isinstance(
        error,
        AlreadyExistsError | HoldClosedError | IdempotencyConflictError | AccessNotGrantedError,
    ):
        return 409, {}
    if isinstance(error, InvalidArgumentError):
        return 400, {}
    return 500, {}  # ConfigurationError: the server is set up wrongly


@dataclass(frozen=True, slots=True)
class RateLimitView:
    """What the rate limit headers say of one limit."""

    name: str
    limit: int | Decimal
    remaining: int | Decimal
    window_seconds: Decimal | None
    meter: str | None


def rate_limit_headers(
    limit: RateLimitView, reset_at: datetime, now: datetime, style: str = "ietf"
) -> dict[str, str]:
    """The headers for the tightest rate limit, the same for a 200 and a 429 in the
    same state: the limit's name, its quota and window (``RateLimit-Policy``),
    what is left, and the whole seconds until the whole limit is back (rounded up).

    ``"ietf"``, draft-ietf-httpapi-ratelimit-headers-11 (Structured Fields)::

        RateLimit-Policy: "100/minute";q=100;w=60
        RateLimit: "100/minute";r=41;t=60

    Quotas and windows are integers there: a metered limit's quota and what is
    left are rounded down, a window up, and the meter is named in a
    ``keycap-meter`` parameter (the draft's ``qu`` registry has no such unit).
    ``"legacy"``: ``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset``.
    """
    reset = str(_seconds_until(reset_at, now))
    if style == "legacy":
        return {
            "RateLimit-Limit": plain(limit.limit),
            "RateLimit-Remaining": plain(limit.remaining),
            "RateLimit-Reset": reset,
        }
    name = '"' + limit.name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    policy = f"{name};q={math.floor(limit.limit)}"
    if limit.window_seconds is not None:
        policy += f";w={max(1, math.ceil(limit.window_seconds))}"
    if limit.meter is not None:
        policy += f';keycap-meter="{limit.meter}"'
    return {
        "RateLimit-Policy": policy,
        "RateLimit": f"{name};r={math.floor(limit.remaining)};t={reset}",
    }


def success_headers(key: APIKey, now: datetime, style: str = "ietf") -> dict[str, str]:
    """The rate limit headers for the tightest rate limit a metered validation
    consumed, and the tightest budget's remaining amount after a charge."""
    headers: dict[str, str] = {}
    if key.rate_limit is not None:
        rl = key.rate_limit
        view = RateLimitView(rl.name, rl.limit, rl.remaining, rl.window_seconds, rl.meter)
        headers.update(rate_limit_headers(view, rl.reset_at, now, style))
    if key.charge is not None and key.charge.budgets:
        headers[BUDGET_REMAINING_HEADER] = plain(tightest(key.charge.budgets))
    return headers


def tightest(budgets: tuple[BudgetStatus, ...]) -> Decimal:
    return min(b.remaining for b in budgets)


def _seconds_until(when: datetime, now: datetime) -> int:
    """Whole seconds, rounded up: HTTP delta-seconds must not promise too early."""
    return max(0, math.ceil((when - now).total_seconds()))
