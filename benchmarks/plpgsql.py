"""PostgreSQL: keycap's one-statement charge against the same charge as a PL/pgSQL
function, alone and under contention, on held bare asyncpg connections.

    .venv/bin/python benchmarks/plpgsql.py          # after eval "$(scripts/databases)"

Issue 10 asks to measure both ways of one round trip and choose with the
figures. Both run on a held asyncpg connection without SQLAlchemy, so the
figures compare what the server does with each (the client side is the same
for either). The function is this script's own: it covers the charge of one
meter (key live, its budgets locked in id order with their rollover, the
writes, the ledger), enough to time it; it is checked against keycap's
statement for identical effects before anything is timed.

A single statement keeps the snapshot it started with: a caller that waited
for a hot row's lock re-reads it and every later locked row at its newest
version (EvalPlanQual). In a function, each statement after the key's lock
takes a new snapshot. This measures what that difference costs.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from run import (
    COROUTINES,
    FLOOR_TABLE,
    PROCESSES,
    SECRET,
    _connect_pg,
    _fire_at,
    _hammer,
    _in_processes,
    bare,
    paired,
    pct,
    urls,
)
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import make_url

from keycap import APIKeyClient, Budget
from keycap._db.metering import charge_params, charge_statement
from keycap._db.schema import metadata
from keycap._rules.money import DEFAULT_METER

CALLS = 20
FUNCTION = """
CREATE OR REPLACE FUNCTION keycap_bench_charge(
    p_key varchar, p_meter varchar, p_amount bigint, p_now timestamptz,
    p_day timestamptz, p_week timestamptz, p_months timestamptz[])
RETURNS TABLE (ok boolean, budget_id varchar, used_micros bigint)
LANGUAGE plpgsql AS $$
DECLARE
    k record;
    b record;
    ids varchar[] := '{}';
    used bigint[] := '{}';
    credit bigint[] := '{}';
    starts timestamptz[] := '{}';
    refused varchar;
BEGIN
    SELECT kk.id, kk.org_id, kk.project_id INTO k FROM keycap_keys kk
     WHERE kk.id = p_key AND kk.revoked_at IS NULL AND kk.disabled_at IS NULL
       AND (kk.expires_at IS NULL OR kk.expires_at > p_now)
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::boolean, NULL::varchar, NULL::bigint;
        RETURN;
    END IF;
    FOR b IN
        SELECT bb.id, bb.limit_micros, bb.held_micros, bb.used_micros, bb.credit_micros,
               bb.period_start,
               CASE bb.period WHEN 'lifetime' THEN '1970-01-01 00:00+00'::timestamptz
                              WHEN 'day' THEN p_day WHEN 'week' THEN p_week
                              ELSE p_months[coalesce(bb.anchor_day, 1)] END AS cur
          FROM keycap_budgets bb
         WHERE bb.subject_id IN (k.id, k.org_id, k.project_id) AND bb.meter = p_meter
         ORDER BY bb.id
           FOR NO KEY UPDATE
    LOOP
        IF b.period_start < b.cur THEN
            b.used_micros := 0;
            b.credit_micros := 0;
            b.period_start := b.cur;
        END IF;
        IF refused IS NULL
           AND b.used_micros + b.held_micros + p_amount > b.limit_micros + b.credit_micros THEN
            refused := b.id;
        END IF;
        ids := ids || b.id;
        used := used || (b.used_micros + p_amount);
        credit := credit || b.credit_micros;
        starts := starts || b.period_start;
    END LOOP;
    IF refused IS NOT NULL THEN
        RETURN QUERY SELECT false, refused, NULL::bigint;
        RETURN;
    END IF;
    UPDATE keycap_keys SET last_used_at = p_now WHERE id = p_key;
    UPDATE keycap_budgets bb
       SET used_micros = u.used, credit_micros = u.credit, period_start = u.start
      FROM unnest(ids, used, credit, starts) AS u(id, used, credit, start)
     WHERE bb.id = u.id;
    INSERT INTO keycap_ledger (org_id, project_id, key_id, budget_id, meter, kind,
                               amount_micros, delta_used, delta_held, period_start,
                               is_primary, created_at)
    SELECT k.org_id, k.project_id, k.id, u.id, p_meter, 'charge', p_amount, p_amount, 0,
           u.start, u.n = 1, p_now
      FROM unnest(ids, starts) WITH ORDINALITY AS u(id, start, n);
    IF cardinality(ids) = 0 THEN
        INSERT INTO keycap_ledger (org_id, project_id, key_id, meter, kind, amount_micros,
                                   delta_used, delta_held, is_primary, created_at)
        VALUES (k.org_id, k.project_id, k.id, p_meter, 'charge', p_amount, p_amount, 0,
                true, p_now);
    END IF;
    RETURN QUERY SELECT true, u.id, u.used FROM unnest(ids, used) AS u(id, used);
