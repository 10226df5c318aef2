"""Every failure keycap raises, under one root.

::

    KeycapError                      never raised itself; catch it to catch everything
    ├── KeyRejectedError             validate_key refused the presented key
    │   ├── MissingKeyError          no key in the request (raised by the integrations)
    │   ├── InvalidKeyError          malformed, unknown or wrong secret (alike on purpose)
    │   │   └── RolledKeyError       .rolled_until: a secret replaced by roll_key, past its grace
    │   ├── ExpiredKeyError          .expired_at
    │   ├── RevokedKeyError          .revoked_at, .ancestor
    │   ├── DisabledKeyError         .disabled_at, .identity, .ancestor
    │   ├── ForbiddenError           .reason: wrong organization, project or product
    │   ├── InsufficientScopeError   .missing_scopes, .missing_any_of
    │   ├── RateLimitedError         .retry_after, .limit, .remaining, .reset_at, .name
    │   └── UsageExhaustedError      .max_uses
    ├── BudgetExceededError          .scope, .meter, .limit, .used, .remaining, .reset_at
    ├── HoldClosedError              .hold_id, .status
    ├── IdempotencyConflictError     .idempotency_key, .kind: reused with other parameters
    ├── AccessNotGrantedError        .status, .reason: an access request not (or no longer) open
    ├── NotFoundError                .resource, .id
    ├── AlreadyExistsError           .resource, .existing_id
    ├── InvalidArgumentError         .field (also a ValueError)
    ├── ConfigurationError           bad client settings (URL, driver, secrets)
    └── DatabaseError                the database failed in a way keycap cannot interpret
        └── DatabaseUnavailableError the database could not be reached

Every error has a stable machine-readable ``code`` and a ``to_dict()`` for API
responses. No message ever contains a plaintext key or a secret: messages are
built from keycap's own words and ids, never from the caller's input.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

__all__ = [
    "AccessNotGrantedError",
    "AlreadyExistsError",
    "BudgetExceededError",
    "ConfigurationError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "DisabledKeyError",
    "ExpiredKeyError",
    "ForbiddenError",
    "HoldClosedError",
    "IdempotencyConflictError",
    "InsufficientScopeError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "KeyRejectedError",
    "KeycapError",
    "MissingKeyError",
    "NotFoundError",
    "RateLimitedError",
    "RevokedKeyError",
    "UsageExhaustedError",
]


#: Fields left out of ``data()`` while they are None.
_OPTIONAL = frozenset({"key_id", "missing_any_of", "identity"})


class KeycapError(Exception):
    """Root of every keycap error. Never raised directly."""

    code: ClassVar[str] = "keycap_error"
    default_message: ClassVar[str] = "keycap error"
    #: The names of the data this class adds (attributes of the error), declared once:
    #: ``data()``, ``to_dict()`` and ``repr()`` are derived from them.
    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    def data(self) -> dict[str, Any]:
        """The machine-readable fields of this error, besides ``code`` and ``message``:
        the ``fields`` each class of its tree declares, base classes' first. An
        optional field (``key_id``) is left out while it is None."""
        out: dict[str, Any] = {}
        for cls in reversed(type(self).__mro__):
            for name in vars(cls).get("fields", ()):
                value = getattr(self, name)
                if value is None and name in _OPTIONAL:
                    continue
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_dict(self) -> dict[str, Any]:
        """``code``, ``message`` and the error's data, JSON-ready (datetimes as ISO 8601)."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        for name, value in self.data().items():
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, Decimal):
                value = str(value)  # exact; never a float
            out[name] = value
        return out

    def __repr__(self) -> str:
        fields = "".join(f", {k}={v!r}" for k, v in self.data().items())
        return f"{type(self).__name__}({self.message!r}{fields})"


class KeyRejectedError(KeycapError):
    """``validate_key`` refused the key. Subclasses say why."""

    code = "key_rejected"
    fields: ClassVar[tuple[str, ...]] = ("key_id",)
    default_message = "API key rejected"

    def __init__(self, message: str | None = None, *, key_id: str | None = None) -> None:
        super().__init__(message)
        #: The id of the key, when the key was identified (never for InvalidKeyError).
        self.key_id = key_id


class MissingKeyError(KeyRejectedError):
    """The request carried no API key in any of the headers the integration reads."""

    code = "missing_key"
    default_message = "no API key presented"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message)


class InvalidKeyError(KeyRejectedError):
    """The key is malformed, unknown, or its secret is wrong.

    These cases are deliberately indistinguishable so that a caller cannot probe
    which key ids exist.
    """

    code = "invalid_key"
    default_message = "invalid API key"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message)


class RolledKeyError(InvalidKeyError):
    """The secret presented is one a key had before ``roll_key``, and its grace has
    ended: the key lives on with a new secret. An ``InvalidKeyError`` (HTTP 401)
    with its own code, so the caller knows to fetch the new key."""

    code = "rolled_key"
    fields = ("rolled_until",)
    default_message = "API key rolled: this secret was replaced"

    def __init__(self, rolled_until: datetime, *, key_id: str | None = None) -> None:
        KeyRejectedError.__init__(
            self,
            f"API key rolled: this secret stopped working at {rolled_until.isoformat()}",
            key_id=key_id,
        )
        #: When the replaced secret stopped working.
        self.rolled_until = rolled_until


