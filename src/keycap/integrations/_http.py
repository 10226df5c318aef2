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
        limit_headers: add ``RateLimit-*`` and ``Keycap-Budget-Remaining`` headers.
    """

    headers: tuple[str, ...] = DEFAULT_HEADERS
    budget_status: int = 402
    usage_exhausted_status: int = 403
    limit_headers: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.headers, str) or not self.headers:
            raise ConfigurationError("headers must be a non-empty sequence of header names")
        object.__setattr__(self, "headers", tuple(h.lower() for h in self.headers))
        if self.budget_status not in (402, 429):
            raise ConfigurationError("budget_status must be 402 or 429")
        if self.usage_exhausted_status not in (403, 429):
            raise ConfigurationError("usage_exhausted_status must be 403 or 429")


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
        scope = " ".join(error.missing_scopes)
        return 403, {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'}
    if isinstance(error, RateLimitedError):
        headers = {
            "RateLimit-Limit": plain(error.limit),
            "RateLimit-Remaining": plain(error.remaining),
        }
        if error.retry_after is not None:
            seconds = str(math.ceil(error.retry_after))
            headers["Retry-After"] = seconds
            headers["RateLimit-Reset"] = seconds
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
    if isinstance(error, AlreadyExistsError | HoldClosedError | IdempotencyConflictError):
        return 409, {}
    if isinstance(error, InvalidArgumentError):
        return 400, {}
    return 500, {}  # ConfigurationError: the server is set up wrongly


def success_headers(key: APIKey, now: datetime) -> dict[str, str]:
    """``RateLimit-Limit/Remaining/Reset`` for the tightest rate limit a metered
    validation consumed, and the tightest budget's remaining amount after a charge."""
    headers: dict[str, str] = {}
    if key.rate_limit is not None:
        rl = key.rate_limit
        headers["RateLimit-Limit"] = plain(rl.limit)
        headers["RateLimit-Remaining"] = plain(rl.remaining)
        headers["RateLimit-Reset"] = str(_seconds_until(rl.reset_at, now))
    if key.charge is not None and key.charge.budgets:
        headers[BUDGET_REMAINING_HEADER] = plain(tightest(key.charge.budgets))
    return headers


def tightest(budgets: tuple[BudgetStatus, ...]) -> Decimal:
    return min(b.remaining for b in budgets)


def _seconds_until(when: datetime, now: datetime) -> int:
    """Whole seconds, rounded up: HTTP delta-seconds must not promise too early."""
    return max(0, math.ceil((when - now).total_seconds()))
