"""``reserve`` and ``settle``: hold before a call whose cost is known only
afterwards, then charge what it cost and return the rest.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db import blocks, budgets, holds, keys, ledger, metering, operations, tenancy
from keycap._db.build import AnyRow, KeyRef
from keycap._db.engine import Database
from keycap._errors import DatabaseError
from keycap._models import BudgetAlert, Hold, Settlement
from keycap._ops.refusals import run
from keycap._ops.release import (
    Closer,
    at_once,
    closer,
    closes_idempotently,
    hold_model,
    open_hold,
    origin_of,
    return_hold,
    run_hold,
)
from keycap._ops.results import AlertHandler, budget_status, by_remaining, crossed_alerts, deliver
from keycap._ops.units import (
    BudgetRefused,
    HoldRefused,
    Idempotency,
    claim,
    claim_params,
    live_key,
    prior_replay,
    spent_at_once,
    together,
)
from keycap._rules import budgets as budget_rules
from keycap._rules import ids, movements
from keycap._rules.money import from_micros


async def reserve(
    db: Database,
    *,
    key_id: str,
    meter: str,
    amount: int,
    ttl: timedelta,
    idempotency_key: str | None,
    now: datetime,
    on_expiry: str | None = None,
) -> Hold:
    """Hold ``amount`` on every budget of the meter (key, project, org), or none.
    ``on_expiry="charge"``: unsettled at its expiry, it is charged in full (a
    lease's slice) instead of released."""
    idem = Idempotency.of(
        "reserve",
        key_id,
        idempotency_key,
        meter=meter,
        amount=amount,
        ttl_us=ttl // timedelta(microseconds=1),
    )
    # A keyless identity's reserve is always a transaction, as its charge is.
    at_once = (db.one_statement or db.one_block) and not ids.is_valid(ids.IDENTITY, key_id)
    if at_once:
        unit = _reserve_at_once(db, key_id, meter, amount, idem, now, now + ttl, on_expiry)
    else:
        unit = _reserve_in_transaction(db, key_id, meter, amount, idem, now, ttl, on_expiry)
    result, _ = await run(
        db,
        unit,
        key_id=key_id,
        amounts={meter: amount},
        now=now,
        idem=idem,
        decode=replayed,
        replay_first=not at_once,
    )
    return result  # type: ignore[no-any-return]


def _reserve_at_once(
    db: Database,
    key_id: str,
    meter: str,
    amount: int,
    idem: Idempotency,
    now: datetime,
    expires_at: datetime,
    on_expiry: str | None,
) -> Callable[[], Awaitable[tuple[Hold, tuple[()]]]]:
    """The whole reserve in one round trip: one statement on PostgreSQL
    (``keycap._db.metering``), one compound statement on MariaDB
    (``keycap._db.blocks``); with an idempotency key, as a charge's."""
    idempotent = idem.key is not None

    async def unit() -> tuple[Hold, tuple[()]]:
        hold_id = ids.new_id("hold")
        params = metering.reserve_params(key_id, hold_id, meter, amount, now, expires_at, on_expiry)
        if claim := claim_params(
            idem,
            lambda: {
                "hold_id": hold_id,
                "key_id": key_id,
                "meter": meter,
                "amount": amount,
                "at": now,
                "expires_at": expires_at,
            },
        ):
            params.update(claim)
        held = await spent_at_once(
            db,
            key_id,
            lambda: metering.reserve_statement(idempotent),
            lambda dialect: blocks.reserve_block(dialect, idempotent),
            params,
        )
        if isinstance(held, operations.Prior):
            return prior_replay(held, idem, replayed), ()
        return _opened(hold_id, key_id, meter, amount, now, expires_at, held), ()

    return unit


def replayed(result: dict[str, Any]) -> Hold:
    """A reserve's stored result, replayed: as a transaction stored it, or rebuilt
    from what its statement stored (``keycap._db.operations``)."""
    if (held := operations.rows_after(result)) is None:
        return Hold.model_validate(result)
    head = result["head"]
    at, expires_at = (operations.head_time(result, name) for name in ("at", "expires_at"))
    opened = _opened(
        head["hold_id"], head["key_id"], head["meter"], head["amount"], at, expires_at, held
    )
    return opened.model_copy(update={"replayed": True})


def _opened(
    hold_id: str,
    key_id: str,
    meter: str,
    amount: int,
    now: datetime,
    expires_at: datetime,
    held: Sequence[Any],
) -> Hold:
    """The hold a one-statement or one-block reserve opened, on the budgets ``held``
    (their rows after). A keyless identity's reserve is never one of those."""
    hold = SimpleNamespace(
        id=hold_id,
        key_id=key_id,
        meter=meter,
        amount_micros=amount,
        status="open",
        created_at=now,
        expires_at=expires_at,
        closed_at=None,
        identity_id=None,
    )
    return hold_model(hold, [budget_status(r, now) for r in held])


def _reserve_in_transaction(
    db: Database,
    key_id: str,
    meter: str,
    amount: int,
    idem: Idempotency,
    now: datetime,
    ttl: timedelta,
    on_expiry: str | None,
) -> Callable[[], Awaitable[tuple[Hold, tuple[()]]]]:
    """The reserve as a transaction: lock the key, claim the idempotency key, hold
    on every budget, open the hold, write the ledger, store the result."""
    idempotency_key = idem.key

    async def unit() -> tuple[Hold, tuple[()]]:
        async with db.begin() as conn:
            key = await live_key(conn, key_id, now)
            op_id = await claim(conn, key.org_id, idem, now)
            result = await hold_in(conn, key, meter, amount, now, ttl, on_expiry, idempotency_key)
            if op_id is not None:
                await operations.store_result(conn, op_id, result.model_dump(mode="json"))
            return result, ()

    return unit


async def hold_in(
    conn: AsyncConnection,
    key: KeyRef,
    meter: str,
    amount: int,
    now: datetime,
    ttl: timedelta,
    on_expiry: str | None,
    idempotency_key: str | None = None,
) -> Hold:
    """Within a transaction that holds the key's lock: hold ``amount`` on every
    budget of the meter, open the hold and write the ledger; or ``BudgetRefused``."""
    applicable = await budgets.applicable_budgets(conn, key, [meter])
    held = await budgets.debit_all(
        conn, applicable, {meter: amount}, now, key_id=key.key_id, hold=True
    )
    if held is None:
        raise BudgetRefused(key=key)
    values = {
        "id": ids.new_id("hold"),
        "org_id": key.org_id,
        "project_id": key.project_id,
        "key_id": key.key_id,
        "identity_id": key.keyless_identity_id,
        "meter": meter,
        "amount_micros": amount,
        "budget_ids": " " + " ".join(r.id for r in held) + " ",
        "status": "open",
        "settled_micros": None,
        "shortfall_micros": None,
        "created_at": now,
        "expires_at": now + ttl,
        "closed_at": None,
        "on_expiry": on_expiry,
    }
    hold = SimpleNamespace(**values)
    await holds.insert_hold(conn, values)
    entries = movements.holds(origin_of(hold, now, idempotency_key), held, amount)
    await ledger.insert_ledger(conn, entries)
    return hold_model(hold, [budget_status(r, now) for r in held])


async def settle(
    db: Database,
    *,
    hold_id: str,
    actual: int,
    idempotency_key: str | None,
    now: datetime,
    on_alert: AlertHandler | None,
) -> Settlement:
    """Charge ``actual`` against a hold and return the rest.

    Up to the held amount this always succeeds (the money was reserved). Above
    it, the excess is charged as far as every budget allows (and only while the
    key is live); what does not fit is written to the ledger as a shortfall
    and reported, never dropped (``keycap._rules.movements.split_settlement``).
    """
    idem = Idempotency.of("settle", hold_id, idempotency_key, actual=actual)
    if idempotency_key is None or closes_idempotently(db):
        close = closer(db)
        done = await at_once(db, lambda: _settle_at_once(close, hold_id, actual, now, idem))
        if done is not None:
            if not done.replayed:
                await deliver(done.alerts, on_alert)
            return done

    async def in_transaction() -> tuple[Settlement, tuple[BudgetAlert, ...]]:
        hold, replay = await open_hold(db, hold_id, idem, replayed_settlement)
        if hold is None:
            return replay, ()
        unit = _settle_in_transaction(db, hold, actual, idem, now)
        return await run_hold(db, unit, hold_id, idem, replayed_settlement)  # type: ignore[no-any-return]

    result, alerts = await together(db, in_transaction)  # on SQLite, one call into its thread
    await deliver(alerts, on_alert)
    return result


def _settle_in_transaction(
    db: Database, hold: AnyRow, actual: int, idem: Idempotency, now: datetime
) -> Callable[[], Awaitable[tuple[Settlement, tuple[BudgetAlert, ...]]]]:
    """The settlement as a transaction (beyond the hold, or without one statement
    for it): claim the idempotency key, close the hold, return it to its
    budgets, charge the excess where it fits, write the ledger, store the result."""
    hold_id, idempotency_key = hold.id, idem.key

    async def unit() -> tuple[Settlement, tuple[BudgetAlert, ...]]:
        async with db.begin() as conn:
            op_id = await claim(conn, hold.org_id, idem, now)
            if not await holds.close_hold(conn, hold_id, "settled", now, settled_micros=actual):
                raise HoldRefused()
            # Beyond the hold, the key must be live: lock it first (the lock order of
            # every metered call: key, then budgets), so it cannot die half-way.
            key = None
            if actual > hold.amount_micros and hold.key_id is not None:
                key = await keys.lock_live_key(conn, hold.key_id, now)
            elif actual > hold.amount_micros and hold.identity_id is not None:
                key = await tenancy.lock_live_identity(conn, hold.identity_id)
            within = min(actual, hold.amount_micros)
            afters = await return_hold(conn, hold, now, used=within)
            targets = await _excess_targets(conn, key, hold.meter, afters, now)
            room = (
                min(budget_rules.state_at(t, now).remaining for t in targets) if targets else None
            )
            split = movements.split_settlement(hold.amount_micros, actual, room)
            if split.excess and key is None:
                split = split.nothing_beyond_the_hold()  # the key is dead (or deleted)
            charged_excess: list[AnyRow] = []
            if split.fits:
                for target in targets:
                    again = await budgets.debit(
                        conn, target, used=split.fits, held=0, now=now, key_id=hold.key_id
                    )
                    if again is None:  # locked, live and with room: cannot happen
                        raise DatabaseError("inconsistent budgets during settle")
                    charged_excess.append(again)
            entries = movements.settlement(
                origin_of(hold, now, idempotency_key), hold.meter, split, afters, charged_excess
            )
            await ledger.insert_ledger(conn, entries)
            result = _settlement(hold, actual, split, charged_excess or afters, now)
            alerts = result.alerts
            if op_id is not None:
                await operations.store_result(conn, op_id, result.model_dump(mode="json"))
            return result, alerts

    return unit


async def _settle_at_once(
    close: Closer, hold_id: str, actual: int, now: datetime, idem: Idempotency
) -> Settlement | None:
    """A settlement within the hold in one round trip (``keycap._db.metering``'s
    statement, ``keycap._db.blocks``' compound statement; with an idempotency
    key, its operation's row too, or the earlier call's result found instead).
    None when it did not settle: the hold is not open, or ``actual`` is beyond
    it (the transaction then decides)."""
    claim = claim_params(idem, lambda: {"actual": actual, "at": now})
    closed = await close(hold_id, "settled", now, actual, claim=claim)
    if isinstance(closed, operations.Prior):
        return prior_replay(closed, idem, replayed_settlement)  # type: ignore[no-any-return]
    if closed is None:
        return None
    hold, afters = closed
    split = movements.split_settlement(hold.amount_micros, actual, None)
    return _settlement(hold, actual, split, afters, now)


def replayed_settlement(result: dict[str, Any]) -> Settlement:
    """A settlement's stored result, replayed: as a transaction stored it, or
    rebuilt from what its statement stored (``keycap._db.operations``)."""
    if (afters := operations.rows_after(result)) is None:
        return Settlement.model_validate(result)
    hold, actual = operations.hold_after(result), result["head"]["actual"]
    split = movements.split_settlement(hold.amount_micros, actual, None)
    settled = _settlement(hold, actual, split, afters, operations.head_time(result, "at"))
    return settled.model_copy(update={"replayed": True})


def _settlement(
    hold: Any, actual: int, split: movements.SettleSplit, final: Sequence[Any], now: datetime
) -> Settlement:
    """A settlement's result: ``final`` holds the budgets' rows after it (those that
    took the excess, if any did, else those the hold was returned to)."""
    return Settlement.model_construct(
        hold_id=hold.id,
        key_id=hold.key_id,
        meter=hold.meter,
        held=from_micros(split.held),
        actual=from_micros(actual),
        charged=from_micros(split.charged),
        returned=from_micros(split.returned),
        shortfall=from_micros(split.shortfall),
        budgets=by_remaining([budget_status(a, now) for a in final]),
        alerts=crossed_alerts([(a, split.charged) for a in final], now, hold.key_id),
        replayed=False,
    )


async def _excess_targets(
    conn: AsyncConnection, key: KeyRef | None, meter: str, afters: list[AnyRow], now: datetime
) -> list[AnyRow]:
    """The budgets that take what a settlement charges beyond its hold: every budget
    of the meter that applies to the key now (its own, its project's, its
    organization's), including one created or changed while the hold was open,
    each locked and in id order. None without a live key."""
    if key is None:
        return []
    held = {a.id: a for a in afters}
    out = []
    for row in await budgets.applicable_budgets(conn, key, [meter]):
        if row.id not in held:
            # Not touched by returning the hold: lock it (a change of nothing).
            locked = await budgets.debit(
                conn, row, used=0, held=0, now=now, key_id=None, must_fit=False
            )
            assert locked is not None
            row = locked
        else:
            row = held[row.id]
        out.append(row)
    return out
