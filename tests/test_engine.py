"""URLs, drivers, engines the app owns, and what an unreachable database looks like."""

import asyncio
import gc
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from keycap import (
    APIKeyClient,
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailableError,
)
from keycap._db.engine import normalize_url
from keycap._rules.tokens import KeyFormat
from tests.conftest import DATABASES, SECRET, app_engine, server_url


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("sqlite:///app.db", "sqlite+aiosqlite:///app.db"),
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("mysql://u@h/db", "mysql+aiomysql://u@h/db?charset=utf8mb4"),
        ("mariadb://u@h/db", "mariadb+aiomysql://u@h/db?charset=utf8mb4"),
        ("mysql+asyncmy://u@h/db?charset=utf8mb4", "mysql+asyncmy://u@h/db?charset=utf8mb4"),
    ],
)
def test_plain_urls_map_to_async_drivers(raw: str, expected: str) -> None:
    assert normalize_url(raw).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "postgresql+psycopg2://u:secretpw@h/db",
        "mysql+pymysql://u:secretpw@h/db",
        "mysql+mysqldb://u:secretpw@h/db",
        "sqlite+pysqlite:///x.db",
        "oracle://u:secretpw@h/db",
        "not a url secretpw",
        "",
        None,
        42,
    ],
)
def test_bad_urls_are_configuration_errors_that_hide_passwords(raw: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        APIKeyClient(raw, signing_secret=SECRET)  # type: ignore[arg-type]
    assert "secretpw" not in str(info.value)


async def test_an_app_owned_engine_is_not_disposed(db_url: str) -> None:
    engine, options = app_engine(db_url)
    async with APIKeyClient(engine, signing_secret=SECRET, **options) as client:
        await client.list_organizations()
    async with engine.connect() as conn:  # still usable
        await conn.exec_driver_sql("SELECT 1")
    await engine.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://keycap:secretpw@127.0.0.1:1/keycap",
        "mysql://keycap:secretpw@127.0.0.1:1/keycap",
        "sqlite:////nonexistent-dir/sub/keycap.db",
    ],
)
async def test_unreachable_database_is_typed_and_hides_the_password(url: str) -> None:
    async with APIKeyClient(url, signing_secret=SECRET) as client:
        with pytest.raises(DatabaseUnavailableError) as info:
            await client.validate_key(KeyFormat().generate()[1])  # well formed: reaches I/O
        with pytest.raises(DatabaseUnavailableError):
            await client.list_organizations()
        with pytest.raises(DatabaseUnavailableError):
            await client.create_organization("A")
    assert "secretpw" not in str(info.value) and "secretpw" not in repr(info.value)
    # A failed aiosqlite connect leaves its Connection to the garbage collector;
    # collect it while this test's loop is alive, or its worker thread calls back
    # into a closed loop during a later test (a known aiosqlite race).
    gc.collect()
    await asyncio.sleep(0)


@pytest.mark.skipif("postgresql" not in DATABASES, reason="needs the test PostgreSQL")
async def test_too_many_clients_is_database_unavailable(session_tmp: Path) -> None:
    """PostgreSQL refusing a connection for lack of slots (SQLSTATE 53300) is an
    outage to retry later, not a bug: database_unavailable, like a refused socket."""
    url = make_url(server_url("postgresql", "keycap_test", session_tmp))
    admin = create_async_engine(url.set(drivername="postgresql+asyncpg"))
    async with admin.begin() as conn:
        await conn.exec_driver_sql("DROP ROLE IF EXISTS keycap_full")
        await conn.exec_driver_sql(
            "CREATE ROLE keycap_full LOGIN PASSWORD 'fullpw' CONNECTION LIMIT 0"
        )
    try:
        full = url.set(username="keycap_full", password="fullpw")
        async with APIKeyClient(full.render_as_string(False), signing_secret=SECRET) as client:
            with pytest.raises(DatabaseUnavailableError) as info:
                await client.list_organizations()
        assert info.value.code == "database_unavailable"
        assert "too many connections" in str(info.value) and "fullpw" not in str(info.value)
    finally:
        async with admin.begin() as conn:
            await conn.exec_driver_sql("DROP ROLE keycap_full")
        await admin.dispose()


async def test_missing_tables_are_a_database_error(tmp_path: object) -> None:
    async with APIKeyClient(f"sqlite:///{tmp_path}/empty.db", signing_secret=SECRET) as client:
        with pytest.raises(DatabaseError) as info:
            await client.list_organizations()
    assert not isinstance(info.value, DatabaseUnavailableError)


async def test_in_memory_sqlite_works_for_quick_experiments() -> None:
    async with APIKeyClient("sqlite://", signing_secret=SECRET) as client:
        await client.create_tables()
        org = await client.create_organization("A")
        issued = await client.create_key(org.id)
        assert (await client.validate_key(issued.plaintext)).use_count == 1


async def test_a_broken_clock_is_a_configuration_error(db_url: str) -> None:
    from datetime import datetime

    with pytest.raises(ConfigurationError):
        APIKeyClient(db_url, signing_secret=SECRET, clock="now")  # type: ignore[arg-type]
    async with APIKeyClient(db_url, signing_secret=SECRET, clock=datetime.now) as client:
        with pytest.raises(ConfigurationError, match="clock"):
            await client.create_organization("A")  # datetime.now() is naive


async def test_the_url_sizes_the_pool_and_keeps_it_under_concurrency(db_url: str) -> None:
    # SQLAlchemy's default pool keeps 5 connections and closes the rest as they
    # are returned: 16 concurrent callers would reopen connections all the time.
    joiner = "&" if "?" in db_url else "?"
    async with APIKeyClient(
        f"{db_url}{joiner}pool_size=16&max_overflow=4", signing_secret=SECRET
    ) as client:
        pool = client.engine.pool
        assert (pool.size(), pool._max_overflow) == (16, 4)  # type: ignore[attr-defined]
        assert "pool_size" not in client.engine.url.query
        org = (await client.create_organization("pooled")).id
        await asyncio.gather(*(client.get_organization(org) for _ in range(16)))
        opened = pool.checkedin()
        await asyncio.gather(*(client.get_organization(org) for _ in range(16)))
        assert pool.checkedin() == opened  # kept, not closed and reopened


@pytest.mark.parametrize(
    "query",
    ["pool_size=0", "pool_size=x", "max_overflow=-1", "pool_size=10001", "pool_size=1.5"],
)
def test_a_bad_pool_size_in_the_url_is_a_configuration_error(query: str) -> None:
    with pytest.raises(ConfigurationError, match="whole number"):
        APIKeyClient(f"postgresql://u:secret@localhost/db?{query}", signing_secret=SECRET)


def test_an_in_memory_sqlite_database_has_no_pool_to_size() -> None:
    with pytest.raises(ConfigurationError, match="no pool"):
        APIKeyClient("sqlite://?pool_size=3", signing_secret=SECRET)
