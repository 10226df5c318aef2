"""Returning a hold to its budgets: release, and expiry (``sweep``).

Below the refusal diagnosis, which sweeps expired holds before it refuses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from functools import partial
from types import SimpleNamespace
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db import blocks, budgets, holds, ledger, metering, operations
from keycap._db.build import AnyRow
from keycap._db.engine import Conflict, Database
from keycap._errors import HoldClosedError, NotFoundError
from keycap._models import BudgetStatus, Hold
from keycap._ops.results import budget_status, by_remaining
from keycap._ops.units import (
    Decode,
    HoldRefused,
    Idempotency,
    Refused,
    claim,
    claim_params,
    prior_replay,
    retrying,
    stored_replay,
    together,
)
from keycap._rules import movements
from keycap._rules.money import from_micros

T = TypeVar("T")


def hold_model(row: Any, statuses: Sequence[BudgetStatus] = (), replayed: bool = False) -> Hold:
    return Hold.model_construct(
        id=row.id,
        key_id=row.key_id,
        meter=row.meter,
        amount=from_micros(row.amount_micros),
        status=row.status,
        created_at=row.created_at,
        expires_at=row.expires_at,
        closed_at=row.closed_at,
        budgets=by_remaining(statuses),
        replayed=replayed,
        identity_id=row.identity_id,
    )


def origin_of(hold: Any, now: datetime, idempotency_key: str | None) -> movements.Origin:
    """What the ledger entries of a hold's settlement or release share."""
    return movements.Origin(
        now=now,
        org_id=hold.org_id,
        key_id=hold.key_id,
        project_id=hold.project_id,
        hold_id=hold.id,
        idempotency_key=idempotency_key,
    )


async def open_hold(
    db: Database, hold_id: str, idem: Idempotency, decode: Decode
) -> tuple[AnyRow | None, Any]:
    """``(hold, None)`` for an open hold to settle or release; ``(None, result)`` when
    this same call (its idempotency key) closed it already, maybe concurrently:
    its stored result stands. Only a closed hold can have one.

    Raises:
        NotFoundError: no such hold.
        HoldClosedError: another call closed it.
        IdempotencyConflictError: this key closed it with other parameters.
    """
    row = await db.read(holds.get_hold, hold_id)
    if row is None:
        raise NotFoundError("hold", hold_id)
    if row.status == "open":
        return row, None
    if (replay := await stored_replay(db, decode, idem)) is not None:
        return None, replay
    raise HoldClosedError(hold_id, row.status)


#: How a hold is closed in one round trip: ``(hold_id, status, now, actual=None,
#: claim=None)`` -> the hold's row and its budgets' rows after; or, with ``claim``
#: (``keycap._db.operations.claim_params``: idempotent), what the earlier call
#: of its idempotency key stored; or None (not closed).
Closer = Callable[..., Awaitable[tuple[Any, list[Any]] | operations.Prior | None]]


def closer(db: Database) -> Closer:
    """Closing a hold: one statement on PostgreSQL (``keycap._db.metering``), one
    compound statement on MariaDB (``keycap._db.blocks``), with or without an
    idempotency key (:func:`closes_idempotently`); a transaction elsewhere
    (:func:`close_in_transaction`, without one: on SQLite in one call into its
    thread)."""
    if db.one_statement:
        return partial(metering.close_hold, db.statement)
    if db.one_block:
        return partial(blocks.close_hold, db.block, db.engine.dialect)
    return partial(close_in_transaction, db)


async def at_once(db: Database, close: Callable[[], Awaitable[T]]) -> T | None:
    """A hold's closing in one round trip (``close``, using :func:`closer`); None
    when it did not close it, and when a duplicate of the same idempotency key
    claimed it first: the transaction then says what happened (its replay)."""
    try:
        return await retrying(db, close)
    except Conflict:
        return None


def closes_idempotently(db: Database) -> bool:
    """Whether :func:`closer` takes an idempotent call (a ``claim``)."""
    return db.one_statement or db.one_block


async def close_in_transaction(
    db: Database,
    hold_id: str,
    status: str,
    now: datetime,
    actual: int | None = None,
    claim: Mapping[str, Any] | None = None,
) -> tuple[Any, list[AnyRow]] | None:
    """:data:`Closer` as one transaction: the hold released (``status``
    ``released`` or ``expired``), or settled for ``actual`` within its amount;
    the hold's row after and its budgets' rows after, or None when it did not
    close it (not open, or ``actual`` beyond the hold: a settlement's transaction
    then decides). Never idempotent (``claim`` None: :func:`closes_idempotently`)."""
    assert claim is None, "an idempotent closing runs as the settle or release transaction"
    async with db.begin() as conn:
        hold = await holds.get_hold(conn, hold_id)
        if hold is None or (actual is not None and actual > hold.amount_micros):
            return None
        values = {} if actual is None else {"settled_micros": actual}
        if hold.status != "open" or not await holds.close_hold(
            conn, hold_id, status, now, **values
        ):
            return None
        afters = await return_hold(conn, hold, now, used=actual or 0)
        origin = origin_of(hold, now, None)
        if actual is None:
            amount = hold.amount_micros
            entries = movements.releases(origin, afters, amount, expired=status != "released")
        else:
            split = movements.split_settlement(hold.amount_micros, actual, None)
            entries = movements.settlement(origin, hold.meter, split, afters, [])
        await ledger.insert_ledger(conn, entries)
        closed = {**hold._mapping, "status": status, "closed_at": now, **values}
        return SimpleNamespace(**closed), afters


