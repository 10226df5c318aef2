"""The ledger invariant, checked straight from the tables."""

from __future__ import annotations

from sqlalchemy import func, select

from keycap import APIKeyClient
from keycap._db.schema import budgets, holds, ledger


async def assert_balances_match_ledger(client: APIKeyClient) -> list[str]:
    """For every budget: used == SUM(delta_used) in its stored period, and held ==
    SUM(delta_held) == the amounts of its open holds.
    Returns one line per budget for reports."""
    lines = []
    # One snapshot for every read: a call still running on the server (sent by a
    # process killed since, which the server has not noticed yet) may commit
    # between reading a budget and summing its ledger.
    engine = client.engine
    if engine.dialect.name == "postgresql":
        engine = engine.execution_options(isolation_level="REPEATABLE READ")
    async with engine.begin() as conn:
        for b in (await conn.execute(select(budgets))).all():
            used = await conn.scalar(
                select(func.coalesce(func.sum(ledger.c.delta_used), 0)).where(
                    ledger.c.budget_id == b.id, ledger.c.period_start == b.period_start
                )
            )
            held = await conn.scalar(
                select(func.coalesce(func.sum(ledger.c.delta_held), 0)).where(
                    ledger.c.budget_id == b.id
                )
            )
            assert int(used) == b.used_micros, f"{b.id}: used {b.used_micros} != ledger {used}"
            assert int(held) == b.held_micros, f"{b.id}: held {b.held_micros} != ledger {held}"
            open_holds = (
                await conn.execute(
                    select(holds.c.amount_micros, holds.c.budget_ids).where(
                        holds.c.status == "open"
                    )
                )
            ).all()
            in_open = sum(h.amount_micros for h in open_holds if f" {b.id} " in h.budget_ids)
            assert in_open == b.held_micros, f"{b.id}: held {b.held_micros} != open holds {in_open}"
            scope = b.subject_id.split("_")[0]
            lines.append(f"{scope} budget used={b.used_micros} held={b.held_micros} = ledger")
    return lines
