"""Result models. None of them holds a secret, except IssuedKey, which masks it."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["APIKey", "IssuedKey", "KeyStatus", "Organization", "Product", "Project"]


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
