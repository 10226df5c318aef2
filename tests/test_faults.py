"""Faults: cancelled calls, a database that hangs, a restart, contention's tail.

The frozen-server and restart tests run against a private PostgreSQL they start
and stop themselves (tests/_private_pg.py); the others on every database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator
from decimal import Decimal as D
from typing import Any

import pytest
from sqlalchemy import update

from keycap import (
    APIKeyClient,
    Budget,
    DatabaseUnavailableError,
    KeycapError,
    PendingSettlement,
    RateLimit,
)
from keycap._db.engine import create_engine
from keycap._db.schema import keys as keys_table
from tests import _private_pg
from tests._ledger import assert_balances_match_ledger
from tests.conftest import SECRET

needs_private_postgres = pytest.mark.skipif(
    not _private_pg.available() and os.environ.get("KEYCAP_REQUIRE_ALL_DATABASES") != "1",
    reason="needs PostgreSQL 15's initdb (scripts/test installs it)",
)


async def _settled(client: APIKeyClient, seconds: float = 10) -> None:
    """Wait until no connection is checked out: every call whose caller gave up is done."""
    deadline = time.monotonic() + seconds
    pool: Any = client.engine.pool
    while pool.checkedout() and time.monotonic() < deadline:  # noqa: ASYNC110 - no event to wait on
        await asyncio.sleep(0.02)
    assert pool.checkedout() == 0


async def test_cancelled_calls_hold_no_lock_and_no_connection_and_keep_the_ledger_exact(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(
        org, budgets=[Budget(D(1000))], rate_limits=[RateLimit(10**6, "minute")]
    )
    hold = await client.reserve(issued.id, D(1))
    rng = random.Random(7)
    calls = [
        lambda: client.charge(issued.id, D("0.01")),
        lambda: client.validate_key(issued.plaintext, cost=D("0.01")),
        lambda: client.reserve(issued.id, D("0.02")),
        lambda: client.validate_key(issued.plaintext),
        lambda: client.settle(hold.id, D("0.5"), idempotency_key="s"),
    ]
    for round_ in range(80):
        task = asyncio.ensure_future(calls[round_ % len(calls)]())
        await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.001, 0.002, 0.004, 0.008]))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, KeycapError):
            await task
    await _settled(client)
    # Another client is not kept waiting by anything the cancelled calls began.
    async with APIKeyClient(db_url, signing_secret=SECRET) as other:
        started = time.monotonic()
        await asyncio.wait_for(other.charge(issued.id, D("0.01")), timeout=10)
        assert time.monotonic() - started < 2
    await assert_balances_match_ledger(client)


async def test_mixed_traffic_on_one_budget_ends_every_call_within_the_timeout(
    db_url: str, backend: str
) -> None:
    timeout = 3.0
    async with APIKeyClient(db_url, signing_secret=SECRET, timeout=timeout) as client:
        org = (await client.create_organization(f"tail-{random.random()}")).id
        await client.set_budget(org, Budget(D(2)))
        keys = [await client.create_key(org) for _ in range(4)]
        worst = 0.0
        outcomes: dict[str, int] = {}

        async def one(i: int) -> None:
            nonlocal worst
            key = keys[i % len(keys)]
            started = time.monotonic()
            try:
                if i % 3 == 0:
                    await client.charge(key.id, D("0.03"))
                elif i % 3 == 1:
                    await client.validate_key(key.plaintext, cost=D("0.02"))
                else:
                    hold = await client.reserve(key.id, D("0.05"))
                    await client.settle(hold.id, D("0.04"))
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except KeycapError as error:
                outcomes[error.code] = outcomes.get(error.code, 0) + 1
            worst = max(worst, time.monotonic() - started)

        calls = 120 if backend == "sqlite" else 300
        await asyncio.gather(*(one(i) for i in range(calls)))
        assert worst < 2 * timeout + 1, (worst, outcomes)  # reserve + settle: two calls
        assert outcomes.get("ok", 0) > 0 and "budget_exceeded" in outcomes
        await _settled(client)
        await assert_balances_match_ledger(client)


async def test_a_row_locked_elsewhere_is_unavailable_within_the_timeout(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    issued = await client.create_key((await client.create_organization("A")).id)
    holder = create_engine(db_url)
    # Behind PgBouncer the lock timeout is the server's: the call's own bounds the wait.
    lock_timeout = None if backend == "pgbouncer" else 1.0
    try:
        async with APIKeyClient(
            db_url, signing_secret=SECRET, timeout=3.0, lock_timeout=lock_timeout
        ) as waiting:
            async with holder.begin() as conn:  # holds the key's row lock (SQLite: the file's)
                await conn.execute(
                    update(keys_table).where(keys_table.c.id == issued.id).values(name="held")
                )
                started = time.monotonic()
                with pytest.raises(DatabaseUnavailableError):
                    await waiting.charge(issued.id, D("0.01"))
                assert time.monotonic() - started < 4.5
            await waiting.charge(issued.id, D("0.01"))  # released: it goes through
    finally:
        await holder.dispose()


@pytest.fixture
async def private_client() -> AsyncIterator[tuple[Any, APIKeyClient]]:
    with _private_pg.private_postgres() as server:
        client = APIKeyClient(server.url, signing_secret=SECRET, timeout=1.0)
        try:
            await client.create_tables()
            yield server, client
        finally:
            server.thaw()
            await client.aclose()


@needs_private_postgres
async def test_a_frozen_database_is_unavailable_within_the_timeout_and_recovers(
    private_client: tuple[Any, APIKeyClient],
) -> None:
    server, client = private_client
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, budgets=[Budget(D(10))])
    server.freeze()  # SIGSTOP: connections stay open, nothing answers
    for call in (
        lambda: client.validate_key(issued.plaintext),
        lambda: client.charge(issued.id, D("0.01")),
        lambda: client.create_key(org),
    ):
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError):
            await call()
        assert time.monotonic() - started < 1.5  # the timeout is 1 s
    server.thaw()
    await asyncio.sleep(1.5)  # the calls given up on end by their own timeouts
    await client.validate_key(issued.plaintext)
    await client.charge(issued.id, D("0.01"))
    await _settled(client)
    await assert_balances_match_ledger(client)


@needs_private_postgres
async def test_after_a_restart_stale_connections_fail_no_read(
    private_client: tuple[Any, APIKeyClient],
) -> None:
    server, client = private_client
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org)
    # Fill the pool with connections that the restart will make stale.
    await asyncio.gather(*(client.validate_key(issued.plaintext) for _ in range(15)))
    server.restart()
    failed = 0
    for _ in range(20):
        results = await asyncio.gather(
            *(client.validate_key(issued.plaintext, track_usage=False) for _ in range(15)),
            return_exceptions=True,
        )
        failed += sum(isinstance(r, BaseException) for r in results)
    assert failed == 0
    # A write is not retried (it might have been applied), so the first tracked
    # validations may meet stale connections once each, never more.
    server.restart()
    results = await asyncio.gather(
        *(client.validate_key(issued.plaintext) for _ in range(300)), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(e, DatabaseUnavailableError) for e in errors)
    assert len(errors) <= 15


@needs_private_postgres
async def test_a_settlement_made_during_an_outage_is_kept_and_written_after_it(
    private_client: tuple[Any, APIKeyClient],
) -> None:
    server, _ = private_client
    handed: list[PendingSettlement] = []

    async def persist(pending: PendingSettlement) -> None:
        handed.append(pending)

    async with APIKeyClient(
        server.url, signing_secret=SECRET, timeout=1.0, on_unsettled=persist
    ) as client:
        org = (await client.create_organization("A")).id
        issued = await client.create_key(org, budgets=[Budget(D(10))])
        hold = await client.reserve(issued.id, D("1.00"))
        server.freeze()
        try:
            assert await client.settle_eventually(hold.id, D("0.40")) is None
            assert [p.hold_id for p in client.pending_settlements] == [hold.id]
            assert [(p.hold_id, p.actual) for p in handed] == [(hold.id, D("0.40"))]
        finally:
            server.thaw()
        deadline = time.monotonic() + 15
        while client.pending_settlements and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # retried on its own, with backoff
        assert client.pending_settlements == ()
        assert (await client.get_hold(hold.id)).status == "settled"
        [budget] = await client.get_budgets(issued.id)
        assert (budget.used, budget.held) == (D("0.40"), 0)
        await _settled(client)
        await assert_balances_match_ledger(client)
