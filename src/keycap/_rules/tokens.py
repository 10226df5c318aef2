"""The key format: ``{prefix}_{environment}_{public_id}{secret}{checksum}``.

* ``public_id``: 12 base62 characters, the lookup handle (also the key id's tail);
  safe to log.
* ``secret``: 33 base62 characters from the OS CSPRNG (about 196 bits).
* ``checksum``: CRC32 of everything before it, as 6 base62 characters, so that a
  typo or a string that is not a key is rejected without a database lookup, as
  GitHub's tokens do.

Parsing checks type, length, prefix, environment, alphabet and checksum, in
that order, and does nothing expensive before the length check.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Final

from keycap._errors import ConfigurationError, InvalidKeyError
from keycap._rules import base62 as _base62
from keycap._rules.ids import KEY_PUBLIC_ID_LENGTH

SECRET_LENGTH: Final = 33
CHECKSUM_LENGTH: Final = 6
BODY_LENGTH: Final = KEY_PUBLIC_ID_LENGTH + SECRET_LENGTH + CHECKSUM_LENGTH
#: Characters of the public id kept in ``start`` for display.
START_LENGTH: Final = 8

_LABEL = re.compile(r"[a-z][a-z0-9]{0,15}")


def _checksum(text: str) -> str:
    return _base62.encode_fixed(zlib.crc32(text.encode("ascii")), CHECKSUM_LENGTH)


@dataclass(frozen=True, slots=True)
class KeyFormat:
    """The prefix and environment every key of one client carries (``sk`` and ``live``)."""

    prefix: str = "sk"
    environment: str = "live"

    def __post_init__(self) -> None:
        for field, value in (("key_prefix", self.prefix), ("environment", self.environment)):
            if not isinstance(value, str) or not _LABEL.fullmatch(value):
                raise ConfigurationError(
                    f"{field} must be 1-16 lowercase letters or digits, starting with a letter"
                )

    @property
    def head(self) -> str:
        return f"{self.prefix}_{self.environment}_"

    @property
    def length(self) -> int:
        return len(self.head) + BODY_LENGTH

    def generate(self, public_id: str | None = None) -> tuple[str, str]:
        """A new ``(public_id, plaintext)`` pair; with ``public_id`` (a rolled key), a
        new secret for that id."""
        public_id = public_id or _base62.random_string(KEY_PUBLIC_ID_LENGTH)
        unsigned = self.head + public_id + _base62.random_string(SECRET_LENGTH)
        return public_id, unsigned + _checksum(unsigned)

    def parse(self, plaintext: object) -> str:
        """Return the public id of a well-formed key.

        Raises:
            InvalidKeyError: not a string, wrong length, prefix, environment,
                alphabet or checksum.
        """
        if not isinstance(plaintext, str) or len(plaintext) != self.length:
            raise InvalidKeyError()
        head = self.head
        if not plaintext.startswith(head):
            raise InvalidKeyError()
        body = plaintext[len(head) :]
        if not _base62.is_base62(body):
            raise InvalidKeyError()
        if _checksum(plaintext[:-CHECKSUM_LENGTH]) != body[-CHECKSUM_LENGTH:]:
            raise InvalidKeyError()
        return body[:KEY_PUBLIC_ID_LENGTH]

    def start(self, plaintext: str) -> str:
        """The display prefix stored for UIs: head plus the first characters of the public id."""
        return plaintext[: len(self.head) + START_LENGTH]
