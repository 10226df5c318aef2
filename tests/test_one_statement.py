"""PostgreSQL's one-statement charge (``keycap._db.metering``): exact because it
reads every row it decides on ``FOR NO KEY UPDATE``. MariaDB's compound
statements (``keycap._db.blocks``) run the same storms.

The version without that lock pass is kept as a negative control: it decides on
the budgets as they were when its statement started, so a charge that waited
for another's lock on the key spends what that one already spent. Each test
shows the control failing where the real statement holds, so the tests are
known to catch the race.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal as D
from typing import TypeVar

import pytest
from sqlalchemy import func, select, text

from keycap import (
    APIKeyClient,
    Budget,
    BudgetExceededError,
    HoldClosedError,
    IssuedKey,
    RateLimit,
)
from keycap._db import metering
from keycap._db.schema import budgets, ledger
from keycap._rules.money import DEFAULT_METER
from tests import _workers
from tests._ledger import assert_balances_match_ledger
from tests.conftest import DATABASES, REPORT, FakeClock

POSTGRESQL = [name for name in DATABASES if name in ("postgresql", "pgbouncer")]
#: The servers whose hot calls are one round trip: PostgreSQL's one statement,
#: MariaDB's compound statement (``keycap._db.blocks``, whose every decision is an
#: UPDATE's locking read: it has no lock pass to leave out).
ONE_ROUND_TRIP = POSTGRESQL + [name for name in DATABASES if name == "mariadb"]
ON_POSTGRESQL = pytest.mark.parametrize("database", POSTGRESQL, indirect=True)
ON_EVERY_SERVER = pytest.mark.parametrize("database", ONE_ROUND_TRIP, indirect=True)
T = TypeVar("T")


async def _while_a_charge_is_open(
    client: APIKeyClient, key_id: str, now: datetime, second: Callable[[], Awaitable[T]]
) -> T:
    """Charge 0.60 in a transaction, start ``second`` while it is open, commit once
    ``second`` waits on its locks (seen in pg_stat_activity); what ``second`` returns."""
    engine = client.engine
    async with engine.connect() as holder, engine.connect() as watcher, holder.begin():
        await holder.execute(
            metering.charge_statement(1),
            metering.charge_params(key_id, {DEFAULT_METER: 600_000}, None, now),
        )
        blocked = asyncio.ensure_future(second())
        while True:  # until the other charge waits for our lock on the key
            waiting = await watcher.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            )
            await watcher.commit()
            if waiting or blocked.done():
                break
            await asyncio.sleep(0.01)
    return await blocked


async def _key_with_a_budget_of_one(client: APIKeyClient) -> IssuedKey:
    """A key of a new organization with a budget of 1.00 of its own."""
    return await client.create_key(
        (await client.create_organization("A")).id, budgets=[Budget(D("1.00"))]
    )


async def _used_and_ledger(client: APIKeyClient, key_id: str) -> tuple[int, int]:
    async with client.engine.connect() as conn:
        used = await conn.scalar(select(budgets.c.used_micros).where(budgets.c.key_id == key_id))
        spent = await conn.scalar(
            select(func.sum(ledger.c.delta_used)).where(ledger.c.key_id == key_id)
        )
    return int(used or 0), int(spent or 0)


@ON_POSTGRESQL
async def test_a_charge_that_waited_for_the_key_decides_on_the_budget_as_committed(
    client: APIKeyClient, clock: FakeClock
) -> None:
    issued = await _key_with_a_budget_of_one(client)
    with pytest.raises(BudgetExceededError):
        await _while_a_charge_is_open(
            client, issued.id, clock(), lambda: client.charge(issued.id, D("0.60"))
        )
    assert await _used_and_ledger(client, issued.id) == (600_000, 600_000)


@ON_POSTGRESQL
async def test_without_the_lock_pass_the_waiting_charge_spends_the_budget_twice(
    client: APIKeyClient, clock: FakeClock
) -> None:
    issued = await _key_with_a_budget_of_one(client)
    params = metering.charge_params(issued.id, {DEFAULT_METER: 600_000}, None, clock())

    async def unlocked_charge() -> bool:
        async with client.engine.connect() as conn, conn.begin():
            row = (await conn.execute(metering.charge_statement(1, False), params)).first()
        assert row is not None
        return bool(row.ok)

    # Admitted: 1.20 charged on a 1.00 budget, and the budget's row says 0.60.
    assert await _while_a_charge_is_open(client, issued.id, clock(), unlocked_charge)
    used, spent = await _used_and_ledger(client, issued.id)
    assert spent == 1_200_000 and used != spent


def _storm(*job: object) -> int:
    """Four processes each running ``_workers.storm(*job)``; the calls admitted."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=ctx) as pool:
        return sum(f.result() for f in [pool.submit(_workers.storm, *job) for _ in range(4)])


EXACT_AND_CONTROL = pytest.mark.parametrize(
    ("database", "lock_pass"),
    [pytest.param(name, True, id=f"{name}-exact") for name in ONE_ROUND_TRIP]
    + [pytest.param(name, False, id=f"{name}-negative-control") for name in POSTGRESQL],
    indirect=["database"],
)


@pytest.mark.concurrency
@EXACT_AND_CONTROL
async def test_a_storm_of_charges_from_four_processes_admits_exactly_the_budget(
    client: APIKeyClient, db_url: str, backend: str, lock_pass: bool
) -> None:
    issued = await _key_with_a_budget_of_one(client)
    admitted = _storm(db_url, "charge", issued.id, "0.01", 64, lock_pass)
    _report(backend, lock_pass, "4x64 charges of 0.01 on a 1.00 budget", admitted)
    if lock_pass:
        assert admitted == 100
        await assert_balances_match_ledger(client)
    else:
        assert admitted > 100  # the race the lock pass closes, caught


