"""Keys imported from other systems, verified by their own scheme until their
first success (pure; no database).

An imported key keeps its plaintext, which the customer already holds; keycap
stores what the other system stored (its hash, never a plaintext) and a
``lookup`` computable from the presented plaintext alone, so the key is found
by index. On the first successful verification keycap re-digests it with its
own HMAC and drops the foreign hash.

Schemes:

- ``apikeys-platform``: apikeys-platform's keys (``sk_<env>_<43 characters>``),
  HMAC-SHA256 of the whole key under that system's signing secret (which the
  client must be given: ``APIKeyClient(foreign_secrets={"apikeys-platform":
  ...})``); the lookup is its 8-character ``key_prefix``.
- ``sha256``: the SHA-256 of the whole key, hex or base64 (Unkey's keys, and
  any system that stored a plain SHA-256); the hash is its own lookup.
- ``drf``: djangorestframework-api-key's ``prefix.secret`` keys, the whole key
  hashed by its ``Sha512ApiKeyHasher`` or one of Django's password hashers
  (``pbkdf2_sha256``, ``pbkdf2_sha1``, ``argon2``); the lookup is the prefix.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from typing import Final

from keycap._errors import ConfigurationError, InvalidArgumentError

__all__ = ["SCHEMES", "lookup", "lookups", "stored_hash", "verify"]

APIKEYS: Final = "apikeys-platform"
SHA256: Final = "sha256"
DRF: Final = "drf"
SCHEMES: Final = (APIKEYS, SHA256, DRF)
#: The placeholder pepper id of a key not yet re-digested: no ring has it.
IMPORTED_PEPPER: Final = "imported"
IMPORTED_DIGEST: Final = "0" * 64

_APIKEYS_TOKEN = 43  # base64url of 32 bytes, unpadded
_MAX_KEY = 512


def lookups(plaintext: str) -> dict[str, str]:
    """For each scheme the presented key could belong to, its lookup value."""
    if not (0 < len(plaintext) <= _MAX_KEY) or not plaintext.isascii():
        return {}
    out = {SHA256: lookup(SHA256, _sha256(plaintext))}
    if len(plaintext) >= _APIKEYS_TOKEN + 2 and plaintext[-(_APIKEYS_TOKEN + 1)] == "_":
        out[APIKEYS] = lookup(APIKEYS, plaintext[-_APIKEYS_TOKEN:][:8])
    prefix, dot, _ = plaintext.partition(".")
    if dot and prefix:
        out[DRF] = lookup(DRF, prefix)
    return out


def lookup(scheme: str, value: str) -> str:
    """The stored lookup of ``value`` (a prefix, or for ``sha256`` the hash)."""
    return f"{scheme}:{value}"


def stored_hash(scheme: object, value: object, *, prefix: object = None) -> tuple[str, str]:
    """Check what an import gives; ``(lookup, foreign hash as stored)``.

    Raises:
        InvalidArgumentError: an unknown scheme, or a hash or prefix not of its shape.
    """
    if scheme not in SCHEMES:
        raise InvalidArgumentError("scheme", "must be one of " + ", ".join(SCHEMES))
    if not isinstance(value, str) or not 0 < len(value) <= 1024 or not value.isascii():
        raise InvalidArgumentError("hash", "must be the hash the other system stored")
    if scheme == SHA256:
        hexed = _as_hex(value)
        return lookup(SHA256, hexed), hexed
    if not isinstance(prefix, str) or not 0 < len(prefix) <= 64 or not prefix.isascii():
        raise InvalidArgumentError("prefix", f"a {scheme} key needs the prefix it was stored with")
    if scheme == APIKEYS:
        if len(value) != 64 or not _is_hex(value) or len(prefix) != 8:
            raise InvalidArgumentError("hash", "an apikeys-platform key_hash is 64 hex characters")
        return lookup(APIKEYS, prefix), value.lower()
    if "." in prefix:
        raise InvalidArgumentError("prefix", "the part of the key before its dot")
    if value.split("$", 1)[0] not in _DJANGO:
        raise InvalidArgumentError(
            "hash", "a djangorestframework-api-key hash: " + ", ".join(_DJANGO)
        )
    return lookup(DRF, prefix), value


def verify(scheme: str, plaintext: str, stored: str, secrets: Mapping[str, str]) -> bool:
    """Whether ``plaintext`` is the key ``stored`` is the hash of, by ``scheme``.

    Raises:
        ConfigurationError: an apikeys-platform key without its system's secret, or
            an argon2 hash without argon2-cffi installed.
    """
    if scheme == SHA256:
        return hmac.compare_digest(_sha256(plaintext), stored)
    if scheme == APIKEYS:
        secret = secrets.get(APIKEYS)
        if secret is None:
            raise ConfigurationError(
                "an imported apikeys-platform key needs its signing secret: "
                "APIKeyClient(foreign_secrets={'apikeys-platform': ...})"
            )
        mac = hmac.new(secret.encode(), plaintext.encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(mac, stored)
    return _django(plaintext, stored)


def _django(plaintext: str, encoded: str) -> bool:
    algorithm = encoded.split("$", 1)[0]
    if algorithm == "sha512":
        expected = "sha512$$" + hashlib.sha512(plaintext.encode()).hexdigest()
        return hmac.compare_digest(expected, encoded)
    if algorithm in ("pbkdf2_sha256", "pbkdf2_sha1"):
        try:
            _, iterations, salt, hashed = encoded.split("$", 3)
            rounds = int(iterations)
        except ValueError:
            return False
        digest = hashlib.pbkdf2_hmac(
            algorithm.removeprefix("pbkdf2_"), plaintext.encode(), salt.encode(), rounds
        )
        return hmac.compare_digest(base64.b64encode(digest).decode("ascii").strip(), hashed)
    # argon2$argon2id$v=19$m=...,t=...,p=...$salt$hash: argon2-cffi's encoding after
    # Django's "argon2" tag.
    try:
        from argon2 import PasswordHasher
        from argon2.exceptions import Argon2Error, InvalidHashError
    except ImportError:
        raise ConfigurationError(
            "verifying an argon2 hash needs argon2-cffi: pip install 'keycap[argon2]'"
        ) from None
    try:
        return bool(PasswordHasher().verify(encoded.removeprefix("argon2"), plaintext))
    except (Argon2Error, InvalidHashError):
        return False


_DJANGO = ("sha512", "pbkdf2_sha256", "pbkdf2_sha1", "argon2")


def _sha256(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def _is_hex(value: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in value)


def _as_hex(value: str) -> str:
    """A SHA-256 given as 64 hex characters, or as base64 (Unkey's form)."""
    if len(value) == 64 and _is_hex(value):
        return value.lower()
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=False)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise InvalidArgumentError("hash", "a SHA-256: 64 hex characters, or base64")
    return raw.hex()
