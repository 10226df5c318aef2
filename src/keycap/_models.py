"""Result models. None of them holds a secret, except IssuedKey, which masks it."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keycap._rules.budgets import Budget

__all__ = [
    "APIKey",
    "AccessRequest",
    "AccessTerms",
    "AuditEntry",
    "BudgetAlert",
    "BudgetStatus",
    "Charge",
    "Hold",
    "Identity",
    "IssuedKey",
    "KeyEvent",
    "KeyStatus",
    "Organization",
    "Product",
    "Project",
    "RateLimitStatus",
    "Remaining",
    "Settlement",
    "UsageRow",
]


class KeyStatus(StrEnum):
    """A key's status; when several apply, the first in this order wins."""

    REVOKED = "revoked"
    DISABLED = "disabled"
    EXPIRED = "expired"
    ACTIVE = "active"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Organization(_Model):
    id: str
    name: str
    created_at: datetime
    #: The scopes its keys may be granted (patterns allowed); None: any scope.
    allowed_scopes: tuple[str, ...] | None = None


class Project(_Model):
    id: str
    org_id: str
    name: str
    created_at: datetime


class Product(_Model):
    id: str
    org_id: str
    name: str
    created_at: datetime


class Identity(_Model):
    """A person or system of yours (an id from your identity provider) inside an
    organization. Keys may belong to one; disabling it refuses all of them."""

    id: str
    org_id: str
    #: Your id for it (unique in the organization).
    external_id: str
    name: str
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    disabled_at: datetime | None
    #: The addresses (CIDR ranges) every key of the identity may be used from, on
    #: top of each key's own; None: any.
    allowed_ips: tuple[str, ...] | None = None
    #: From ``validate_identity``: the tightest rate limit after this call.
    rate_limit: RateLimitStatus | None = None
    #: From ``validate_identity(cost=...)``: what was charged, and the budgets after it.
    charge: Charge | None = None


class AccessTerms(_Model):
    """What a key issued for an access request may do: as asked, or as granted."""

    scopes: tuple[str, ...]
    project_id: str | None
    product_id: str | None
    budgets: tuple[Budget, ...]
    #: How long the key lives from its claim; None: no expiry.
    expires_in: timedelta | None


class AccessRequest(_Model):
    """An agent or app asking for a key (:meth:`APIKeyClient.request_access`)."""

    id: str
    org_id: str
    #: Who asks, in their words (an app name, an agent id).
    requester: str
    reason: str
    #: The identity the key will belong to; None: none.
    identity_id: str | None
    #: pending, approved, denied, claimed or expired (not claimed by ``expires_at``).
    status: str
    asked: AccessTerms
    #: What the owner approved (the asked terms or narrower); None until approved.
    granted: AccessTerms | None
    created_at: datetime
    #: Until when it may be decided and claimed.
    expires_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    #: Why it was denied (or a note on the approval).
    decision_reason: str | None
    #: The key issued at the claim.
    key_id: str | None
    claimed_at: datetime | None


class APIKey(_Model):
    """A key as stored: everything but its secret and digest."""

    id: str
    org_id: str
    project_id: str | None
    product_id: str | None
    name: str
    #: Display prefix, e.g. ``sk_live_4fK9aZ1q`` (public id characters only).
    start: str
    scopes: tuple[str, ...]
    metadata: dict[str, Any]
    delegated_by: str | None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    disabled_at: datetime | None
    last_used_at: datetime | None
    use_count: int
    #: Lifetime cap on accepted validations; None: no cap.
    max_uses: int | None = None
    #: The client addresses (CIDR ranges) the key may be used from; None: any.
    allowed_ips: tuple[str, ...] | None = None
    #: The identity the key belongs to; None: none.
    identity_id: str | None = None
    #: A delegated key's ancestors, nearest first (its parent, its parent's
    #: parent, ... up to the root); empty for a key that was not delegated.
    ancestors: tuple[str, ...] = ()
    #: From a metered validate_key: the tightest rate limit after this call.
    rate_limit: RateLimitStatus | None = None
    #: From validate_key(cost=...): what was charged, and the budgets after it.
    charge: Charge | None = None

    @property
    def parent_id(self) -> str | None:
        """The key this one was delegated from; None: a root key."""
        return self.ancestors[0] if self.ancestors else None

    def status_at(self, now: datetime) -> KeyStatus:
        if self.revoked_at is not None:
            return KeyStatus.REVOKED
        if self.disabled_at is not None:
            return KeyStatus.DISABLED
        if self.expires_at is not None and self.expires_at <= now:
            return KeyStatus.EXPIRED
        return KeyStatus.ACTIVE


class IssuedKey(_Model):
    """A newly created key. The only object that ever holds the plaintext.

    Show ``plaintext`` to its owner once; keycap cannot recover it later.
    ``repr`` and ``str`` mask it.
    """

    key: APIKey
    plaintext: str = Field(repr=False)

    @property
    def id(self) -> str:
        return self.key.id