@ON_EVERY_SERVER
@pytest.mark.concurrency
async def test_a_storm_of_reserves_from_four_processes_holds_exactly_the_budget(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    issued = await _key_with_a_budget_of_one(client)
    admitted = _storm(db_url, "reserve", issued.id, "0.01", 64)
    _report(backend, True, "4x64 reserves of 0.01 on a 1.00 budget", admitted)
    (status,) = await client.get_budgets(issued.id)
    assert admitted == 100 and status.held == D("1.00") and status.used == 0
    await assert_balances_match_ledger(client)


@ON_EVERY_SERVER
@pytest.mark.concurrency
async def test_holds_settled_and_released_in_a_storm_leave_the_ledger_equal_to_the_budget(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    issued = await _key_with_a_budget_of_one(client)
    admitted = _storm(db_url, "reserve and settle half", issued.id, "0.02", 64)
    (status,) = await client.get_budgets(issued.id)
    ledger_lines = await assert_balances_match_ledger(client)
    _report(backend, True, f"4x64 reserves of 0.02, each settled for 0.01 or released; "
            f"used={status.used}; {'; '.join(ledger_lines)}", admitted)  # fmt: skip
    assert status.held == 0 and status.used <= D("1.00")
    # Every settled hold spent 0.01: what was used is whole cents.
    assert status.used % D("0.01") == 0 and status.used > 0


@ON_EVERY_SERVER
async def test_a_hold_closed_by_eight_callers_at_once_closes_once(client: APIKeyClient) -> None:
    issued = await _key_with_a_budget_of_one(client)
    hold = await client.reserve(issued.id, D("0.50"))

    async def close(i: int) -> str:
        try:
            if i % 2:
                await client.release(hold.id)
            else:
                await client.settle(hold.id, D("0.25"))
        except HoldClosedError:
            return "closed"
        return "done"

    outcomes = await asyncio.gather(*(close(i) for i in range(8)))
    (status,) = await client.get_budgets(issued.id)
    await assert_balances_match_ledger(client)
    assert outcomes.count("done") == 1 and status.held == 0
    assert status.used in (0, D("0.25"))


@pytest.mark.concurrency
@EXACT_AND_CONTROL
async def test_a_storm_of_metered_validations_admits_exactly_the_org_budget(
    client: APIKeyClient, db_url: str, backend: str, lock_pass: bool
) -> None:
    org = (await client.create_organization("A")).id
    await client.set_budget(org, Budget(D("1.00")))
    issued = await client.create_key(
        org, budgets=[Budget(D("5.00"))], rate_limits=[RateLimit(10_000, "minute")]
    )
    admitted = _storm(db_url, "validate", issued.plaintext, "0.01", 64, lock_pass)
    _report(backend, lock_pass, "4x64 validations costing 0.01 on an org budget of 1.00", admitted)
    if lock_pass:
        assert admitted == 100
        assert (await client.get_key(issued.id)).use_count == 100
        await assert_balances_match_ledger(client)
    else:
        assert admitted > 100


@pytest.mark.concurrency
@EXACT_AND_CONTROL
async def test_a_storm_of_validations_admits_exactly_the_rate_limit(
    client: APIKeyClient, db_url: str, backend: str, lock_pass: bool
) -> None:
    issued = await client.create_key(
        (await client.create_organization("A")).id, rate_limits=[RateLimit(100, "minute")]
    )
    at = datetime(2026, 1, 15, 12, 0, 15, tzinfo=UTC).isoformat()  # one instant everywhere
    # Known rate-limited in every process: the first call takes the read path.
    admitted = _storm(db_url, "validate", issued.plaintext, None, 64, lock_pass, at)
    _report(backend, lock_pass, "4x64 validations on a limit of 100/minute", admitted)
    if lock_pass:
        assert admitted == 100
        assert (await client.get_key(issued.id)).use_count == 100
    else:
        assert admitted > 100


def _report(backend: str, lock_pass: bool, what: str, admitted: int) -> None:
    if backend == "mariadb":
        how = "one compound statement"
    else:
        how = "one statement" if lock_pass else "one statement WITHOUT its lock pass"
    REPORT.append(f"{backend}: {how}, {what} -> admitted={admitted}")


@ON_EVERY_SERVER
@pytest.mark.concurrency
async def test_one_statement_idempotent_and_transactional_charges_share_a_budget_exactly(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    # Mixed traffic on the same rows, the org's budget: charges (one statement)
    # and idempotent charges (one statement with its operation's row) through a
    # key, and both kinds by a keyless identity (a transaction on every database).
    org = (await client.create_organization("A")).id
    await client.set_budget(org, Budget(D("1.00")))
    key = await client.create_key(org, budgets=[Budget(D("0.80"))])
    identity, _ = await client.get_or_create_identity(org, "ada")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=ctx) as pool:
        jobs = [
            pool.submit(_workers.storm, db_url, op, payer, "0.01", 64)
            for op in ("charge", "idempotent charge")
            for payer in (key.id, identity.id)
        ]
        admitted = sum(job.result() for job in jobs)
    (status,) = await client.get_budgets(org)
    ledger_lines = await assert_balances_match_ledger(client)
    REPORT.append(
        f"{backend}: 64 one-statement + 64 idempotent one-statement charges by a key, and "
        f"64 + 64 transactional charges by a keyless identity, of 0.01 on an org budget "
        f"of 1.00 -> admitted={admitted}, org used={status.used}; {'; '.join(ledger_lines)}"
    )
    assert admitted == 100 and status.used == D("1.00")
