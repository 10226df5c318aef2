"""Checks on caller input that run before any SQL: types, lengths, encodings."""

from __future__ import annotations

import json
import unicodedata
from typing import Any, Final

from keycap._errors import InvalidArgumentError

MAX_NAME: Final = 200
MAX_METADATA_BYTES: Final = 16_384
MAX_PAGE: Final = 1000


def text(value: object, field: str, *, allow_empty: bool = False) -> str:
    """A name-like string: 0/1-200 characters, valid Unicode, no control characters.

    Raises:
        InvalidArgumentError: anything else (None, bytes, NUL, lone surrogates, too long).
    """
    if not isinstance(value, str):
        raise InvalidArgumentError(field, "must be a string")
    if len(value) > MAX_NAME:
        raise InvalidArgumentError(field, f"must be at most {MAX_NAME} characters")
    if not value.strip() and not (allow_empty and value == ""):
        raise InvalidArgumentError(field, "must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(field, "must be valid Unicode (no lone surrogates)") from None
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise InvalidArgumentError(field, "must not contain control characters")
    return value


def metadata(value: object, field: str = "metadata") -> dict[str, Any]:
    """A JSON object of at most 16 KiB, as it will read back (a copy, not the caller's)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentError(field, "must be a dict (a JSON object)")
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
