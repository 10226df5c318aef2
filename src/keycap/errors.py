"""Every failure keycap raises, under one root.

::

    KeycapError                      never raised itself; catch it to catch everything
    ├── KeyRejectedError             validate_key refused the presented key
    │   ├── InvalidKeyError          malformed, unknown or wrong secret (alike on purpose)
    │   ├── ExpiredKeyError          .expired_at
    │   ├── RevokedKeyError          .revoked_at
    │   ├── DisabledKeyError         .disabled_at
    │   ├── ForbiddenError           .reason: wrong organization, project or product
    │   └── InsufficientScopeError   .missing_scopes
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
from typing import Any, ClassVar

__all__ = [
    "AlreadyExistsError",
    "ConfigurationError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "DisabledKeyError",
    "ExpiredKeyError",
    "ForbiddenError",
    "InsufficientScopeError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "KeyRejectedError",
    "KeycapError",
    "NotFoundError",
    "RevokedKeyError",
]


class KeycapError(Exception):
    """Root of every keycap error. Never raised directly."""

    code: ClassVar[str] = "keycap_error"
    default_message: ClassVar[str] = "keycap error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    def data(self) -> dict[str, Any]:
        """The machine-readable fields of this error, besides ``code`` and ``message``."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """``code``, ``message`` and the error's data, JSON-ready (datetimes as ISO 8601)."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        for name, value in self.data().items():
            out[name] = value.isoformat() if isinstance(value, datetime) else value
        return out

    def __repr__(self) -> str:
        fields = "".join(f", {k}={v!r}" for k, v in self.data().items())
        return f"{type(self).__name__}({self.message!r}{fields})"


class KeyRejectedError(KeycapError):
    """``validate_key`` refused the key. Subclasses say why."""

    code = "key_rejected"
    default_message = "API key rejected"

    def __init__(self, message: str | None = None, *, key_id: str | None = None) -> None:
        super().__init__(message)
        #: The id of the key, when the key was identified (never for InvalidKeyError).
        self.key_id = key_id

    def data(self) -> dict[str, Any]:
        return {"key_id": self.key_id} if self.key_id else {}


class InvalidKeyError(KeyRejectedError):
    """The key is malformed, unknown, or its secret is wrong.

    These cases are deliberately indistinguishable so that a caller cannot probe
    which key ids exist.
    """

    code = "invalid_key"
    default_message = "invalid API key"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message)


class ExpiredKeyError(KeyRejectedError):
    """The key's expiry has passed."""

    code = "expired_key"
    default_message = "API key expired"

    def __init__(self, expired_at: datetime, *, key_id: str | None = None) -> None:
        super().__init__(f"API key expired at {expired_at.isoformat()}", key_id=key_id)
        self.expired_at = expired_at

    def data(self) -> dict[str, Any]:
        return {**super().data(), "expired_at": self.expired_at}


class RevokedKeyError(KeyRejectedError):
    """The key was revoked; revocation is permanent."""

    code = "revoked_key"
    default_message = "API key revoked"

    def __init__(self, revoked_at: datetime, *, key_id: str | None = None) -> None:
        super().__init__(f"API key revoked at {revoked_at.isoformat()}", key_id=key_id)
        self.revoked_at = revoked_at

    def data(self) -> dict[str, Any]:
        return {**super().data(), "revoked_at": self.revoked_at}


class DisabledKeyError(KeyRejectedError):
    """The key is suspended; ``enable_key`` reverses this."""

    code = "disabled_key"
    default_message = "API key disabled"

    def __init__(self, disabled_at: datetime, *, key_id: str | None = None) -> None:
        super().__init__(key_id=key_id)
        self.disabled_at = disabled_at

    def data(self) -> dict[str, Any]:
        return {**super().data(), "disabled_at": self.disabled_at}


class ForbiddenError(KeyRejectedError):
    """The key is valid but not for the organization, project or product asked for."""

    code = "forbidden"
    default_message = "API key not valid for this resource"

    def __init__(self, reason: str, *, key_id: str | None = None) -> None:
        super().__init__(f"API key not valid for this resource: {reason}", key_id=key_id)
        #: One of ``"organization"``, ``"project"``, ``"product"``.
        self.reason = reason

    def data(self) -> dict[str, Any]:
        return {**super().data(), "reason": self.reason}


class InsufficientScopeError(KeyRejectedError):
    """The key lacks one or more required scopes."""

    code = "insufficient_scope"
    default_message = "API key lacks required scopes"

    def __init__(self, missing_scopes: Sequence[str], *, key_id: str | None = None) -> None:
        super().__init__(
            "API key lacks required scopes: " + ", ".join(missing_scopes), key_id=key_id
        )
        self.missing_scopes = tuple(missing_scopes)

    def data(self) -> dict[str, Any]:
        return {**super().data(), "missing_scopes": list(self.missing_scopes)}


class NotFoundError(KeycapError):
    """No entity with that id (a malformed id is also not found)."""

    code = "not_found"

    def __init__(self, resource: str, id: str) -> None:
        super().__init__(f"{resource} not found: {id}")
        self.resource = resource
        self.id = id

    def data(self) -> dict[str, Any]:
        return {"resource": self.resource, "id": self.id}


class AlreadyExistsError(KeycapError):
    """An entity with that name already exists in the same parent."""

    code = "already_exists"

    def __init__(self, resource: str, existing_id: str) -> None:
        super().__init__(f"{resource} already exists: {existing_id}")
        self.resource = resource
        self.existing_id = existing_id

    def data(self) -> dict[str, Any]:
        return {"resource": self.resource, "existing_id": self.existing_id}


class InvalidArgumentError(KeycapError, ValueError):
    """An argument is of the wrong type or out of bounds. Nothing was changed."""

    code = "invalid_argument"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid {field}: {problem}")
        self.field = field
        self.problem = problem

    def data(self) -> dict[str, Any]:
        return {"field": self.field}


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
