"""Access requests: what an agent or app asks for, what an owner may grant, and
where a request stands (pure; no database).

A request asks for terms (:class:`Terms`: scopes, a project or product, budgets,
a key lifetime). The owner approves them as asked or narrower
(:func:`approved`), or denies them. The requester then claims the key, once,
with the claim secret it was given. A request not claimed by its ``expires_at``
(pending or approved) has expired.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final

from keycap._errors import InvalidArgumentError
from keycap._rules import inputs, money, timeutil
from keycap._rules import scopes as scope_rules
from keycap._rules.budgets import Budget

__all__ = ["CLAIM_PREFIX", "STATUSES", "Terms", "approved", "status_at"]

#: Where a request stands. ``expired`` is never stored: it is a pending or
#: approved request past its ``expires_at``.
STATUSES: Final = ("pending", "approved", "denied", "claimed", "expired")
#: The start of a claim secret (``kcr_...``), so a leaked one is recognizable.
CLAIM_PREFIX: Final = "kcr_"
MAX_REASON: Final = 2000


@dataclass(frozen=True, slots=True)
class Terms:
    """What a key issued for a request may do."""

    scopes: tuple[str, ...]
    project_id: str | None = None
    product_id: str | None = None
    budgets: tuple[Budget, ...] = ()
    #: How long the issued key lives from its claim; None: no expiry.
    lifetime: timedelta | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "scopes": list(self.scopes),
            "project_id": self.project_id,
            "product_id": self.product_id,
            "budgets": [
                {"limit": money.plain(Decimal(b.limit)), "period": b.period, "meter": b.meter}
                for b in self.budgets
            ],
            "lifetime_seconds": None if self.lifetime is None else self.lifetime.total_seconds(),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Terms:
        seconds = doc["lifetime_seconds"]
        return cls(
            scopes=tuple(doc["scopes"]),
            project_id=doc["project_id"],
            product_id=doc["product_id"],
            budgets=tuple(
                Budget(Decimal(b["limit"]), b["period"], meter=b["meter"]) for b in doc["budgets"]
            ),
            lifetime=None if seconds is None else timedelta(seconds=seconds),
        )


def status_at(stored: str, expires_at: datetime, now: datetime) -> str:
    """The request's status at ``now``: the stored one, or ``expired``."""
    if stored in ("pending", "approved") and now >= expires_at:
        return "expired"
    return stored


def approved(
    asked: Terms,
    *,
    scopes: tuple[str, ...] | None,
    budgets: tuple[Budget, ...] | None,
    lifetime: timedelta | None,
) -> Terms:
    """The terms an owner grants: ``asked``, narrowed by what is given (None:
    as asked). Scopes must be covered by the asked ones; every budget asked for
    must stay, at most as large (more budgets may be added); the lifetime no
    longer than asked.

    Raises:
        InvalidArgumentError: a grant wider than the request, naming the field.
    """
    out = asked
    if scopes is not None:
        beyond = ", ".join(scope_rules.missing(asked.scopes, scopes))
        if beyond:
            raise InvalidArgumentError("scopes", f"not asked for: {beyond}")
        out = replace(out, scopes=scopes)
    if budgets is not None:
        given = {(b.meter, b.period): Decimal(b.limit) for b in budgets}
        for b in asked.budgets:
            limit = given.get((b.meter, b.period))
            if limit is None or limit > Decimal(b.limit):
                raise InvalidArgumentError(
                    "budgets",
                    f"the {b.period} {b.meter} budget may only shrink (asked: {b.limit})",
                )
        out = replace(out, budgets=budgets)
    if lifetime is not None:
        if asked.lifetime is not None and lifetime > asked.lifetime:
            raise InvalidArgumentError("expires_in", "longer than asked for")
        out = replace(out, lifetime=lifetime)
    return out


def lifetime(value: object, field: str = "expires_in") -> timedelta | None:
    """A key lifetime asked or granted: a duration, or None for no expiry."""
    return None if value is None else timeutil.parse_duration(value, field)


def reason(value: object, field: str = "reason", *, allow_empty: bool = False) -> str:
    """A reason or note: text of at most 2000 characters."""
    return inputs.text(value, field, allow_empty=allow_empty, max_length=MAX_REASON)


def status(value: object) -> str | None:
    """A status to list by (None: every request)."""
    if value is not None and value not in STATUSES:
        raise InvalidArgumentError("status", "must be one of " + ", ".join(STATUSES))
    return value


def looks_like_claim_secret(value: object) -> bool:
    return isinstance(value, str) and value.startswith(CLAIM_PREFIX) and len(value) <= 64
