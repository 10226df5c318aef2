"""The optional in-process authentication cache (``APIKeyClient(auth_cache_ttl=...)``).

It remembers, for a short TTL, the key rows of successful read-path validations
(no usage tracking, no cost, no rate limit, no use cap), so a repeated
validation of the same key for the same requirement needs no database round
trip. The presented secret is still verified against the cached digest, and
the grant rule still re-runs against the current time, on every hit.

Staleness: a change made through this client (revoke, disable, update, delete,
limits, product links) clears the cache at once. A change made by another
process is seen after at most ``ttl`` seconds. Refusals are never cached.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from keycap._rules.policy import Requirement

__all__ = ["AuthCache"]

MAX_ENTRIES = 10_000


class AuthCache:
    def __init__(self, ttl: timedelta, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[tuple[str, Requirement], tuple[datetime, Any]] = {}
        #: Bumped by every clear; a put from a read that began before it is dropped.
        self.generation = 0

    def get(self, key_id: str, req: Requirement, now: datetime) -> Any | None:
        found = self._entries.get((key_id, req))
        if found is None:
            return None
        until, row = found
        if now >= until:
            del self._entries[(key_id, req)]
            return None
        return row

    def put(self, key_id: str, req: Requirement, row: Any, now: datetime, generation: int) -> None:
        """Remember ``row`` unless the cache was cleared since ``generation`` was read."""
        if generation != self.generation:
            return
        self._entries.pop((key_id, req), None)
        self._entries[(key_id, req)] = (now + self.ttl, row)
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]  # the oldest

    def clear(self) -> None:
        self._entries.clear()
        self.generation += 1

    def __len__(self) -> int:
        return len(self._entries)
