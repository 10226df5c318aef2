"""``charge``: debit every budget of each meter on the key, its project and its
organization, or none; with its ledger rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from keycap._db import metering as m
from keycap._db.engine import Database
from keycap._db.queries import AnyRow
from keycap._models import (
    BudgetAlert,
    Charge,
)
from keycap._ops.refusals import run
from keycap._ops.results import (
    AlertHandler,
    budget_status,
    by_remaining,
    crossed_alerts,
    deliver,
)
from keycap._ops.units import Refused, claim, live_key, stored_replay
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
    if (replay := await stored_replay(db, Charge, key_id, "charge", idempotency_key)) is not None:
        return replay  # type: ignore[no-any-return]

    async def unit() -> tuple[Charge, tuple[BudgetAlert, ...]]:
        async with db.begin() as conn:
            key = await live_key(conn, key_id, now)
            op_id = await claim(conn, key.org_id, key_id, "charge", idempotency_key, now)
            result = await charge_in(conn, key, amounts, now, idempotency_key, metadata)
            if op_id is not None:
                await m.store_result(conn, op_id, result.model_dump(mode="json"))
            return result, result.alerts

    result, alerts = await run(
        db,
        unit,
        key_id=key_id,
        amounts=amounts,
        now=now,
        idempotency=("charge", key_id, idempotency_key),
        model=Charge,
    )
    await deliver(alerts, on_alert)
    return result  # type: ignore[no-any-return]


async def charge_in(
    conn: Any,
    key: m.KeyRef,
    amounts: Mapping[str, int],
    now: datetime,
    idempotency_key: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Charge:
    """Inside a transaction: debit every applicable budget, write the ledger, and
    say which alert thresholds were crossed (delivered by the caller after commit)."""
    debited = await _debit_all(conn, key, amounts, now)
    await m.insert_ledger(
        conn, _charge_ledger(key, debited, amounts, now, idempotency_key, metadata)
    )
    return Charge.model_construct(
        key_id=key.id,
        amounts={meter: from_micros(a) for meter, a in amounts.items()},
        budgets=by_remaining([budget_status(after, now) for after, _ in debited]),
        alerts=crossed_alerts(debited, now, key.id),
        replayed=False,
    )


async def _debit_all(
    conn: Any, key: m.KeyRef, amounts: Mapping[str, int], now: datetime
) -> list[tuple[AnyRow, int]]:
    applicable = await m.applicable_budgets(conn, key, list(amounts))
    afters = await m.debit_all(conn, applicable, amounts, now, key_id=key.id)
    if afters is None:
        raise Refused("budget", key=key)
    return [(after, amounts[after.meter]) for after in afters]


def _charge_ledger(
    key: m.KeyRef,
    debited: Sequence[tuple[AnyRow, int]],
    amounts: Mapping[str, int],
    now: datetime,
    idempotency_key: str | None,
    metadata: Mapping[str, Any] | None,
    kind: str = "charge",
) -> list[dict[str, Any]]:
    """One row per budget debited, plus a budget-less row for a meter with no budget;
    the first row of each meter is the primary one."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    common: dict[str, Any] = {
        "key_id": key.id,
        "project_id": key.project_id,
        "idempotency_key": idempotency_key,
        "metadata": metadata,
    }
    for after, amount in debited:
        out.append(
            m.ledger_row(after, kind, amount, amount, 0, after.meter not in seen, now, **common)
        )
        seen.add(after.meter)
    for meter, amount in amounts.items():
        if meter not in seen:
            out.append(
                m.ledger_row(
                    None,
                    kind,
                    amount,
                    amount,
                    0,
                    True,
                    now,
                    meter=meter,
                    org_id=key.org_id,
                    **common,
                )
            )
    return out
