"""Key digests: HMAC-SHA256 under a ring of peppers (the client's signing secrets).

The newest secret digests new keys; every secret in the ring verifies. Each
secret has a short public id stored beside the digest, so verification needs
one HMAC, and a key made under an older secret is re-digested under the newest
on its next successful use (``needs_upgrade``). A per-purpose salt keeps these
digests from being reusable as any other HMAC made with the same secret.

HMAC rather than a password hash by default: keys carry about 196 random bits,
so a slow hash adds nothing against guessing and costs every request (the
reason djangorestframework-api-key moved off PBKDF2). For a policy that demands
a memory-hard hash, ``hasher="argon2id"`` digests new keys with Argon2id
(:data:`ARGON2`'s costs) of the peppered HMAC, under a salt derived from the
pepper: still one value per key and pepper, so the validation statement still
compares it in SQL. Its entries in the ring have ids starting ``a2``; keys
digested by HMAC keep verifying and are re-digested on their next use, like a
key under an older pepper. A ring remembers the Argon2id digests it made, by
a keyed fingerprint of the key (never the key): a key used again in the same
process costs one HMAC, while every new guess costs a full Argon2id.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Sequence
from typing import Any, Final

from keycap._errors import ConfigurationError

MIN_SECRET_BYTES: Final = 32
_SALT: Final = b"keycap.key-digest.v1"
HASHERS: Final = ("hmac", "argon2id")
#: Argon2id's costs (RFC 9106's second recommendation, OWASP's first): 19 MiB,
#: two passes, one lane; 32 bytes out.
ARGON2: Final = {"memory_cost": 19456, "time_cost": 2, "parallelism": 1, "hash_len": 32}
#: How many Argon2id digests a ring remembers (about 1.5 MB).
MEMO_ENTRIES: Final = 10_000


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

    __slots__ = ("_fingerprint", "_keys", "_lock", "_memo", "_slow", "current_id")

    def __init__(self, secrets: str | bytes | Sequence[str | bytes], hasher: str = "hmac") -> None:
        items = [secrets] if isinstance(secrets, str | bytes) else secrets
        if not isinstance(items, Sequence) or not items:
            raise ConfigurationError("signing_secret is required (one secret, or a list)")
        if hasher not in HASHERS:
            raise ConfigurationError("key_hasher must be one of " + ", ".join(HASHERS))
        self._keys: dict[str, bytes] = {}
        #: Argon2id entries: pepper id -> its salt.
        self._slow: dict[str, bytes] = {}
        for item in items:
            raw = _as_bytes(item)
            if len(raw) < MIN_SECRET_BYTES:
                raise ConfigurationError(
                    f"each signing_secret must be at least {MIN_SECRET_BYTES} bytes"
                )
            derived = hmac.new(raw, _SALT, hashlib.sha256).digest()
            # The id is a hash of the derived key: public, stable, reveals nothing usable.
            pepper_id = hashlib.sha256(b"keycap.pepper-id" + derived).hexdigest()[:12]
            if hasher == "argon2id":
                _argon2()  # installed, or ConfigurationError now rather than on a request
                slow_id = "a2" + pepper_id[:10]
                self._keys.setdefault(slow_id, derived)
                self._slow[slow_id] = hmac.new(
                    derived, b"keycap.argon2-salt", hashlib.sha256
                ).digest()[:16]
            self._keys.setdefault(pepper_id, derived)
        self.current_id: str = next(iter(self._keys))
        first = self._keys[self.current_id]
        self._fingerprint = hmac.new(first, b"keycap.fingerprint", hashlib.sha256).digest()
        #: Argon2id digests already made, by (fingerprint, pepper id): a key used
        #: again in this process costs one HMAC, never the plaintext kept.
        self._memo: dict[tuple[bytes, str], str] = {}
        self._lock = threading.Lock()  # digests may be made in worker threads

    def __repr__(self) -> str:
        return f"PepperRing(<{len(self._keys)} secrets>, current_id={self.current_id!r})"

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def digest(self, plaintext: str, pepper_id: str | None = None) -> str:
        """Hex HMAC-SHA256 of ``plaintext`` under ``pepper_id`` (default: newest);
        for an Argon2id entry, the Argon2id of that HMAC."""
        pid = pepper_id or self.current_id
        mac = hmac.new(self._keys[pid], plaintext.encode("ascii"), hashlib.sha256)
        salt = self._slow.get(pid)
        if salt is None:
            return mac.hexdigest()
        memo = (self.fingerprint(plaintext), pid)
        if (known := self._memo.get(memo)) is not None:
            return known
        raw: bytes = _argon2()(secret=mac.digest(), salt=salt, **ARGON2)
        with self._lock:
            if len(self._memo) >= MEMO_ENTRIES:
                del self._memo[next(iter(self._memo))]  # the oldest
            self._memo[memo] = raw.hex()
        return raw.hex()

    def cheap(self, plaintext: str) -> bool:
        """Whether :meth:`digests` is quick for ``plaintext``: no Argon2id entry,
        or its digests already remembered. When not, make them off the event
        loop (argon2-cffi releases the GIL)."""
        if not self._slow:
            return True
        fingerprint = self.fingerprint(plaintext)
        return all((fingerprint, pid) in self._memo for pid in self._slow)

    def fingerprint(self, plaintext: str) -> bytes:
        """A cheap keyed hash of ``plaintext``: what a cache that verified it once
        compares on a repeat, instead of a slow digest."""
        return hmac.new(self._fingerprint, plaintext.encode("utf-8"), hashlib.sha256).digest()

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


def _argon2() -> Any:
    """argon2-cffi's raw Argon2id, or ConfigurationError."""
    try:
        from argon2.low_level import Type, hash_secret_raw
    except ImportError:
        raise ConfigurationError(
            "key_hasher='argon2id' needs argon2-cffi: pip install 'keycap[argon2]'"
        ) from None

    def argon2id(**kwargs: Any) -> bytes:
        return hash_secret_raw(type=Type.ID, version=19, **kwargs)

    return argon2id
