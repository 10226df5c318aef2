"""``charge``: debit every budget of each meter on the key, its project and its
organization, or none; with its ledger entries.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db import blocks, budgets, ledger, metering, operations
from keycap._db.build import AnyRow, KeyRef
from keycap._db.engine import Database
from keycap._models import BudgetAlert, Charge
from keycap._ops.refusals import run
from keycap._ops.results import AlertHandler, budget_status, by_remaining, crossed_alerts, deliver
from keycap._ops.units import (
    BudgetRefused,
    Idempotency,
    claim,
    claim_params,
    live_key,
    prior_replay,
    spent_at_once,
)
from keycap._rules import ids, movements
from keycap._rules.money import from_micros


async def charge(
    db: Database,
    *,
    key_id: str,
    amounts: Mapping[str, int],
    idempotency_key: str | None,
    metadata: Mapping[str, Any] | None,
    now: datetime,
    on_alert: AlertHandler | None,
) -> Charge:
    """Debit every budget of each meter on the key, its project and its org, or none."""
    # What the charge moves decides a conflict; metadata is a label, and a retry
    # may leave it out (docs/limits-and-budgets.md).
    idem = Idempotency.of("charge", key_id, idempotency_key, amounts=dict(amounts))
    # A keyless identity's charge is always a transaction (the one statement is
    # built around the key's row).
    at_once = (db.one_statement or db.one_block) and not ids.is_valid(ids.IDENTITY, key_id)
    if at_once:
        unit = _at_once(db, key_id, amounts, idem, metadata, now)
    else:
        unit = _in_transaction(db, key_id, amounts, idem, metadata, now)
    result, alerts = await run(
        db,
        unit,
        key_id=key_id,
        amounts=amounts,
        now=now,
        idem=idem,
        decode=replayed,
        replay_first=not at_once,
    )
    await deliver(alerts, on_alert)
    return result  # type: ignore[no-any-return]


Unit = Callable[[], Awaitable[tuple[Charge, tuple[BudgetAlert, ...]]]]


def _at_once(
    db: Database,
    key_id: str,
    amounts: Mapping[str, int],
    idem: Idempotency,
    metadata: Mapping[str, Any] | None,
    now: datetime,
) -> Unit:
    """The whole charge in one round trip: one statement on PostgreSQL
    (``keycap._db.metering``), one compound statement on MariaDB
    (``keycap._db.blocks``); with an idempotency key, its operation's row too,
    or the earlier call's result found instead."""
    idempotent = idem.key is not None
    count = len(amounts)

    async def unit() -> tuple[Charge, tuple[BudgetAlert, ...]]:
        params = metering.charge_params(key_id, amounts, metadata, now)
        if claim := claim_params(
            idem, lambda: {"key_id": key_id, "amounts": dict(amounts), "at": now}
        ):
            params.update(claim)
        after = await spent_at_once(
            db,
            key_id,
            lambda: metering.charge_statement(count, idempotent=idempotent),
            lambda dialect: blocks.charge_block(dialect, count, idempotent),
            params,
        )
        if isinstance(after, operations.Prior):
            return prior_replay(after, idem, replayed), ()
        result = charged(key_id, amounts, [(row, amounts[row.meter]) for row in after], now)
        return result, result.alerts

    return unit


def _in_transaction(
    db: Database,
    key_id: str,
    amounts: Mapping[str, int],
    idem: Idempotency,
    metadata: Mapping[str, Any] | None,
    now: datetime,
) -> Unit:
    """The charge as a transaction: lock the key, claim the idempotency key, debit,
    write the ledger, store the result."""

    async def unit() -> tuple[Charge, tuple[BudgetAlert, ...]]:
        async with db.begin() as conn:
            key = await live_key(conn, key_id, now)
            op_id = await claim(conn, key.org_id, idem, now)
            result = await charge_in(conn, key, amounts, now, idem.key, metadata)
            if op_id is not None:
                await operations.store_result(conn, op_id, result.model_dump(mode="json"))
            return result, result.alerts

    return unit


async def charge_in(
    conn: AsyncConnection,
    key: KeyRef,
    amounts: Mapping[str, int],
    now: datetime,
    idempotency_key: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Charge:
    """Inside a transaction: debit every applicable budget, write the ledger, and
    say which alert thresholds were crossed (delivered by the caller after commit)."""
    debited = await _debit_all(conn, key, amounts, now)
    origin = movements.Origin(
        now=now,
        org_id=key.org_id,
        key_id=key.key_id,
        project_id=key.project_id,
        idempotency_key=idempotency_key,
        metadata=metadata,
    )
    await ledger.insert_ledger(conn, movements.charges(origin, debited, amounts))
    return charged(key.key_id, amounts, debited, now, identity_id=key.keyless_identity_id)


def replayed(result: dict[str, Any]) -> Charge:
    """A charge's stored result, replayed: as a transaction stored it, or rebuilt
    from what its statement stored (``keycap._db.operations``)."""
    if (after := operations.rows_after(result)) is None:
        return Charge.model_validate(result)
    head = result["head"]
    amounts = head["amounts"]
    at = operations.head_time(result, "at")
    debited = [(row, amounts[row.meter]) for row in after]
    return charged(head["key_id"], amounts, debited, at).model_copy(update={"replayed": True})


def charged(
    key_id: str | None,
    amounts: Mapping[str, int],
    debited: Sequence[tuple[Any, int]],
    now: datetime,
    identity_id: str | None = None,
) -> Charge:
    """The charge's result, from every budget it debited (the row after, the amount)."""
    return Charge.model_construct(
        key_id=key_id,
        identity_id=identity_id,
        amounts={meter: from_micros(a) for meter, a in amounts.items()},
        budgets=by_remaining([budget_status(after, now) for after, _ in debited]),
        alerts=crossed_alerts(debited, now, key_id),
        replayed=False,
    )


async def _debit_all(
    conn: AsyncConnection, key: KeyRef, amounts: Mapping[str, int], now: datetime
) -> list[tuple[AnyRow, int]]:
    applicable = await budgets.applicable_budgets(conn, key, list(amounts))
    afters = await budgets.debit_all(conn, applicable, amounts, now, key_id=key.key_id)
    if afters is None:
        raise BudgetRefused(key=key)
    return [(after, amounts[after.meter]) for after in afters]
