"""SQLite's units of work in one call into aiosqlite's thread (``keycap._db.inthread``):
what must still hold there: the caller's context, rollbacks, engine events, a unit
that awaits more than the database, and the internals it reads."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.pool.base import _ConnectionFairy

from keycap import APIKeyClient, Budget, DatabaseError
from keycap._db import inthread
from keycap._db.schema import organizations
from tests._roundtrips import count_sqlite_hops
from tests.conftest import SECRET, FakeClock


@pytest.fixture
async def lite(tmp_path: Path, clock: FakeClock) -> AsyncIterator[APIKeyClient]:
    async with APIKeyClient(
        f"sqlite:///{tmp_path / 'inthread.db'}", signing_secret=SECRET, clock=clock
    ) as client:
        await client.create_tables()
        yield client


def test_the_internals_the_sqlite_thread_path_reads_still_exist() -> None:
    # A new aiosqlite or SQLAlchemy that renames these fails here, not in production.
    assert callable(aiosqlite.Connection._execute)
    assert isinstance(inspect.getattr_static(aiosqlite.Connection, "_conn"), property)
    assert "transaction_was_reset" in inspect.signature(_ConnectionFairy._checkin).parameters


async def _count(client: APIKeyClient) -> int:
    async with client.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(organizations))).scalar())


def _org(name: str, clock: FakeClock) -> dict[str, Any]:
    return {"id": f"org_{name:0>16}", "name": name, "created_at": clock()}


async def test_a_unit_runs_in_one_call_and_commits(lite: APIKeyClient, clock: FakeClock) -> None:
    db = lite._db

    async def unit() -> int:
        async with db.begin() as conn:
            await conn.execute(insert(organizations), [_org("a", clock), _org("b", clock)])
            return int(await conn.scalar(select(func.count()).select_from(organizations)))

    with count_sqlite_hops() as hops:
        assert await db.guarded(unit) == 2
    assert hops[0] == 1
    assert await _count(lite) == 2


async def test_a_failing_unit_rolls_back_and_leaves_the_connection_clean(
    lite: APIKeyClient, clock: FakeClock
) -> None:
    db = lite._db

    async def unit() -> None:
        async with db.begin() as conn:
            await conn.execute(insert(organizations), [_org("a", clock)])
            raise ValueError("the unit's own error")

    for _ in range(3):  # the pool's one connection, used again each time
        with pytest.raises(ValueError, match="own error"):
            await db.guarded(unit)
    assert await _count(lite) == 0
    await lite.create_organization("after")
    assert await _count(lite) == 1


@pytest.mark.parametrize("awaits", ["a yield to the loop", "a timer on the loop"])
async def test_a_unit_that_awaits_more_than_the_database_runs_the_usual_way(
    lite: APIKeyClient, clock: FakeClock, awaits: str
) -> None:
    db = lite._db
    runs = 0

    async def unit() -> int:
        nonlocal runs
        runs += 1
        async with db.begin() as conn:
            await conn.execute(insert(organizations), [_org(f"r{runs}", clock)])
            await (asyncio.sleep(0) if awaits == "a yield to the loop" else asyncio.sleep(0.001))
            return int(await conn.scalar(select(func.count()).select_from(organizations)))

    assert await db.guarded(unit) == 1  # the first run was rolled back
    assert runs == 2
    assert await _count(lite) == 1


async def test_a_unit_that_waits_after_it_committed_is_an_error_not_a_repeat(
    lite: APIKeyClient, clock: FakeClock
) -> None:
    db = lite._db

    async def unit() -> None:
        async with db.begin() as conn:
            await conn.execute(insert(organizations), [_org("once", clock)])
        await asyncio.sleep(0)

    with pytest.raises(DatabaseError, match="after it committed"):
        await db.guarded(unit)
    assert await _count(lite) == 1  # committed once, never run again


async def test_the_callers_context_reaches_the_thread(lite: APIKeyClient) -> None:
    with lite.acting_as("alice@acme"):
        org = await lite.create_organization("A")
    (entry,) = [e for e in await lite.audit_log(org.id) if e.subject_id == org.id]
    assert entry.actor == "alice@acme"


async def test_a_listener_on_the_engine_sees_every_statement_on_sqlite(
    lite: APIKeyClient,
) -> None:
    org = (await lite.create_organization("A")).id
    issued = await lite.create_key(org, budgets=[Budget(D(1))])
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(lite.engine.sync_engine, "before_cursor_execute", before)
    try:
        with count_sqlite_hops() as hops:
            await lite.validate_key(issued.plaintext, cost=D("0.01"))
    finally:
        event.remove(lite.engine.sync_engine, "before_cursor_execute", before)
    assert any(s.startswith("UPDATE keycap_budgets") for s in seen)
    assert hops[0] > 1  # the usual way: the thread's engine would not tell it
    assert inthread.active() is None
