"""Scope grammar and matching.

A scope is ``segment(:segment)*`` where a segment is 1+ of ``A-Z a-z 0-9 _ . -``;
the last segment of a *granted* scope may be ``*``, and ``*`` alone grants
everything. Matching is case-sensitive and by whole segments:

* ``chat:write`` is covered by ``chat:write``, ``chat:*`` and ``*``;
* ``chat:*`` covers ``chat:write`` and ``chat:admin:read``, not ``chat`` itself;
* a required scope written with ``*`` is covered only by a grant at least as
  broad (``chat:*`` by ``chat:*`` or ``*``);
* an empty grant list grants nothing.

Because the grants that can cover a required scope are a short list computed
from the scope alone (:func:`covering`), the check also runs inside SQL as a
substring test on the stored form (``" a b c "``), which is what lets
validation decide and record a use in one statement.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

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
