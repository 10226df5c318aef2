"""Key digests: HMAC-SHA256 under a ring of peppers (the client's signing secrets).

The newest secret digests new keys; every secret in the ring verifies. Each
secret has a short public id stored beside the digest, so verification needs
one HMAC, and a key made under an older secret is re-digested under the newest
on its next successful use (``needs_upgrade``). A per-purpose salt keeps these
digests from being reusable as any other HMAC made with the same secret.

HMAC rather than a password hash: keys carry about 196 random bits, so a slow
hash adds nothing against guessing and costs every request (the reason
djangorestframework-api-key moved off PBKDF2).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Final

from keycap._errors import ConfigurationError

MIN_SECRET_BYTES: Final = 32
_SALT: Final = b"keycap.key-digest.v1"


def _as_bytes(secret: object) -> bytes:
    if isinstance(secret, str):
        try:
            return secret.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigurationError("signing_secret must be valid text") from None
    if isinstance(secret, bytes):
        return secret
    raise ConfigurationError("signing_secret must be str or bytes, or a list of them")


class PepperRing:
    """Signing secrets, newest first. Never prints them."""

    __slots__ = ("_keys", "current_id")

    def __init__(self, secrets: str | bytes | Sequence[str | bytes]) -> None:
        items = [secrets] if isinstance(secrets, str | bytes) else secrets
        if not isinstance(items, Sequence) or not items:
            raise ConfigurationError("signing_secret is required (one secret, or a list)")
        self._keys: dict[str, bytes] = {}
        for item in items:
            raw = _as_bytes(item)
            if len(raw) < MIN_SECRET_BYTES:
                raise ConfigurationError(
                    f"each signing_secret must be at least {MIN_SECRET_BYTES} bytes"
                )
            derived = hmac.new(raw, _SALT, hashlib.sha256).digest()
            # The id is a hash of the derived key: public, stable, reveals nothing usable.
            pepper_id = hashlib.sha256(b"keycap.pepper-id" + derived).hexdigest()[:12]
            self._keys.setdefault(pepper_id, derived)
        self.current_id: str = next(iter(self._keys))

    def __repr__(self) -> str:
        return f"PepperRing(<{len(self._keys)} secrets>, current_id={self.current_id!r})"

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def digest(self, plaintext: str, pepper_id: str | None = None) -> str:
        """Hex HMAC-SHA256 of ``plaintext`` under ``pepper_id`` (default: newest)."""
        key = self._keys[pepper_id or self.current_id]
        return hmac.new(key, plaintext.encode("ascii"), hashlib.sha256).hexdigest()

    def digests(self, plaintext: str) -> dict[str, str]:
        """The digest under every pepper, by pepper id (for a one-statement lookup)."""
        return {pid: self.digest(plaintext, pid) for pid in self._keys}

    def verify(self, plaintext: str, pepper_id: str, digest: str) -> bool:
        """Constant-time check; an unknown (retired) pepper id never verifies."""
        if pepper_id not in self._keys:
            return False
        return hmac.compare_digest(self.digest(plaintext, pepper_id), digest)

    def knows(self, pepper_id: str) -> bool:
        """The pepper is still in the ring (a retired one verifies nothing)."""
        return pepper_id in self._keys

    def needs_upgrade(self, pepper_id: str) -> bool:
        return pepper_id != self.current_id