class ExpiredKeyError(KeyRejectedError):
    """The key's expiry has passed."""

    code = "expired_key"
    fields = ("expired_at",)
    default_message = "API key expired"

    def __init__(self, expired_at: datetime, *, key_id: str | None = None) -> None:
        super().__init__(f"API key expired at {expired_at.isoformat()}", key_id=key_id)
        self.expired_at = expired_at


class RevokedKeyError(KeyRejectedError):
    """The key was revoked; revocation is permanent. ``ancestor=True``: a key it
    was delegated from was (revoking a key refuses all its descendants)."""

    code = "revoked_key"
    fields = ("revoked_at", "ancestor")
    default_message = "API key revoked"

    def __init__(
        self, revoked_at: datetime, *, key_id: str | None = None, ancestor: bool = False
    ) -> None:
        whose = "API key's parent" if ancestor else "API key"
        super().__init__(f"{whose} revoked at {revoked_at.isoformat()}", key_id=key_id)
        self.revoked_at = revoked_at
        #: True: an ancestor of the key is revoked, not the key itself (None when not).
        self.ancestor = True if ancestor else None


class DisabledKeyError(KeyRejectedError):
    """The key is suspended (``enable_key`` reverses this), or the identity it
    belongs to is (``identity=True``; ``enable_identity``), or a key it was
    delegated from is (``ancestor=True``)."""

    code = "disabled_key"
    fields = ("disabled_at", "identity", "ancestor")
    default_message = "API key disabled"

    def __init__(
        self,
        disabled_at: datetime,
        *,
        key_id: str | None = None,
        identity: bool = False,
        ancestor: bool = False,
    ) -> None:
        message = None
        if identity:
            message = "API key's identity disabled"
        elif ancestor:
            message = "API key's parent disabled"
        super().__init__(message, key_id=key_id)
        self.disabled_at = disabled_at
        #: True: the key's identity is disabled, not the key itself (None when not).
        self.identity = True if identity else None
        #: True: an ancestor of the key is disabled (None when not).
        self.ancestor = True if ancestor else None


class ForbiddenError(KeyRejectedError):
    """The key is valid but not for the organization, project or product asked for,
    or not from the client's address (``reason="ip"``)."""

    code = "forbidden"
    fields = ("reason",)
    default_message = "API key not valid for this resource"

    def __init__(self, reason: str, *, key_id: str | None = None) -> None:
        super().__init__(f"API key not valid for this resource: {reason}", key_id=key_id)
        #: One of ``"organization"``, ``"project"``, ``"product"``, ``"ip"``.
        self.reason = reason


class InsufficientScopeError(KeyRejectedError):
    """The key lacks one or more required scopes: ``missing_scopes``, and for each
    ``any_of(...)`` it has none of, that group in ``missing_any_of`` (None if none)."""

    code = "insufficient_scope"
    fields = ("missing_scopes", "missing_any_of")
    default_message = "API key lacks required scopes"

    def __init__(
        self,
        missing_scopes: Sequence[str],
        *,
        missing_any_of: Sequence[Sequence[str]] = (),
        key_id: str | None = None,
    ) -> None:
        groups = tuple(tuple(group) for group in missing_any_of)
        said = [*missing_scopes, *("any_of(" + ", ".join(g) + ")" for g in groups)]
        super().__init__("API key lacks required scopes: " + ", ".join(said), key_id=key_id)
        self.missing_scopes = tuple(missing_scopes)
        self.missing_any_of = groups or None

    @classmethod
    def of(
        cls, unmet: Sequence[Sequence[str]], *, key_id: str | None = None
    ) -> InsufficientScopeError:
        """The error for the required groups a key does not meet."""
        return cls(
            [g[0] for g in unmet if len(g) == 1],
            missing_any_of=[g for g in unmet if len(g) > 1],
            key_id=key_id,
        )


class RateLimitedError(KeyRejectedError):
    """A rate limit of the key (or a key it was delegated from), its identity, its
    project or its organization is used up for now."""

    code = "rate_limited"
    fields = (
        "name",
        "scope",
        "limit",
        "remaining",
        "retry_after",
        "reset_at",
        "window_seconds",
        "meter",
        "subject_id",
    )

    def __init__(
        self,
        *,
        name: str,
        scope: str,
        limit: int | Decimal,
        remaining: int | Decimal,
        retry_after: float | None,
        reset_at: datetime,
        window_seconds: Decimal | None = None,
        meter: str | None = None,
        key_id: str | None = None,
        subject_id: str | None = None,
    ) -> None:
        when = (
            "never (the cost exceeds the limit)" if retry_after is None else f"{retry_after:.3f}s"
        )
        super().__init__(
            f"rate limit {name!r} ({scope}) exceeded; retry after {when}", key_id=key_id
        )
        self.name = name
        #: "key", "identity", "project" or "organization": whose limit refused.
        self.scope = scope
        #: The id of that key (the one presented, or one it was delegated from),
        #: identity, project or organization.
        self.subject_id = subject_id
        self.limit = limit
        self.remaining = remaining
        #: Seconds until the same call fits (millisecond precision); None: it never will.
        self.retry_after = retry_after
        #: When the full limit is available again.
        self.reset_at = reset_at
        #: The limit's window, in seconds.
        self.window_seconds = window_seconds
        #: The meter it counts, or None: it counts calls.
        self.meter = meter


