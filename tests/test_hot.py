"""The hot path's execution layer (``keycap._db.hot``): statements compiled once
and run on the pool's driver connection (asyncpg; aiomysql for reads), and
everything that must still hold there: types, errors, lost connections,
statements prepared before a table changed, open transactions, engine events,
and the SQLAlchemy internals it reads."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal as D
from typing import Any

import asyncpg
import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    MetaData,
    String,
    Table,
    event,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects.mysql.aiomysql import AsyncAdapt_aiomysql_connection
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
from sqlalchemy.engine import make_url
from sqlalchemy.pool import Pool
from sqlalchemy.sql.compiler import SQLCompiler

from keycap import APIKeyClient, Budget, DatabaseUnavailableError, RateLimit
from keycap._db.engine import Database
from keycap._db.hot import Hot
from keycap._db.schema import ledger
from tests.conftest import DATABASES, SECRET, FakeClock, server_url


async def _client_on(backend: str, tmp_path: Any, clock: FakeClock) -> AsyncIterator[APIKeyClient]:
    if backend not in DATABASES:
        pytest.skip(f"needs {backend}")
    url = server_url(backend, "keycap_test", tmp_path)
    async with APIKeyClient(url, signing_secret=SECRET, clock=clock) as client:
        yield client


@pytest.fixture
async def pg(tmp_path: Any, clock: FakeClock) -> AsyncIterator[APIKeyClient]:
    async for client in _client_on("postgresql", tmp_path, clock):
        yield client


@pytest.fixture
async def maria(tmp_path: Any, clock: FakeClock) -> AsyncIterator[APIKeyClient]:
    async for client in _client_on("mariadb", tmp_path, clock):
        yield client


async def _admin(client: APIKeyClient) -> asyncpg.Connection:
    u = make_url(client.engine.url)
    return await asyncpg.connect(
        user=u.username, password=u.password, host=u.host, port=u.port, database=u.database
    )


def test_the_internals_the_hot_path_reads_still_exist() -> None:
    # A new SQLAlchemy that renames these fails here, not in production.
    assert hasattr(SQLCompiler, "_bind_processors")
    assert callable(AsyncAdapt_asyncpg_connection._handle_exception)
    assert callable(AsyncAdapt_aiomysql_connection._handle_exception)
    assert callable(Pool._invalidate)


async def test_every_hot_call_runs_on_the_pools_driver_connection(
    pg: APIKeyClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    org = (await pg.create_organization(f"hot-{uuid.uuid4()}")).id
    key = await pg.create_key(org, budgets=[Budget(D(10))])
    limited = await pg.create_key(org, rate_limits=[RateLimit(100, "minute")])
    await pg.validate_key(limited.plaintext)  # now known to be rate-limited
    seen: list[str] = []
    rows = Hot.rows

    async def counted(self: Hot, stmt: Any, params: Any) -> Any:
        seen.append(type(stmt).__name__)
        return await rows(self, stmt, params)

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a hot call took SQLAlchemy's connection")

    monkeypatch.setattr(Hot, "rows", counted)
    for way in ("begin", "autocommit", "reading"):
        monkeypatch.setattr(Database, way, refused)
    await pg.validate_key(key.plaintext, track_usage=False)  # the read path
    await pg.validate_key(key.plaintext)  # tracked
    await pg.validate_key(key.plaintext, cost=D("0.01"))  # metered
    await pg.validate_key(limited.plaintext)  # rate-limited
    await pg.charge(key.id, D("0.01"))
    hold = await pg.reserve(key.id, D("0.10"))
    await pg.settle(hold.id, D("0.05"))
    await pg.release((await pg.reserve(key.id, D("0.10"))).id)
    assert seen == ["Select", "Update"] + ["Select"] * 7, seen


async def test_a_listener_on_the_engine_sees_the_hot_statements(pg: APIKeyClient) -> None:
    # SQL instrumentation hooks the engine's execution events, which the hot path
    # does not fire: with a listener, statements take SQLAlchemy's own path.
    org = (await pg.create_organization(f"hot-{uuid.uuid4()}")).id
    key = await pg.create_key(org, budgets=[Budget(D(10))])
    statements: list[str] = []

    def listen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(pg.engine.sync_engine, "before_cursor_execute", listen)
    try:
        charge = await pg.charge(key.id, D("0.01"))
    finally:
        event.remove(pg.engine.sync_engine, "before_cursor_execute", listen)
    assert charge.amounts == {"spend": D("0.01")}
    assert any("hot_key" in s for s in statements)
    statements.clear()
    await pg.charge(key.id, D("0.01"))
    assert statements == []  # the listener is gone: the hot path again


async def test_metadata_and_times_keep_their_types_through_the_hot_path(
    pg: APIKeyClient, clock: FakeClock
) -> None:
    org = (await pg.create_organization(f"hot-{uuid.uuid4()}")).id
    key = await pg.create_key(org, budgets=[Budget(D(10))], metadata={"tier": "gold", "n": 3})
    await pg.charge(key.id, D("0.01"), metadata={"request": "r-1", "tokens": 120})
    async with pg.engine.connect() as conn:
        entry = (await conn.execute(select(ledger).where(ledger.c.key_id == key.id))).one()
    assert entry.metadata == {"request": "r-1", "tokens": 120}
    assert entry.created_at == clock.now
    validated = await pg.validate_key(key.plaintext, track_usage=False)
    assert validated.metadata == {"tier": "gold", "n": 3}
    assert validated.created_at.tzinfo is not None
    tracked = await pg.validate_key(key.plaintext)
    assert tracked.last_used_at == clock.now and tracked.use_count == 1


async def test_a_statement_prepared_before_its_table_changed_is_prepared_again(
    pg: APIKeyClient,
) -> None:
    table = Table(
        f"keycap_hot_probe_{uuid.uuid4().hex[:8]}",
        MetaData(),
        Column("id", String(8), primary_key=True),
        Column("n", BigInteger()),
    )
    db = pg._db
    async with pg.engine.begin() as conn:
        await conn.run_sync(table.create)
        await conn.execute(table.insert().values(id="a", n=1))
    try:
        stmt = select(table.c.n).where(table.c.id == "a")
        assert [r.n for r in await db.rows(stmt, {})] == [1]
        async with pg.engine.begin() as conn:  # a new result type for the prepared plan
            await conn.execute(text(f"ALTER TABLE {table.name} ALTER COLUMN n TYPE text"))
        assert [r.n for r in await db.rows(stmt, {})] == ["1"]
    finally:
        async with pg.engine.begin() as conn:
            await conn.run_sync(table.drop)


async def test_a_connection_the_server_dropped_fails_a_write_once_and_a_read_not_at_all(
    pg: APIKeyClient,
) -> None:
    org = (await pg.create_organization(f"hot-{uuid.uuid4()}")).id
    key = await pg.create_key(org, budgets=[Budget(D(10))])
    admin = await _admin(pg)
    pid = select(func.pg_backend_pid().label("pid"))
    try:
        # The pool holds one idle connection: drop it under the client.
        [row] = await pg._db.rows(pid, {})
        await admin.execute("SELECT pg_terminate_backend($1)", row.pid)
        found = await pg.validate_key(key.plaintext, track_usage=False)  # tried again
        assert found.id == key.id
        [row] = await pg._db.rows(pid, {})
        await admin.execute("SELECT pg_terminate_backend($1)", row.pid)
        with pytest.raises(DatabaseUnavailableError) as caught:
            await pg.charge(key.id, D("0.01"))  # a write is never repeated
        assert caught.value.code == "database_unavailable"
        assert (await pg.charge(key.id, D("0.01"))).amounts == {"spend": D("0.01")}
    finally:
        await admin.close()


async def test_a_driver_error_comes_out_as_keycaps_own(pg: APIKeyClient) -> None:
    from keycap import DatabaseError

    with pytest.raises(DatabaseError) as caught:
        await pg._db.rows(select(text("1/0 AS x")), {})
    assert "DivisionByZero" in str(caught.value) or "division" in str(caught.value).lower()
    assert caught.value.__cause__ is not None


async def test_a_read_on_mariadb_keeps_its_types_and_leaves_no_transaction_open(
    maria: APIKeyClient, clock: FakeClock
) -> None:
    org = (await maria.create_organization(f"hot-{uuid.uuid4()}")).id
    key = await maria.create_key(org, metadata={"tier": "gold", "n": 3}, expires_in="1d")
    validated = await maria.validate_key(key.plaintext, track_usage=False)
    assert validated.metadata == {"tier": "gold", "n": 3}
    assert validated.created_at == clock.now and validated.expires_at is not None
    assert validated.expires_at.tzinfo is not None
    async with maria.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert not raw.driver_connection.server_status & 1  # SERVER_STATUS_IN_TRANS


async def test_a_failed_read_on_mariadb_leaves_the_connection_clean(maria: APIKeyClient) -> None:
    from keycap import DatabaseError

    with pytest.raises(DatabaseError):
        await maria._db.read_rows(select(literal_column("no_such_column")), {})
    org = await maria.create_organization(f"hot-{uuid.uuid4()}")
    assert (await maria.get_organization(org.id)).name == org.name
    [row] = await maria._db.read_rows(select(literal_column("1").label("one")), {})
    assert row.one == 1
