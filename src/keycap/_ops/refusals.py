"""After a refused transaction rolled back: which key state, budget or rate
limit refused, as the typed error; or None when there is room after all, and
the caller tries again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

from keycap._db import budgets, keys, rate_limits, rows, tenancy
from keycap._db.build import KeyRef
from keycap._db.engine import Conflict, Database
from keycap._db.schema import identities
from keycap._errors import (
    DatabaseError,
    DisabledKeyError,
    KeycapError,
    NotFoundError,
    RateLimitedError,
)
from keycap._ops.release import sweep
from keycap._ops.results import budget_exceeded, epoch_ms, rate_limited_error
from keycap._ops.units import (
    Decode,
    Idempotency,
    KeyRefused,
    RateRefused,
    Refused,
    retrying,
    stored_replay,
    together,
)
from keycap._rules import budgets as budget_rules
from keycap._rules import ids, policy
from keycap._rules import rate_limits as ratelimit
from keycap._rules.policy import Requirement


async def refusal(
    db: Database, key: KeyRef, amounts: Mapping[str, int], now: datetime, key_id: str | None
) -> Exception | None:
    """The error naming the budget that refused a debit of ``amounts`` (the first in
    id order without room), or None if there is room after all: expired holds were
    freed, or a release or rollover happened meanwhile (the caller tries again)."""
    applicable = await db.read(budgets.applicable_budgets, key, list(amounts))
    for row in applicable:
        requested = amounts[row.meter]
        if budget_rules.state_at(row, now).remaining >= requested:
            continue
        if await sweep(db, now, budget_id=row.id):
            return None
        fresh = await db.read(budgets.get_budget, row.id)
        row = fresh if fresh is not None else row
        if budget_rules.state_at(row, now).remaining >= requested:
            return None
        return budget_exceeded(row, requested, now, key_id)
    return None


async def locked_refusal(
    db: Database, row: Any, amounts: Mapping[str, int], now: datetime, key_id: str | None
) -> Exception | None:
    """The error naming ``row``, the budget a one-statement call found without room
    (as it was under the statement's lock: exact at that instant, so no second
    read is needed); or None when it had expired holds, now freed, and the caller
    tries again. The statement says whether it had any (``expired_holds``): if
    not, the refusal costs no round trip."""
    if row.expired_holds and await sweep(db, now, budget_id=row.id):
        return None
    return budget_exceeded(row, amounts[row.meter], now, key_id)


async def budget_refusal(
    db: Database, refused: Refused, amounts: Mapping[str, int], now: datetime, key_id: str | None
) -> Exception | None:
    """The error naming the budget that refused: the row a one-statement call locked
    (:func:`locked_refusal`), else found after the rollback (:func:`refusal`)."""
    if refused.row is not None:
        return await locked_refusal(db, refused.row, amounts, now, key_id)
    assert refused.key is not None
    return await refusal(db, refused.key, amounts, now, key_id)


async def key_refusal(db: Database, key_id: str, now: datetime) -> Exception | None:
    """Why a key (or a keyless identity) could not be charged: not found, or the
    state the policy names. None: it is live after all (enabled meanwhile), so
    the caller tries again."""
    if ids.is_valid(ids.IDENTITY, key_id):
        return await _identity_refusal(db, key_id)
    row = await db.read(keys.get_key_state, key_id)
    if row is None:
        return NotFoundError("key", key_id)
    # A charge by key id has no client address: IP ranges restrict validations only.
    facts = policy.without_addresses(rows.to_facts(row, digest_ok=True))
    try:
        policy.check(facts, Requirement(), now)
    except KeycapError as error:
        return error
    return None


async def _identity_refusal(db: Database, identity_id: str) -> Exception | None:
    found = await db.read(tenancy.get_by_id, identities, identity_id)
    if found is None:
        return NotFoundError("identity", identity_id)
    if found.disabled_at is not None:
        return DisabledKeyError(found.disabled_at, identity=True)
    return None


async def rate_refusal(
    db: Database, key: KeyRef, amounts: Mapping[str, int], now: datetime, key_id: str
) -> RateLimitedError | None:
    """The error naming the rate limit that refused (the first in id order that does
    not admit the call now), or None if all admit it now (the caller tries again)."""
    for current in await rate_limits.read_applicable(db.read_rows, key):
        if (error := locked_rate_refusal(current, amounts, now, key_id)) is not None:
            return error
    return None


def locked_rate_refusal(
    current: Any, amounts: Mapping[str, int], now: datetime, key_id: str
) -> RateLimitedError | None:
    """The error naming the rate limit ``current`` if it does not admit the call now
    (a one-statement call's refusing row, as it locked it: no round trip)."""
    units = call_units(current, amounts)
    v = ratelimit.view(
        current.window_ms,
        epoch_ms(now),
        current.window_start,
        current.current_units,
        current.previous_units,
    )
    if units and not ratelimit.admits(current.limit_units, v, units):
        return rate_limited_error(current, units, v, now, key_id)
    return None


async def refused_error(
    db: Database, refused: Refused, amounts: Mapping[str, int], now: datetime, key_id: str
) -> Exception | None:
    """The error of a refused unit: the key's (or keyless identity's) state, the
    rate limit or the budget that refused; None when there is room after all
    (the caller tries again)."""
    if isinstance(refused, KeyRefused) or refused.key is None:
        return await key_refusal(db, key_id, now)
    if isinstance(refused, RateRefused) and refused.row is not None:
        return locked_rate_refusal(refused.row, amounts, now, key_id)
    if isinstance(refused, RateRefused):
        return await rate_refusal(db, refused.key, amounts, now, key_id)
    return await budget_refusal(db, refused, amounts, now, key_id)


#: How many times a call is tried again when its refusal turns out to have room
#: after all (a hold released, a period rolled over, meanwhile). Under heavy
#: reserve/release churn on one budget three was not enough; each try is one
#: statement on PostgreSQL.
REFUSED_ATTEMPTS = 8


async def run(
    db: Database,
    unit: Callable[[], Awaitable[Any]],
    *,
    key_id: str | None,
    amounts: Mapping[str, int],
    now: datetime,
    idem: Idempotency,
    decode: Decode,
    replay_first: bool = False,
) -> Any:
    """Run a unit, turning refusals into errors and a lost idempotency race into a
    replay. ``replay_first``: an idempotent call whose unit does not look for an
    earlier call's result itself (a transaction's): it is looked for first."""

    async def attempt() -> tuple[Any, Exception | None]:
        """The unit's result, or why it was refused (None and None: room after all,
        it goes again). On SQLite all of it is one call into its thread."""
        try:
            if replay_first and (replay := await stored_replay(db, decode, idem)) is not None:
                return (replay, ()), None
            return await retrying(db, unit), None
        except Conflict:
            # Lost the race to a duplicate with the same idempotency key: its result.
            if (replay := await stored_replay(db, decode, idem)) is None:
                raise
            return (replay, ()), None
        except Refused as refused:
            # A one-statement call decides on the key and budgets first: a duplicate
            # that committed while it waited for their locks can leave it without
            # room. The first committed call of an idempotency key is the answer.
            if (replay := await stored_replay(db, decode, idem)) is not None:
                return (replay, ()), None
            if isinstance(refused, KeyRefused) or refused.key is None:
                return None, await key_refusal(db, key_id or "", now)
            return None, await budget_refusal(db, refused, amounts, now, key_id)

    for _ in range(REFUSED_ATTEMPTS):
        done, error = await together(db, attempt)
        if error is not None:
            raise error
        if done is not None:
            return done
    raise DatabaseError("the key or its budgets kept changing during the operation; try again")


def call_units(row: Any, amounts: Mapping[str, int]) -> int:
    """What one call consumes of a rate limit (its row, or its status): one call,
    or the call's cost on its meter."""
    return 1 if row.meter is None else amounts.get(row.meter, 0)
