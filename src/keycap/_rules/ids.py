"""Public ids of organizations, projects, products and keys.

Ids are ``{kind}_{base62}``. A string that is not of that shape cannot name an
entity, so lookups reject it without touching the database.
"""

from __future__ import annotations

import re
from typing import Final

from keycap._errors import InvalidArgumentError, NotFoundError
from keycap._rules.base62 import random_string

ORG: Final = "org"
PROJECT: Final = "proj"
PRODUCT: Final = "prod"
KEY: Final = "key"
BUDGET: Final = "bud"
HOLD: Final = "hold"
RATE_LIMIT: Final = "rl"
IDENTITY: Final = "idn"
ACCESS_REQUEST: Final = "acr"

#: Random characters after the kind; a key id's part is the public id inside the token.
RANDOM_LENGTH: Final = 16
KEY_PUBLIC_ID_LENGTH: Final = 12

_RESOURCE = {
    ORG: "organization",
    PROJECT: "project",
    PRODUCT: "product",
    KEY: "key",
    BUDGET: "budget",
    HOLD: "hold",
    RATE_LIMIT: "rate limit",
    IDENTITY: "identity",
    ACCESS_REQUEST: "access request",
}
_PATTERNS = {
    kind: re.compile(
        rf"{kind}_[0-9A-Za-z]{{{KEY_PUBLIC_ID_LENGTH if kind == KEY else RANDOM_LENGTH}}}"
    )
    for kind in _RESOURCE
}
MAX_ID_LENGTH: Final = 32


def new_id(kind: str) -> str:
    return f"{kind}_{random_string(RANDOM_LENGTH)}"


def key_id(public_id: str) -> str:
    return f"{KEY}_{public_id}"


def public_id(key_id: str) -> str:
    """The public id a key's plaintext carries: its id without ``key_``."""
    return key_id.removeprefix(f"{KEY}_")


def resource_name(kind: str) -> str:
    return _RESOURCE[kind]


def is_valid(kind: str, value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= MAX_ID_LENGTH
        and _PATTERNS[kind].fullmatch(value) is not None
    )


def check(kind: str, value: object, *, field: str | None = None) -> str:
    """Return ``value`` if it is an id of ``kind``.

    Raises:
        InvalidArgumentError: ``value`` is not a string.
        NotFoundError: ``value`` is a string but not an id of that kind.
    """
    if not isinstance(value, str):
        raise InvalidArgumentError(field or f"{_RESOURCE[kind]} id", "must be a string id")
    if not is_valid(kind, value):
        # Never echo a malformed value: a caller may have passed a plaintext key here.
        raise NotFoundError(_RESOURCE[kind], "(malformed id)")
    return value


def check_optional(kind: str, value: object, *, field: str | None = None) -> str | None:
    return None if value is None else check(kind, value, field=field)


def check_payer(value: object, field: str = "key_id") -> str:
    """The id of a key, or of an identity metered without a key (``charge``,
    ``reserve``).

    Raises: InvalidArgumentError (not a string), NotFoundError (neither)."""
    if is_valid(IDENTITY, value):
        return value  # type: ignore[return-value]
    return check(KEY, value, field=field)


def check_subject(value: object, field: str = "subject_id") -> str:
    """The id of a key, identity, project or organization (what limits and budgets
    belong to).

    Raises:
        InvalidArgumentError: not a string.
        NotFoundError: not an id of one of those kinds.
    """
    if not isinstance(value, str):
        raise InvalidArgumentError(
            field, "must be the id of a key, identity, project or organization"
        )
    for kind in (KEY, IDENTITY, PROJECT, ORG):
        if is_valid(kind, value):
            return value
    raise NotFoundError("key, identity, project or organization", "(malformed id)")