class UsageExhaustedError(KeyRejectedError):
    """The key reached ``max_uses`` accepted validations."""

    code = "usage_exhausted"
    fields = ("max_uses",)

    def __init__(self, max_uses: int, *, key_id: str | None = None) -> None:
        super().__init__(f"API key used up its {max_uses} uses", key_id=key_id)
        self.max_uses = max_uses


class BudgetExceededError(KeycapError):
    """A budget of the key, its project or its organization cannot take the amount."""

    code = "budget_exceeded"
    fields = (
        "budget_id",
        "scope",
        "subject_id",
        "meter",
        "period",
        "limit",
        "used",
        "held",
        "remaining",
        "requested",
        "reset_at",
        "key_id",
    )

    def __init__(
        self,
        *,
        budget_id: str,
        scope: str,
        subject_id: str,
        meter: str,
        period: str,
        limit: Decimal,
        used: Decimal,
        held: Decimal,
        remaining: Decimal,
        requested: Decimal,
        reset_at: datetime | None,
        key_id: str | None = None,
    ) -> None:
        super().__init__(
            f"{scope} budget on {meter!r} ({period}) exceeded: requested {requested}, "
            f"remaining {remaining}"
        )
        self.budget_id = budget_id
        #: "key", "project" or "organization": whose budget refused.
        self.scope = scope
        self.subject_id = subject_id
        self.meter = meter
        self.period = period
        self.limit = limit
        self.used = used
        self.held = held
        self.remaining = remaining
        self.requested = requested
        #: When the period resets; None for a lifetime budget.
        self.reset_at = reset_at
        self.key_id = key_id


class HoldClosedError(KeycapError):
    """The hold was already settled, released or expired (and this is no replay)."""

    code = "hold_closed"
    fields = ("hold_id", "status")

    def __init__(self, hold_id: str, status: str) -> None:
        super().__init__(f"hold {hold_id} is already {status}")
        self.hold_id = hold_id
        self.status = status


class IdempotencyConflictError(KeycapError):
    """An idempotency key was sent again with different parameters. A retry must
    repeat the call exactly; nothing was done, and the first call's result stands."""

    code = "idempotency_conflict"
    fields = ("idempotency_key", "kind")

    def __init__(self, idempotency_key: str, kind: str) -> None:
        super().__init__(
            f"idempotency key {idempotency_key!r} was already used for a {kind} "
            "with other parameters"
        )
        self.idempotency_key = idempotency_key
        #: The operation it was used for: charge, reserve, settle or release.
        self.kind = kind


class NotFoundError(KeycapError):
    """No entity with that id (a malformed id is also not found)."""

    code = "not_found"
    fields = ("resource", "id")

    def __init__(self, resource: str, id: str) -> None:
        super().__init__(f"{resource} not found: {id}")
        self.resource = resource
        self.id = id


class AlreadyExistsError(KeycapError):
    """An entity with that name already exists in the same parent."""

    code = "already_exists"
    fields = ("resource", "existing_id")

    def __init__(self, resource: str, existing_id: str) -> None:
        super().__init__(f"{resource} already exists: {existing_id}")
        self.resource = resource
        self.existing_id = existing_id


class InvalidArgumentError(KeycapError, ValueError):
    """An argument is of the wrong type or out of bounds. Nothing was changed."""

    code = "invalid_argument"
    fields = ("field",)

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid {field}: {problem}")
        self.field = field
        self.problem = problem


class ConfigurationError(KeycapError):
    """The client was set up wrongly (URL, driver, signing secrets, prefixes)."""

    code = "configuration_error"


class DatabaseError(KeycapError):
    """The database raised an error keycap does not translate into something more precise."""

    code = "database_error"
    default_message = "database error"


class DatabaseUnavailableError(DatabaseError):
    """The database could not be reached or dropped the connection."""

    code = "database_unavailable"
    default_message = "database unavailable"


class AccessNotGrantedError(KeycapError):
    """An access request cannot be claimed (or decided): it is still pending, was
    denied (``reason`` says why), was already claimed, or has expired."""

    code = "access_not_granted"
    fields = ("status", "reason")
    default_message = "access request not granted"

    def __init__(self, status: str, reason: str | None = None) -> None:
        said = f": {reason}" if reason else ""
        super().__init__(f"access request {status}{said}")
        #: pending, denied, claimed or expired.
        self.status = status
        self.reason = reason
