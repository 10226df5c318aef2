"""``reserve`` and ``settle``: hold before a call whose cost is known only
afterwards, then charge what it cost and return the rest.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

from keycap._db import metering as m
from keycap._db.engine import Database
from keycap._db.queries import AnyRow
from keycap._errors import (
    DatabaseError,
)
from keycap._models import (
    BudgetAlert,
    Hold,
    Settlement,
)
from keycap._ops.refusals import run
from keycap._ops.release import hold_model, open_hold, return_hold, run_hold
from keycap._ops.results import (
    AlertHandler,
    budget_status,
    by_remaining,
    crossed_alerts,
    deliver,
)
from keycap._ops.units import Refused, claim, live_key, stored_replay
from keycap._rules import budgets as budget_rules
from keycap._rules import ids
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
) -> Hold:
    """Hold ``amount`` on every budget of the meter (key, project, org), or none."""
    if (replay := await stored_replay(db, Hold, key_id, "reserve", idempotency_key)) is not None:
        return replay  # type: ignore[no-any-return]

    async def unit() -> tuple[Hold, tuple[()]]:
        async with db.begin() as conn:
            key = await live_key(conn, key_id, now)
            op_id = await claim(conn, key.org_id, key_id, "reserve", idempotency_key, now)
            hold_id = ids.new_id("hold")
            applicable = await m.applicable_budgets(conn, key, [meter])
            held = await m.debit_all(
                conn, applicable, {meter: amount}, now, key_id=key_id, hold=True
            )
            if held is None:
                raise Refused("budget", key=key)
            values = {
                "id": hold_id,
                "org_id": key.org_id,
                "project_id": key.project_id,
                "key_id": key_id,
                "meter": meter,
                "amount_micros": amount,
                "budget_ids": " " + " ".join(r.id for r in held) + " ",
                "status": "open",
                "settled_micros": None,
                "shortfall_micros": None,
                "created_at": now,
                "expires_at": now + ttl,
                "closed_at": None,
            }
            await m.insert_hold(conn, values)
            await m.insert_ledger(
                conn,
                [
                    m.ledger_row(
                        after,
                        "hold",
                        amount,
                        0,
                        amount,
                        i == 0,
                        now,
                        key_id=key_id,
                        project_id=key.project_id,
                        hold_id=hold_id,
                        idempotency_key=idempotency_key,
                    )
                    for i, after in enumerate(held)
                ],
            )
            result = hold_model(SimpleNamespace(**values), [budget_status(r, now) for r in held])
            if op_id is not None:
                await m.store_result(conn, op_id, result.model_dump(mode="json"))
            return result, ()

    result, _ = await run(
        db,
        unit,
        key_id=key_id,
        amounts={meter: amount},
        now=now,
        idempotency=("reserve", key_id, idempotency_key),
        model=Hold,
    )
    return result  # type: ignore[no-any-return]


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
    and reported, never dropped.
    """
    if (
        replay := await stored_replay(db, Settlement, hold_id, "settle", idempotency_key)
    ) is not None:
        return replay  # type: ignore[no-any-return]
    hold = await open_hold(db, hold_id)

    async def unit() -> tuple[Settlement, tuple[BudgetAlert, ...]]:
        async with db.begin() as conn:
            await_op = await claim(conn, hold.org_id, hold_id, "settle", idempotency_key, now)
            if not await m.close_hold(conn, hold_id, "settled", now, settled_micros=actual):
                raise Refused("hold")
            within = min(actual, hold.amount_micros)
            excess = actual - within
            afters = await return_hold(conn, hold, now, used=within)
            fit = excess
            if excess and afters:
                fit = min(excess, *(budget_rules.state_at(a, now).remaining for a in afters))
            elif excess and not await m.is_live(conn, hold.key_id, now):
                fit = 0  # no budget limits the excess, but a dead key is charged nothing more
            charged_excess: list[AnyRow] = []
            if fit:
                for after in afters:
                    again = await m.debit(
                        conn, after, used=fit, held=0, now=now, key_id=hold.key_id
                    )
                    if again is None:  # the key is no longer live: nothing beyond the hold
                        if charged_excess:
                            raise DatabaseError("inconsistent budgets during settle")
                        fit = 0
                        break
                    charged_excess.append(again)
            shortfall = excess - fit
            final = charged_excess or afters
            common: dict[str, Any] = {
                "key_id": hold.key_id,
                "project_id": hold.project_id,
                "hold_id": hold_id,
                "idempotency_key": idempotency_key,
            }
            ledger_rows = [
                m.ledger_row(
                    a, "settle", within, within, -hold.amount_micros, i == 0, now, **common
                )
                for i, a in enumerate(afters)
            ] or [
                m.ledger_row(
                    None,
                    "settle",
                    within,
                    within,
                    0,
                    True,
                    now,
                    meter=hold.meter,
                    org_id=hold.org_id,
                    **common,
                )
            ]
            if fit:
                ledger_rows += [
                    m.ledger_row(a, "charge", fit, fit, 0, i == 0, now, **common)
                    for i, a in enumerate(charged_excess)
                ] or [
                    m.ledger_row(
                        None,
                        "charge",
                        fit,
                        fit,
                        0,
                        True,
                        now,
                        meter=hold.meter,
                        org_id=hold.org_id,
                        **common,
                    )
                ]
            if shortfall:
                ledger_rows.append(
                    m.ledger_row(
                        None,
                        "shortfall",
                        shortfall,
                        0,
                        0,
                        False,
                        now,
                        meter=hold.meter,
                        org_id=hold.org_id,
                        **common,
                    )
                )
            await m.insert_ledger(conn, ledger_rows)
            debited = [(a, within + fit) for a in final]
            alerts = crossed_alerts(debited, now, hold.key_id)
            result = Settlement.model_construct(
                hold_id=hold_id,
                key_id=hold.key_id,
                meter=hold.meter,
                held=from_micros(hold.amount_micros),
                actual=from_micros(actual),
                charged=from_micros(within + fit),
                returned=from_micros(hold.amount_micros - within),
                shortfall=from_micros(shortfall),
                budgets=by_remaining([budget_status(a, now) for a in final]),
                alerts=alerts,
                replayed=False,
            )
            if await_op is not None:
                await m.store_result(conn, await_op, result.model_dump(mode="json"))
            return result, alerts

    result, alerts = await run_hold(db, unit, hold_id, ("settle", idempotency_key), Settlement)
    await deliver(alerts, on_alert)
    return result  # type: ignore[no-any-return]