async def return_hold(
    conn: AsyncConnection, hold: Any, now: datetime, *, used: int
) -> list[AnyRow]:
    """Take the hold off every budget it reserved on (that still exists), charging
    ``used`` of it; the rows after, in id order. Never refused: the money was held."""
    afters = []
    for row in await budgets.budgets_by_id(conn, hold.budget_ids.split()):
        after = await budgets.debit(
            conn, row, used=used, held=-hold.amount_micros, now=now, key_id=None, must_fit=False
        )
        assert after is not None
        afters.append(after)
    return afters


async def run_hold(
    db: Database,
    unit: Callable[[], Awaitable[Any]],
    hold_id: str,
    idem: Idempotency,
    decode: Decode,
) -> Any:
    """Run a settle or release unit. A concurrent duplicate that got there first
    (its claim won, or it closed the hold) means its result is the answer."""
    try:
        return await retrying(db, unit)
    except Conflict:
        if (replay := await stored_replay(db, decode, idem)) is None:
            raise
        return replay, ()
    except Refused:
        if (replay := await stored_replay(db, decode, idem)) is not None:
            return replay, ()
        row = await db.read(holds.get_hold, hold_id)
        raise HoldClosedError(hold_id, row.status if row is not None else "gone") from None


async def release(
    db: Database,
    *,
    hold_id: str,
    idempotency_key: str | None,
    now: datetime,
    status: str = "released",
) -> Hold:
    """Return a hold to its budgets (``status="expired"``: the same, by expiry)."""
    idem = Idempotency.of("release", hold_id, idempotency_key)
    if idempotency_key is None or closes_idempotently(db):
        close = closer(db)

        async def closing() -> Hold | None:
            claim = claim_params(idem, lambda: {"at": now})
            closed = await close(hold_id, status, now, claim=claim)
            if isinstance(closed, operations.Prior):
                return prior_replay(closed, idem, replayed)  # type: ignore[no-any-return]
            if closed is None:
                return None  # not open: the transaction below says why
            hold, afters = closed
            return hold_model(hold, [budget_status(a, now) for a in afters])

        if (done := await at_once(db, closing)) is not None:
            return done

    async def in_transaction() -> tuple[Hold, tuple[()]]:
        hold, replay = await open_hold(db, hold_id, idem, replayed)
        if hold is None:
            return replay, ()

        async def unit() -> tuple[Hold, tuple[()]]:
            async with db.begin() as conn:
                op_id = await claim(conn, hold.org_id, idem, now)
                if not await holds.close_hold(conn, hold_id, status, now):
                    raise HoldRefused()
                afters = await return_hold(conn, hold, now, used=0)
                entries = movements.releases(
                    origin_of(hold, now, idempotency_key),
                    afters,
                    hold.amount_micros,
                    expired=status != "released",
                )
                await ledger.insert_ledger(conn, entries)
                closed = SimpleNamespace(**{**hold._mapping, "status": status, "closed_at": now})
                result = hold_model(closed, [budget_status(a, now) for a in afters])
                if op_id is not None:
                    await operations.store_result(conn, op_id, result.model_dump(mode="json"))
                return result, ()

        return await run_hold(db, unit, hold_id, idem, replayed)  # type: ignore[no-any-return]

    result, _ = await together(db, in_transaction)  # on SQLite, one call into its thread
    return result


def replayed(result: dict[str, Any]) -> Hold:
    """A release's stored result, replayed: as a transaction stored it, or rebuilt
    from what its statement stored (``keycap._db.operations``)."""
    if (afters := operations.rows_after(result)) is None:
        return Hold.model_validate(result)
    at = operations.head_time(result, "at")
    statuses = [budget_status(a, at) for a in afters]
    return hold_model(operations.hold_after(result), statuses, replayed=True)


async def sweep(db: Database, now: datetime, *, budget_id: str | None = None) -> int:
    """Expire open holds past their ttl, returning their amounts (or, for a hold
    made to be charged at its expiry, a lease's slice: charging it in full).
    Returns how many."""
    count = 0
    for expired in await db.read(holds.expired_holds, now, budget_id=budget_id):
        try:
            if expired.on_expiry == CHARGE_IN_FULL:
                count += await charge_in_full(db, expired.id, now)
                continue
            await release(db, hold_id=expired.id, idempotency_key=None, now=now, status="expired")
            count += 1
        except HoldClosedError:
            pass  # settled, released or expired by someone else meanwhile
    return count


#: ``on_expiry`` of a hold its expiry charges in full (a lease's slice).
CHARGE_IN_FULL = "charge"


async def charge_in_full(db: Database, hold_id: str, now: datetime) -> bool:
    """Expire an open hold by charging all of it (status ``expired``, ledger kind
    ``settle``: what tells it from a release, kind ``expiry``). False if it was
    no longer open."""
    hold = await db.read(holds.get_hold, hold_id)
    if hold is None or hold.status != "open":
        return False
    close, amount = closer(db), hold.amount_micros
    closed = await retrying(db, lambda: close(hold_id, "expired", now, amount))
    return closed is not None