class BudgetStatus(_Model):
    """A budget as it stands now (a passed period reads as a fresh one)."""

    id: str
    #: "key", "project" or "organization".
    scope: str
    subject_id: str
    meter: str
    period: str
    anchor_day: int | None
    limit: Decimal
    #: Extra allowance granted for the current period (grant_credit).
    credit: Decimal
    used: Decimal
    held: Decimal
    remaining: Decimal
    period_start: datetime
    #: When the period resets; None for lifetime budgets.
    reset_at: datetime | None
    alert_thresholds: tuple[int, ...]


class KeyEvent(_Model):
    """A change to a key, for ``APIKeyClient(on_key_event=...)``, after it committed."""

    #: "created", "delegated", "imported", "updated", "rolled", "revoked",
    #: "disabled", "enabled" or "deleted".
    kind: str
    key_id: str
    org_id: str
    at: datetime
    #: The key after the change (as it was, for "deleted"). Never the secret.
    key: APIKey


class Remaining(_Model):
    """What a key can still spend of one meter now (:meth:`APIKeyClient.remaining`)."""

    meter: str
    #: The least any budget of this meter that applies to the key has left.
    amount: Decimal
    #: The budget with that least: the key's own, its project's or its
    #: organization's (on a tie, the most specific).
    binding: BudgetStatus
    #: When ``binding`` resets (None: a lifetime budget). Another budget may bind
    #: after that; ``budgets`` has them all.
    reset_at: datetime | None
    #: Every budget of this meter that applies to the key, tightest first.
    budgets: tuple[BudgetStatus, ...]


class RateLimitStatus(_Model):
    id: str
    scope: str
    subject_id: str
    name: str
    meter: str | None
    #: Calls per window, or units of ``meter`` per window.
    limit: int | Decimal
    window_seconds: Decimal
    remaining: int | Decimal
    #: When the full limit is available again.
    reset_at: datetime


class BudgetAlert(_Model):
    """A charge crossed ``threshold`` percent of a budget's limit in this period."""

    budget_id: str
    scope: str
    subject_id: str
    meter: str
    threshold: int
    limit: Decimal
    used: Decimal
    period_start: datetime
    key_id: str | None


class Charge(_Model):
    """The result of ``charge`` (and of a metered ``validate_key``)."""

    #: The key charged; None for an identity charged without a key.
    key_id: str | None
    amounts: dict[str, Decimal]
    #: Every budget debited, after the debit; the tightest first.
    budgets: tuple[BudgetStatus, ...]
    alerts: tuple[BudgetAlert, ...]
    #: True when this is the stored result of an earlier call with the same idempotency key.
    replayed: bool = False
    #: The identity charged without a key (``charge(identity_id, ...)``); else None.
    identity_id: str | None = None
    #: Admitted from this process's lease (``APIKeyClient(leases=...)``): ``budgets``
    #: are as the lease's slice was reserved, with the slice held.
    leased: bool = False


class Hold(_Model):
    """Money reserved on every budget of a meter until settled, released or expired."""

    id: str
    key_id: str | None
    meter: str
    amount: Decimal
    #: "open", "settled", "released" or "expired".
    status: str
    created_at: datetime
    expires_at: datetime
    closed_at: datetime | None
    budgets: tuple[BudgetStatus, ...] = ()
    replayed: bool = False
    #: The identity that reserved without a key (``reserve(identity_id, ...)``).
    identity_id: str | None = None


class Settlement(_Model):
    """The result of ``settle``: what was charged, returned, and could not be charged."""

    hold_id: str
    key_id: str | None
    meter: str
    held: Decimal
    actual: Decimal
    charged: Decimal
    #: Held but not used: returned to the budgets.
    returned: Decimal
    #: Used beyond the hold that the budgets could not take; recorded in the ledger.
    shortfall: Decimal
    budgets: tuple[BudgetStatus, ...]
    alerts: tuple[BudgetAlert, ...]
    replayed: bool = False


class AuditEntry(_Model):
    """One administrative change (:meth:`APIKeyClient.audit_log`)."""

    #: Increasing: a later change has a larger id (pass it as ``before=`` to page).
    id: int
    org_id: str
    at: datetime
    #: Who, as named with :meth:`APIKeyClient.acting_as`; None: not said.
    actor: str | None
    #: ``key.created``, ``key.updated``, ``key.rolled``, ``key.revoked``,
    #: ``key.disabled``, ``key.enabled``, ``key.deleted``, ``budget.set``,
    #: ``budget.removed``, ``budget.credited``, ``rate_limit.set``,
    #: ``rate_limit.removed``, ``organization.created`` (``project.``,
    #: ``product.``), ``….deleted``, ``organization.allowed_scopes``,
    #: ``project.product_linked``, ``project.product_unlinked``.
    action: str
    #: The key, project or organization changed (for a budget or rate limit: the
    #: one it is attached to).
    subject_id: str
    #: The subject as it was, and as it is after; None where it did not exist.
    #: Never a secret or a digest.
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class UsageRow(_Model):
    """Spending of one meter in one day or month, from the ledger."""

    period: str
    meter: str
    amount: Decimal
    charges: int


APIKey.model_rebuild()
Identity.model_rebuild()
