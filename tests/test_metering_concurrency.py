"""Metering under concurrent load from several real processes, on every database.

Each test prints what it admitted and the final balances (see the
"keycap concurrency results" section at the end of the run).
"""

import asyncio
import multiprocessing
import os
import signal
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from keycap import APIKeyClient, Budget, RateLimit
from tests import _workers
from tests._ledger import assert_balances_match_ledger
from tests.conftest import REPORT, FakeClock

pytestmark = pytest.mark.concurrency
PROCESSES = 4
D = Decimal


def _fire(jobs: list[tuple[Any, ...]]) -> tuple[Counter[str], list[float]]:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(jobs), mp_context=ctx) as pool:
        results = [f.result() for f in [pool.submit(_workers.metered_many, *job) for job in jobs]]
    outcomes: Counter[str] = Counter()
    retry_afters: set[float] = set()
    for r in results:
        outcomes.update(r["outcomes"])
        retry_afters.update(r["retry_afters"])
    return outcomes, sorted(retry_afters)


async def test_budget_of_one_dollar_admits_exactly_33_charges_of_3_cents(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    issued = await client.create_key(
        (await client.create_organization("A")).id, budgets=[Budget(D("1.00"))]
    )
    outcomes, _ = _fire([(db_url, "charge", issued.id, "0.03", 100, None)] * PROCESSES)
    (status,) = await client.get_budgets(issued.id)
    ledger = await assert_balances_match_ledger(client)
    REPORT.append(
        f"{backend}: budget 1.00, {PROCESSES}x100 charges of 0.03 -> admitted={outcomes['ok']}, "
        f"refused={outcomes['budget_exceeded']}, used={status.used}; {'; '.join(ledger)}"
    )
    assert outcomes == Counter(ok=33, budget_exceeded=367)
    assert status.used == D("0.99") and status.held == 0


async def test_rate_limit_100_per_minute_admits_exactly_100_of_500(
    client: APIKeyClient, db_url: str, backend: str, clock: FakeClock
) -> None:
    issued = await client.create_key(
        (await client.create_organization("A")).id, rate_limits=[RateLimit(100, "minute")]
    )
    now = datetime(2026, 1, 15, 12, 0, 15, tzinfo=UTC)  # one instant for every process
    outcomes, retry_afters = _fire(
        [(db_url, "validate", issued.plaintext, None, 125, now.isoformat())] * PROCESSES
    )
    key = await client.get_key(issued.id)
    REPORT.append(
        f"{backend}: 100/minute, {PROCESSES}x125 validations -> admitted={outcomes['ok']}, "
        f"rate_limited={outcomes['rate_limited']}, retry_after={retry_afters}, "
        f"use_count={key.use_count}"
    )
    assert outcomes == Counter(ok=100, rate_limited=400)
    assert key.use_count == 100
    # 45 s to the next window, then until 100 * weight + 1 <= 100: weight <= 0.99, 0.6 s in.
    assert retry_afters == [45.6]


async def test_shared_org_budget_through_two_keys(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    org = (await client.create_organization("A")).id
    await client.set_budget(org, Budget(D("2.00")))
    a = await client.create_key(org, budgets=[Budget(D("1.50"))])
    b = await client.create_key(org, budgets=[Budget(D("1.50"))])
    outcomes, _ = _fire(
        [(db_url, "charge", a.id, "0.10", 50, None), (db_url, "charge", b.id, "0.10", 50, None)] * 2
    )
    (org_status,) = await client.get_budgets(org)
    (a_status,) = await client.get_budgets(a.id)
    (b_status,) = await client.get_budgets(b.id)
    ledger = await assert_balances_match_ledger(client)
    REPORT.append(
        f"{backend}: org 2.00 + keys 1.50 each, 200 charges of 0.10 via 2 keys -> "
        f"admitted={outcomes['ok']}, org used={org_status.used}, key a={a_status.used}, "
        f"key b={b_status.used}; {'; '.join(ledger)}"
    )
    assert outcomes["ok"] == 20
    assert org_status.used == D("2.00")
    assert a_status.used <= D("1.50") and b_status.used <= D("1.50")
    # Whatever the org refused consumed nothing on the keys.
    assert a_status.used + b_status.used == org_status.used


async def test_concurrent_reserves_never_exceed_the_limit(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    issued = await client.create_key(
        (await client.create_organization("A")).id, budgets=[Budget(D("1.00"))]
    )
    outcomes, _ = _fire([(db_url, "reserve", issued.id, "0.07", 50, None)] * PROCESSES)
    (status,) = await client.get_budgets(issued.id)
    await assert_balances_match_ledger(client)
    REPORT.append(
        f"{backend}: budget 1.00, {PROCESSES}x50 reserves of 0.07 -> admitted={outcomes['ok']}, "
        f"held={status.held}"
    )
    assert outcomes["ok"] == 14 and status.held == D("0.98")


async def test_period_rollover_under_concurrent_load(
    client: APIKeyClient, db_url: str, backend: str, clock: FakeClock
) -> None:
    """Processes on both sides of midnight: the new day starts once, at midnight."""
    clock.now = datetime(2026, 1, 15, 23, 0, tzinfo=UTC)
    issued = await client.create_key(
        (await client.create_organization("A")).id, budgets=[Budget(D("1.00"), "day")]
    )
    await client.charge(issued.id, D("0.97"))
    before = datetime(2026, 1, 15, 23, 59, 59, 999000, tzinfo=UTC).isoformat()
    after = datetime(2026, 1, 16, 0, 0, 0, 1000, tzinfo=UTC).isoformat()
    outcomes, _ = _fire(
        [
            (db_url, "charge", issued.id, "0.03", 60, before),
            (db_url, "charge", issued.id, "0.03", 60, after),
        ]
        * 2
    )
    clock.now = datetime(2026, 1, 16, 1, tzinfo=UTC)
    (status,) = await client.get_budgets(issued.id)
    await assert_balances_match_ledger(client)
    REPORT.append(
        f"{backend}: day budget 1.00 at 0.97, 240 charges of 0.03 across midnight -> "
        f"admitted={outcomes['ok']}, new period start={status.period_start.isoformat()}, "
        f"used={status.used}"
    )
    # At most one before midnight (0.97 + 0.03), then exactly 33 in the new day.
    assert status.period_start == datetime(2026, 1, 16, tzinfo=UTC)
    assert status.used == D("0.99")
    assert outcomes["ok"] in (33, 34)


async def test_a_killed_process_leaves_balances_equal_to_the_ledger(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    org = (await client.create_organization("A")).id
    await client.set_budget(org, Budget(D("1000")))
    issued = await client.create_key(org, budgets=[Budget(D("1000"))])
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_workers.charge_forever, args=(db_url, issued.id, ready))
    proc.start()
    assert await asyncio.to_thread(ready.wait, 60), "the charging process never got going"
    await asyncio.sleep(0.3)  # let it be mid-transaction
    os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    lines = await assert_balances_match_ledger(client)
    (status,) = await client.get_budgets(issued.id)
    REPORT.append(f"{backend}: SIGKILL mid-charges -> key used={status.used}; {'; '.join(lines)}")
    assert status.used > 0
    await client.charge(issued.id, D("0.000001"))  # and the database is still usable
