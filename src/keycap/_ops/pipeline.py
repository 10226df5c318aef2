"""Validation as a pipeline of named stages.

``APIKeyClient.validate_key`` parses the call (the key's format, the
requirement, the cost) and hands it to :meth:`Pipeline.validate`, which runs,
in order:

1. **cached** (:meth:`Pipeline.cached`): with the auth cache on, an untracked
   call without a cost is served from memory: the secret checked, the grant
   rule re-run against now. No I/O.
2. **leased** (:meth:`Pipeline.leased`): with ``APIKeyClient(leases=...)``, a
   call with a cost, or for a key known to be rate-limited, is admitted from
   this process's slice of such calls (``keycap._ops.leases``): the secret's
   fingerprint, the key's expiry and the client's address checked in memory,
   a new slice taken in one transaction when it is spent or ``refresh`` old.
   No slice to be had (near a limit, or refused): it goes on.
3. **metered** (:meth:`Pipeline.metered`): a call with a cost, or for a key
   known to be rate-limited: the key, every rate limit, the usage cap and
   every budget decided and consumed together in the database
   (``keycap._ops.validation``: one statement on PostgreSQL, one compound
   statement on MariaDB, one transaction elsewhere); on MariaDB every tracked
   call too. A refusal by a rate limit or a budget is its typed error.
4. **one statement** (:meth:`Pipeline.one_statement`): a tracked call for a
   key no rate limit is known to apply to, on PostgreSQL and SQLite: one
   ``UPDATE … RETURNING`` decides and counts.
5. **explain** (:meth:`Pipeline.explain`): the key's row is read (from the
   read replica for an untracked call, if there is one) and the secret and
   the policy say why the database refused it, or admit an untracked call (and
   on MySQL/MariaDB a tracked one, recorded under the rule re-checked in SQL).
   A key the database refused but the policy now admits changed in between:
   the pipeline goes round again, at most :data:`ATTEMPTS` times.

Every stage that admits the key also moves its digest to the newest signing
secret if it is older (:meth:`Pipeline.upgrade_pepper`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keycap._db import keys, rows
from keycap._db.engine import Database
from keycap._errors import (
    DatabaseError,
    DatabaseUnavailableError,
    InvalidKeyError,
    KeyRejectedError,
    RolledKeyError,
)
from keycap._models import APIKey
from keycap._ops import results, validation
from keycap._ops.authcache import AuthCache
from keycap._ops.leases import Leases, Slot
from keycap._rules import ips, policy
from keycap._rules.hashing import PepperRing

log = logging.getLogger("keycap")

#: How many times a validation goes round when the key changes between its statements.
ATTEMPTS = 4
#: How many keys are remembered as rate-limited (:meth:`Pipeline.note_rate_limited`).
HINTS = 10_000


@dataclass(frozen=True, slots=True)
class Call:
    """One validation as the stages see it: the presented key (kept out of
    ``repr``, as its digests are) and what is asked of it."""

    plaintext: str = field(repr=False)
    key_id: str
    digests: Mapping[str, str] = field(repr=False)
    req: policy.Requirement
    #: Micro-units per meter; None: no cost.
    amounts: Mapping[str, int] | None
    track: bool
    now: datetime
    #: The client's address (``req.ip_version`` is its version); None: not given.
    client: ips.Address | None = None


class Pipeline:
    """The stages of a validation, and what they share: the databases, the signing
    secrets, the auth cache and which keys are known to be rate-limited."""

    def __init__(
        self,
        db: Database,
        replica: Database | None,
        ring: PepperRing,
        cache: AuthCache | None,
        on_alert: results.AlertHandler | None,
        leases: Leases | None = None,
    ) -> None:
        self.db = db
        self.replica = replica
        self.ring = ring
        self.cache = cache
        self.on_alert = on_alert
        self.leases = leases if leases is not None and leases.validations else None
        self._rate_limited: dict[str, None] = {}  # insertion-ordered: oldest first

    async def validate(
        self,
        plaintext: str,
        key_id: str,
        req: policy.Requirement,
        amounts: Mapping[str, int] | None,
        track: bool,
        now: datetime,
        client: ips.Address | None = None,
    ) -> APIKey:
        """The stages in order (see the module's docstring); the key as admitted, or
        the error that refused it."""
        cacheable = self.cache is not None and amounts is None and not track
        if cacheable and (hit := self.cached(key_id, plaintext, req, now, client)) is not None:
            return hit
        slot = None
        leases = self.leases
        if leases is not None and (amounts is not None or key_id in self._rate_limited):
            slot = leases.slot(plaintext, key_id, req, amounts, track)
            if (key := await self.leased(slot, plaintext, now, client)) is not None:
                return key
        key = await self.decide(plaintext, key_id, req, amounts, track, now, client, cacheable)
        if slot is not None and leases is not None:
            leases.observe(slot, key)
        return key

    async def leased(
        self, slot: Slot, plaintext: str, now: datetime, client: ips.Address | None
    ) -> APIKey | None:
        """Stage 2: a metered or rate-limited validation admitted from this process's
        slice (``keycap._ops.leases``); None sends it on, to be decided exactly."""
        assert self.leases is not None
        if (key := self.leases.spend(slot, now, client)) is not None:
            return key
        key = await self.leases.validate(
            slot,
            lambda: self.digests(plaintext),
            lambda pepper_id: self.upgrade_pepper(slot[0], pepper_id, plaintext),
            now,
            client,
        )
        if key is not None:
            self.note_rate_limited(key.id, key.rate_limit is not None)
        return key

    async def digests(self, plaintext: str) -> dict[str, str]:
        """The presented key's digest under each signing secret (off the event loop
        when the hasher is costly)."""
        if self.ring.cheap(plaintext):
            return self.ring.digests(plaintext)
        return await asyncio.to_thread(self.ring.digests, plaintext)

    async def decide(
        self,
        plaintext: str,
        key_id: str,
        req: policy.Requirement,
        amounts: Mapping[str, int] | None,
        track: bool,
        now: datetime,
        client: ips.Address | None,
        cacheable: bool,
    ) -> APIKey:
        """The stages after the cache and the lease: the call decided in the database."""
        generation = self.cache.generation if self.cache is not None else 0
        digests = await self.digests(plaintext)
        call = Call(plaintext, key_id, digests, req, amounts, track, now, client)
        # A call with a cost, or for a key known to be rate-limited, goes straight to
        # the metered stage, which re-decides the whole grant rule in SQL; the
        # explain stage only runs to say why it refused.
        metered = amounts is not None or key_id in self._rate_limited
        for _ in range(ATTEMPTS):
            key: APIKey | None = None
            if metered:
                key = await self.metered(call)
            elif track and self.db.update_returning:
                key = await self.one_statement(call)
            elif track and self.db.one_block:
                key = await self.metered(call)  # MariaDB: one compound statement
            if key is not None:
                return key
            explained = await self.explain(call, metered, cacheable, generation)
            if isinstance(explained, APIKey):
                return explained
            metered = explained
        raise DatabaseError("the key kept changing during validation; try again")

    def cached(
        self,
        key_id: str,
        plaintext: str,
        req: policy.Requirement,
        now: datetime,
        client: ips.Address | None,
    ) -> APIKey | None:
        """Stage 1: a validation served by the auth cache; None sends it on."""
        assert self.cache is not None
        row = self.cache.get(key_id, req, now)
        if row is None or not self.ring.verify(plaintext, row.pepper_id, row.digest):
            return None
        policy.check(rows.to_facts(row, True), req, now, client)
        return rows.to_key(row)

    async def metered(self, call: Call) -> APIKey | None:
        """Stage 2: everything decided and consumed in the database; None when the
        key itself was refused (the explain stage says why)."""
        outcome = await validation.validate(
            self.db,
            key_id=call.key_id,
            digests=call.digests,
            req=call.req,
            amounts=call.amounts or {},
            track=call.track,
            now=call.now,
            on_alert=self.on_alert,
            client=call.client,
        )
        if outcome is None:
            return None
        key_row, rate, charged = outcome
        self.note_rate_limited(call.key_id, rate is not None)
        await self.upgrade_pepper(call.key_id, key_row.pepper_id, call.plaintext)
        return rows.to_key(key_row, rate_limit=rate, charge=charged)

    async def one_statement(self, call: Call) -> APIKey | None:
        """Stage 3: decide and count in one ``UPDATE … RETURNING``; None when the rule
        did not hold (nothing written)."""
        row = await keys.record_use_returning(
            self.db.rows,
            self.db.dialect,
            call.key_id,
            call.digests,
            call.req,
            call.now,
            call.client,
        )
        if row is None:
            return None
        await self.upgrade_pepper(call.key_id, row.pepper_id, call.plaintext)
        return rows.to_key(row)

    async def explain(
        self, call: Call, metered: bool, cacheable: bool, generation: int
    ) -> APIKey | bool:
        """Stage 4: read the key; raise why it is refused, or admit it. Otherwise
        whether the next round is metered (the key changed in between). An
        untracked call the metered stage did not see may read the replica."""
        key_id, req, now, plaintext = call.key_id, call.req, call.now, call.plaintext
        if not metered and not call.track and self.replica is not None:
            looked = await self._replica_lookup(call)
        else:
            looked = await keys.lookup_for_validation(self.db.read_rows, key_id, req)
        if looked is None:
            raise InvalidKeyError()
        digest_ok = self.secret_matches(plaintext, looked, now)
        if not digest_ok and (rolled := self.rolled(plaintext, looked, key_id)) is not None:
            raise rolled
        policy.check(rows.to_facts(looked, digest_ok), req, now, call.client)
        self.note_rate_limited(key_id, bool(looked.has_rate_limits))
        if (exhausted := results.usage_cap_error(looked)) is not None:
            raise exhausted
        if call.amounts is not None or looked.has_rate_limits:
            # Rate-limited after all, or the metered stage refused a key the policy
            # now passes (it changed in between): decide (again) there.
            return True
        if not call.track and looked.max_uses is None:  # a capped key is always counted
            await self.upgrade_pepper(key_id, looked.pepper_id, plaintext)
            current = not self.ring.needs_upgrade(looked.pepper_id)
            if cacheable and self.cache is not None and current:
                self.cache.put(key_id, req, looked, now, generation)
            return rows.to_key(looked)
        if self.db.update_returning:
            if (key := await self.one_statement(call)) is not None:
                return key
        elif await keys.record_use(
            self.db.written, self.db.dialect, key_id, call.digests, req, now, call.client
        ):
            # MySQL/MariaDB: recorded under the rule re-checked in SQL.
            await self.upgrade_pepper(key_id, looked.pepper_id, plaintext)
            return rows.to_key(looked, use_count=looked.use_count + 1, last_used_at=now)
        return False  # the key changed between our statements: decide again

    async def _replica_lookup(self, call: Call) -> Any:
        """The key's row from the read replica if it would be accepted on the read
        path as it stands there; else (refused, absent, rate-limited, capped, or
        the replica unreachable) from the primary, which decides."""
        assert self.replica is not None
        try:
            row = await keys.lookup_for_validation(self.replica.read_rows, call.key_id, call.req)
        except DatabaseUnavailableError as error:
            log.warning("keycap: read replica unavailable, using the primary: %s", error)
            row = None
        if row is not None and not row.has_rate_limits and row.max_uses is None:
            digest_ok = self.secret_matches(call.plaintext, row, call.now)
            with contextlib.suppress(KeyRejectedError):
                policy.check(rows.to_facts(row, digest_ok), call.req, call.now, call.client)
                return row
        return await keys.lookup_for_validation(self.db.read_rows, call.key_id, call.req)

    def note_rate_limited(self, key_id: str, limited: bool) -> None:
        """Remember which keys a rate limit applies to, so their validations skip the
        one-statement stage that cannot admit them. Only a hint: a stale entry
        costs one statement either way, never a wrong decision."""
        if not limited:
            self._rate_limited.pop(key_id, None)
            return
        self._rate_limited[key_id] = None
        if len(self._rate_limited) > HINTS:
            del self._rate_limited[next(iter(self._rate_limited))]

    async def upgrade_pepper(self, key_id: str, pepper_id: str, plaintext: str) -> None:
        """Move the key's digest to the newest signing secret, if it is older."""
        if self.ring.needs_upgrade(pepper_id) and self.ring.knows(pepper_id):
            # Conditional on the digest this plaintext has under the old pepper: a
            # rolled key's previous secret never replaces the current one.
            await self.db.run(
                keys.upgrade_digest,
                key_id,
                pepper_id,
                self.ring.digest(plaintext, pepper_id),
                self.ring.current_id,
                self.ring.digest(plaintext),
            )

    def secret_matches(self, plaintext: str, row: Any, now: datetime) -> bool:
        """The key's current secret, or (rolled) its previous one within its grace."""
        if self.ring.verify(plaintext, row.pepper_id, row.digest):
            return True
        until = row.previous_until
        return bool(
            until is not None
            and until > now
            and self.ring.verify(plaintext, row.previous_pepper_id, row.previous_digest)
        )

    def rolled(self, plaintext: str, row: Any, key_id: str) -> RolledKeyError | None:
        """The error for a secret the key was rolled away from, past its grace."""
        if row.previous_until is None or row.previous_digest is None:
            return None
        if not self.ring.verify(plaintext, row.previous_pepper_id, row.previous_digest):
            return None
        return RolledKeyError(row.previous_until, key_id=key_id)
