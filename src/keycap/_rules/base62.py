"""Base62 encoding and unbiased random base62 strings."""

from __future__ import annotations

import re
import secrets

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62 = re.compile("[0-9A-Za-z]*")


def random_string(length: int) -> str:
    """``length`` characters drawn uniformly from the alphabet by the OS CSPRNG."""
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def encode_fixed(value: int, width: int) -> str:
    """``value`` in base62, left-padded with ``0`` to exactly ``width`` characters."""
    if value < 0 or value >= 62**width:
        raise ValueError("value does not fit")
    out = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        out.append(ALPHABET[rem])
    return "".join(reversed(out))


def is_base62(text: str) -> bool:
    return _BASE62.fullmatch(text) is not None
