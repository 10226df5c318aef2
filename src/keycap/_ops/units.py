"""What every unit of work shares: the retry of a transient conflict, the refusal
signal, idempotency (replay a stored result, claim a key), and the key's lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db import blocks, inthread, keys, metering, operations, tenancy
from keycap._db.build import AnyRow, KeyRef
from keycap._db.engine import Conflict, Database, is_transient
from keycap._errors import DatabaseError, DatabaseUnavailableError, IdempotencyConflictError
from keycap._rules import ids

T = TypeVar("T")
ATTEMPTS = 8


async def retrying(db: Database, unit: Callable[[], Awaitable[T]]) -> T:
    """Run ``unit`` (one whole transaction, guarded: ``Database.guarded``) again after
    a transient conflict (deadlock, serialization failure, busy SQLite), a bounded
    number of times."""
    if inthread.active():
        return await unit()  # inside a unit in SQLite's thread: the outer call retries
    deadline = time.monotonic() + db.call_timeout  # all attempts together
    for attempt in range(ATTEMPTS):
        try:
            return await db.guarded(unit, max(0.001, deadline - time.monotonic()))
        except DatabaseError as error:
            if attempt == ATTEMPTS - 1 or not is_transient(error):
                raise
            if time.monotonic() >= deadline:
                raise DatabaseUnavailableError(
                    f"database unavailable: still busy after {db.call_timeout:g}s"
                ) from error
            await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))  # noqa: S311 - jitter
    raise AssertionError("unreachable")


async def together(db: Database, work: Callable[[], Awaitable[T]]) -> T:
    """``work`` (units of work and reads: a call and the explanation of its
    refusal) in one call into SQLite's thread, where it can run there
    (``keycap._db.inthread``), tried again as a whole after a transient
    conflict; elsewhere as it is (its units retry on their own)."""
    if db.in_thread:
        return await retrying(db, work)
    return await work()


class Refused(Exception):
    # An internal signal, never escapes this package.
    """Raised inside a transaction to roll it back: one of the typed refusals
    below. Says for which key, and which row refused when that is known (a row a
    one-statement call locked: a row, or a ``keycap._db.metering.TableRow``),
    else it is found after the rollback (``keycap._ops.refusals``)."""

    def __init__(self, row: Any = None, key: KeyRef | None = None) -> None:
        self.row = row
        self.key = key


class KeyRefused(Refused):
    """The key (or keyless identity) is not live, or not granted the call."""


class RateRefused(Refused):
    """A rate limit does not admit the call."""


class BudgetRefused(Refused):
    """A budget has no room for the call."""


class HoldRefused(Refused):
    """The hold is no longer open."""


@dataclass(frozen=True, slots=True)
class Idempotency:
    """One call's idempotency: its kind, the key or hold it is scoped to, the
    caller's key (None: not idempotent), and a fingerprint of its parameters."""

    kind: str
    scope: str
    key: str | None
    request_hash: str

    @classmethod
    def of(cls, kind: str, scope: str, key: str | None, **request: Any) -> Idempotency:
        """``request`` is every parameter that decides what the call does: the same
        key sent with other parameters is a conflict, never a replay (as Stripe's).
        Without a key nothing is compared, and nothing is hashed."""
        if key is None:
            return cls(kind, scope, None, "")
        canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
        return cls(kind, scope, key, hashlib.sha256(canonical.encode()).hexdigest())


#: How a call's stored result is read back: its result, marked ``replayed``.
Decode = Callable[[dict[str, Any]], Any]


async def stored_replay(db: Database, decode: Decode, idem: Idempotency) -> Any | None:
    """The stored result of an earlier call with this idempotency key, marked
    replayed; None if there is none (yet).

    Raises:
        IdempotencyConflictError: the earlier call had other parameters.
    """
    if idem.key is None:
        return None
    stored = await db.read(
        operations.stored_result, scope=idem.scope, kind=idem.kind, idempotency_key=idem.key
    )
    if stored is None:
        return None
    return replay_of(stored.result, stored.request_hash, idem, decode)


