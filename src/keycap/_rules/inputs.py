"""Checks on caller input that run before any SQL: types, lengths, encodings."""

from __future__ import annotations

import json
import unicodedata
from typing import Any, Final

from keycap._errors import InvalidArgumentError

MAX_NAME: Final = 200
MAX_METADATA_BYTES: Final = 16_384
MAX_PAGE: Final = 1000


def text(
    value: object, field: str, *, allow_empty: bool = False, max_length: int = MAX_NAME
) -> str:
    """A name-like string: 0/1-200 (``max_length``) characters, valid Unicode, no
    control characters, no whitespace at either end.

    Whitespace at the ends is refused because MariaDB's collations pad: there,
    ``"pay-7 "`` equals ``"pay-7"``, so an idempotency key, a name or a product
    name would match a different string than on PostgreSQL and SQLite. Refusing
    it makes every database compare these strings exactly alike.

    Raises:
        InvalidArgumentError: anything else (None, bytes, NUL, lone surrogates, too
            long, whitespace at an end).
    """
    if not isinstance(value, str):
        raise InvalidArgumentError(field, "must be a string")
    if len(value) > max_length:
        raise InvalidArgumentError(field, f"must be at most {max_length} characters")
    if not value.strip() and not (allow_empty and value == ""):
        raise InvalidArgumentError(field, "must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(field, "must be valid Unicode (no lone surrogates)") from None
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise InvalidArgumentError(field, "must not contain control characters")
    if value != value.strip():
        raise InvalidArgumentError(field, "must not begin or end with whitespace")
    return value


def metadata(value: object, field: str = "metadata") -> dict[str, Any]:
    """A JSON object of at most 16 KiB, as it will read back (a copy, not the caller's)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentError(field, "must be a dict (a JSON object)")
    if not _string_keys(value):
        # json.dumps would turn 1 into "1" silently, and {1: "a", "1": "b"} into one key.
        raise InvalidArgumentError(field, "must have str keys only, at every level")
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False)
        size = len(encoded.encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError):
        raise InvalidArgumentError(
            field, "must be JSON: str keys; str, int, float, bool, None, list, dict values"
        ) from None
    if size > MAX_METADATA_BYTES:
        raise InvalidArgumentError(field, f"must encode to at most {MAX_METADATA_BYTES} bytes")
    result: dict[str, Any] = json.loads(encoded)
    return result


def _string_keys(value: object) -> bool:
    """Every dict inside ``value`` (itself included) has only str keys."""
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > 100_000:  # far more than 16 KiB of JSON can hold; the size check refuses it
            return True
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                return False
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return True


def page(limit: object, offset: object) -> tuple[int, int]:
    for name, v in (("limit", limit), ("offset", offset)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise InvalidArgumentError(name, "must be an int")
    assert isinstance(limit, int) and isinstance(offset, int)
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidArgumentError("limit", f"must be between 1 and {MAX_PAGE}")
    if not 0 <= offset <= 10**9:
        raise InvalidArgumentError("offset", "must be between 0 and 10**9")
    return limit, offset


def flag(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(field, "must be True or False")
    return value