END
$$
"""

Caller = Callable[[str], Awaitable[Any]]


def _statement() -> tuple[str, Callable[[str, datetime], list[Any]]]:
    """keycap's one-statement charge of 0.01 compiled for asyncpg, and its positional
    arguments for a key at an instant (bind processors applied, as SQLAlchemy would)."""
    compiled = charge_statement(1).compile(dialect=PGDialect_asyncpg())
    processors = compiled._bind_processors
    names = compiled.positiontup or []

    def args(key_id: str, now: datetime) -> list[Any]:
        values = compiled.construct_params(
            charge_params(key_id, {DEFAULT_METER: 10_000}, None, now)
        )
        out = []
        for name in names:
            value = values[name]
            process = processors.get(name)
            out.append(process(value) if process and not isinstance(process, tuple) else value)
        return out

    return compiled.string, args


async def _callers(conn: Any) -> dict[str, Caller]:
    """``statement`` and ``function``: a charge of 0.01 of the default meter on ``conn``."""
    sql, args = _statement()
    stmt = await conn.prepare(sql)
    fn = await conn.prepare("SELECT * FROM keycap_bench_charge($1, 'spend', 10000, $2, $3, $4, $5)")

    def statement(key_id: str) -> Awaitable[Any]:
        return stmt.fetch(*args(key_id, datetime.now(UTC)))  # type: ignore[no-any-return]

    def function(key_id: str) -> Awaitable[Any]:
        now = datetime.now(UTC)
        bound = charge_params(key_id, {}, None, now)
        return fn.fetch(  # type: ignore[no-any-return]
            key_id, now, bound["m_day"], bound["m_week"], bound["m_months"]
        )

    return {"statement": statement, "function": function}


def _charger(url: str, way: str, key_ids: list[str], start_at: float) -> dict[str, Any]:
    """Charges of 0.01 by ``way`` through ``key_ids`` in turn, each coroutine on a bare
    connection of its own, from ``start_at``."""

    async def run() -> dict[str, Any]:
        u = make_url(url)
        conns = [await _connect_pg(u) for _ in range(COROUTINES)]
        callers = [(await _callers(c))[way] for c in conns]
        admitted = refused = 0
        latencies: list[float] = []

        async def one(n: int) -> None:
            nonlocal admitted, refused
            for i in range(CALLS):
                t0 = time.perf_counter()
                rows = await callers[n](key_ids[(n + i) % len(key_ids)])
                latencies.append(time.perf_counter() - t0)
                if not rows:
                    raise RuntimeError(f"{way}: no row")
                if rows[0]["ok"]:
                    admitted += 1
                else:
                    refused += 1

        window = await _fire_at(start_at, one)
        for c in conns:
            await c.close()
        return {"admitted": admitted, "refused": refused, "latencies": latencies, **window}

    return asyncio.run(run())


async def _effects(client: APIKeyClient, conn: Any, way: Caller, org: str) -> Any:
    """What three charges (the third refused) leave: the budgets and the ledger."""
    key = await client.create_key(org, budgets=[Budget(Decimal("0.02"), period="month")])
    for _ in range(3):
        await way(key.id)
    budgets = [(b.subject_id == key.id, b.used) for b in await client.get_budgets(key.id)]
    ledger = await conn.fetch(
        "SELECT budget_id = $1 AS own, meter, kind, amount_micros, delta_used, delta_held,"
        " period_start, is_primary, project_id FROM keycap_ledger WHERE key_id = $2"
        " ORDER BY id",
        (await client.get_budgets(key.id))[0].id,
        key.id,
    )
    return sorted(budgets), sorted(tuple(r) for r in ledger)


async def main() -> None:
    url = urls(["postgresql"], __import__("pathlib").Path("."))["postgresql"]
    floor = await bare("postgresql", url)
    async with APIKeyClient(url, signing_secret=SECRET) as client:
        async with client.engine.begin() as c:
            await c.run_sync(metadata.drop_all)
            await c.run_sync(metadata.create_all)
        conn = await _connect_pg(make_url(url))
        await conn.execute(FUNCTION)
        callers = await _callers(conn)
        org = (await client.create_organization("plpgsql")).id
        await client.set_budget(org, Budget(Decimal("1000000000"), period="month"))

        effects = {name: await _effects(client, conn, way, org) for name, way in callers.items()}
        same = effects["statement"] == effects["function"]
        print(f"same effects (budgets, ledger) for three charges: {same}")
        if not same:
            raise SystemExit(f"the function differs: {effects}")

        key = await client.create_key(org, budgets=[Budget(Decimal("1000000000"), period="month")])
        print("alone, p50 and p99 as ratios to the bare conditional UPDATE (400 pairs):")
        for name, way in callers.items():

            async def call(way: Caller = way) -> Any:
                return await way(key.id)

            f, o = await paired(floor.update, call, 400)
            ratio = statistics.median(o) / statistics.median(f)
            print(
                f"  {name:<9} p50 {statistics.median(o) * 1000:.3f} ms"
                f" (floor {statistics.median(f) * 1000:.3f}) = {ratio:.2f}x;"
                f" p99 {pct(o, 0.99) * 1000:.3f} ms"
            )

        total = PROCESSES * COROUTINES * CALLS
        allowed = total // 2
        print(f"contention: {PROCESSES} processes x {COROUTINES} callers x {CALLS} calls")
        for rep in range(2):
            _, floor_wall = _in_processes(_hammer, ("postgresql", url), PROCESSES)
            floor_rate = total / floor_wall
            print(f"  round {rep + 1}: bare UPDATE of one row {floor_rate:.0f}/s")
            for name in callers:
                hot_key = await client.create_key(
                    org, budgets=[Budget(Decimal("0.01") * allowed, period="month")]
                )
                hot_org = (await client.create_organization(f"hot-{time.time_ns()}")).id
                await client.set_budget(hot_org, Budget(Decimal("0.01") * allowed, period="month"))
                shared = [(await client.create_key(hot_org)).id for _ in range(8)]
                for subject, key_ids in [("one key", [hot_key.id]), ("one org budget", shared)]:
                    results, wall = _in_processes(_charger, (url, name, key_ids), PROCESSES)
                    admitted = sum(r["admitted"] for r in results)
                    lat = [x for r in results for x in r["latencies"]]
                    subject_id = hot_key.id if subject == "one key" else hot_org
                    [budget] = await client.get_budgets(subject_id)
                    exact = admitted == allowed and budget.used == Decimal("0.01") * allowed
                    print(
                        f"    {name:<9} {subject:<15} {total / wall:6.0f}/s"
                        f" = {total / wall / floor_rate:4.0%} of the floor;"
                        f" p50 {statistics.median(lat) * 1000:6.1f} ms,"
                        f" p99 {pct(lat, 0.99) * 1000:6.1f} ms;"
                        f" admitted {admitted} of {total}: {'exact' if exact else 'WRONG'}"
                    )
        await conn.execute("DROP FUNCTION keycap_bench_charge")
        await conn.execute(f"DROP TABLE IF EXISTS {FLOOR_TABLE}")
        await conn.close()
    await floor.close()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        raise SystemExit(__doc__)
    asyncio.run(main())