def replay_of(
    result: dict[str, Any] | None, request_hash: str | None, idem: Idempotency, decode: Decode
) -> Any | None:
    """An earlier call's stored result and parameters' hash, replayed (None: it
    stored no result).

    Raises:
        IdempotencyConflictError: the earlier call had other parameters.
    """
    if result is None:
        return None
    if request_hash is not None and request_hash != idem.request_hash:
        raise IdempotencyConflictError(idem.key or "", idem.kind)
    return decode({**result, "replayed": True})


def claim_params(idem: Idempotency, head: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """The binds that make a one-statement call idempotent
    (``keycap._db.operations.claim_params``, its result rebuilt from what
    ``head`` returns); None without a key, and ``head`` is not called."""
    if idem.key is None:
        return None
    return operations.claim_params(idem.kind, idem.key, idem.request_hash, head())


async def spent_at_once(
    db: Database,
    key_id: str,
    statement: Callable[[], Any],
    block: Callable[[Any], blocks.Block],
    params: dict[str, Any],
) -> Sequence[Any] | operations.Prior:
    """A charge or a reserve in one round trip: its ``statement`` on PostgreSQL
    (``keycap._db.metering``), its ``block`` for the dialect on MariaDB
    (``keycap._db.blocks``). The budgets' rows after it; what an earlier call of
    its idempotency key stored (nothing was done); or ``Refused``."""
    if db.one_statement:
        rows = await metering.run(db.statement, statement(), params)
        found = metering.found(rows)
        return spent(rows, key_id) if found is None else found
    done = await blocks.spend(db.block, block(db.engine.dialect), params)
    return block_spent(done) if done.prior is None else done.prior


def prior_replay(found: operations.Prior, idem: Idempotency, decode: Decode) -> Any:
    """The earlier call an idempotent one-statement call found instead of running,
    replayed.

    Raises:
        IdempotencyConflictError: the earlier call had other parameters.
        Conflict: the earlier call stored no result (replayed once it has).
    """
    if (replay := replay_of(found.result, found.request_hash, idem, decode)) is None:
        raise Conflict(f"the {idem.kind} of idempotency key {idem.key!r} has no result yet")
    return replay


async def claim(conn: AsyncConnection, org_id: str, idem: Idempotency, now: datetime) -> str | None:
    """Insert the call's operation row first thing in its transaction (a duplicate
    waits on the unique index, then fails with Conflict: see the callers)."""
    if idem.key is None:
        return None
    return await operations.claim_operation(
        conn,
        org_id=org_id,
        scope=idem.scope,
        kind=idem.kind,
        idempotency_key=idem.key,
        request_hash=idem.request_hash,
        now=now,
    )


async def live_key(conn: AsyncConnection, key_id: str, now: datetime) -> KeyRef:
    """The key's (or a keyless identity's) row lock, if live; else ``Refused``."""
    if ids.is_valid(ids.IDENTITY, key_id):
        key = await tenancy.lock_live_identity(conn, key_id)
    else:
        key = await keys.lock_live_key(conn, key_id, now)
    if key is None:
        raise KeyRefused()
    return key


def spent(rows: Sequence[AnyRow], key_id: str) -> list[AnyRow]:
    """The budgets a one-statement charge or reserve debited (``keycap._db.metering.run``),
    their rows after it; or the refusal, as ``Refused``: of the key (not live), or
    of the budget the statement found without room."""
    first = rows[0]
    if not first.ok:
        if first.key_org_id is None:
            raise KeyRefused()
        key = KeyRef.of(key_id, first, "key_")
        raise BudgetRefused(row=metering.refused_budget(rows), key=key)
    return [row for row in rows if row.id is not None]


def block_spent(done: blocks.Outcome) -> Sequence[Any]:
    """:func:`spent` for a MariaDB block's outcome (``keycap._db.blocks``): the
    budgets' rows after it, or its refusal (of the key, or of a budget) as
    ``Refused``."""
    if done.step == blocks.KEY_REFUSED:
        raise KeyRefused()
    if done.step != blocks.DONE:
        raise BudgetRefused(row=done.refused_budget, key=done.ref)
    return done.budgets
