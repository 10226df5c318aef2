"""Scope grammar and matching.

A scope is ``segment(:segment)*`` where a segment is 1+ of ``A-Z a-z 0-9 _ . -``;
the last segment of a *granted* scope may be ``*``, and ``*`` alone grants
everything. Matching is case-sensitive and by whole segments:

* ``chat:write`` is covered by ``chat:write``, ``chat:*`` and ``*``;
* ``chat:*`` covers ``chat:write`` and ``chat:admin:read``, not ``chat`` itself;
* a required scope written with ``*`` is covered only by a grant at least as
  broad (``chat:*`` by ``chat:*`` or ``*``);
* an empty grant list grants nothing.

What a validation *requires* is all of a list, each item a scope or
:func:`any_of` several: ``["files:read", any_of("chat:write", "chat:admin")]``
needs ``files:read`` and at least one of the other two. It is kept as
:data:`Required`, a tuple of groups, one scope of each group needed.

Because the grants that can cover a required scope are a short list computed
from the scope alone (:func:`covering`), the check also runs inside SQL as a
substring test on the stored form (``" a b c "``), which is what lets
validation decide and record a use in one statement.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

from keycap._errors import InvalidArgumentError

MAX_SCOPES: Final = 64
MAX_SCOPE_LENGTH: Final = 128
ALL: Final = "*"

_SCOPE = re.compile(r"[A-Za-z0-9_.\-]+(?::[A-Za-z0-9_.\-]+)*(?::\*)?|\*")


def normalize(scopes: object, field: str = "scopes") -> tuple[str, ...]:
    """Validate a collection of scopes; return them de-duplicated and sorted.

    Raises:
        InvalidArgumentError: not a list/tuple/set of valid scope strings, or too many.
    """
    if isinstance(scopes, str | bytes | Mapping) or not isinstance(scopes, Iterable):
        # A dict iterates over its keys: {"chat:write": False} would grant chat:write.
        raise InvalidArgumentError(field, "must be a list of scope strings")
    items = list(scopes)
    if len(items) > MAX_SCOPES:
        raise InvalidArgumentError(field, f"at most {MAX_SCOPES} scopes")
    for item in items:
        if not isinstance(item, str) or len(item) > MAX_SCOPE_LENGTH or not _SCOPE.fullmatch(item):
            raise InvalidArgumentError(
                field, "each scope is like 'chat:write', 'chat:*' or '*' (letters, digits, _ . -)"
            )
    return tuple(sorted(set(items)))


@dataclass(frozen=True, slots=True)
class AnyOf:
    """Any one of ``scopes`` (made by :func:`any_of`), as one item of ``required_scopes``."""

    scopes: tuple[str, ...]

    def __str__(self) -> str:
        return "any_of(" + ", ".join(self.scopes) + ")"


#: What a validation requires: every group, and of each group one scope.
Required: TypeAlias = tuple[tuple[str, ...], ...]


def any_of(*scopes: str) -> AnyOf:
    """At least one of ``scopes``: ``required_scopes=["files:read", any_of("chat:write",
    "chat:admin")]`` needs files:read and chat:write or chat:admin.

    Raises:
        InvalidArgumentError: no scope, or a bad one.
    """
    found = normalize(scopes, "any_of")
    if not found:
        raise InvalidArgumentError("any_of", "needs at least one scope")
    return AnyOf(found)


def required(value: object, field: str = "required_scopes") -> Required:
    """Validate ``required_scopes`` (scopes and :class:`AnyOf`, all of them needed);
    return its groups, de-duplicated and sorted.

    Raises:
        InvalidArgumentError: not a list of scopes and ``any_of(...)``, or too many.
    """
    if isinstance(value, AnyOf):
        value = [value]
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise InvalidArgumentError(field, "must be a list of scopes and any_of(...)")
    items = list(value)
    if len(items) > MAX_SCOPES:
        raise InvalidArgumentError(field, f"at most {MAX_SCOPES} scopes")
    groups = {
        item.scopes if isinstance(item, AnyOf) else normalize([item], field) for item in items
    }
    return tuple(sorted(groups))


def expressed(groups: Required) -> list[str | AnyOf]:
    """``groups`` written back as ``required_scopes``."""
    return [group[0] if len(group) == 1 else AnyOf(group) for group in groups]


def named(groups: Required) -> tuple[str, ...]:
    """Every scope ``groups`` mention (for documentation, such as OpenAPI)."""
    return tuple(sorted({scope for group in groups for scope in group}))


def unmet(granted: Iterable[str], groups: Required) -> Required:
    """The groups none of whose scopes ``granted`` covers, in the order given."""
    have = set(granted)
    return tuple(
        group for group in groups if not any(have.intersection(covering(scope)) for scope in group)
    )


def covering(required: str) -> tuple[str, ...]:
    """Every granted scope that covers ``required``, broadest first."""
    if required == ALL:
        return (ALL,)
    parts = required.split(":")
    if parts[-1] == "*":
        parts.pop()
        out = [ALL]
        out += [":".join(parts[:i]) + ":*" for i in range(1, len(parts) + 1)]
        return tuple(out)
    out = [ALL]
    out += [":".join(parts[:i]) + ":*" for i in range(1, len(parts))]
    out.append(required)
    return tuple(out)


def missing(granted: Iterable[str], required: Iterable[str]) -> tuple[str, ...]:
    """The required scopes that ``granted`` does not cover, in the order given."""
    have = set(granted)
    return tuple(r for r in required if not have.intersection(covering(r)))


def encode(scopes: tuple[str, ...]) -> str:
    """Stored form: space-delimited with a space at each end, so ``" s "`` finds ``s``."""
    return " " + " ".join(scopes) + " " if scopes else " "


def decode(stored: str) -> tuple[str, ...]:
    return tuple(stored.split())
