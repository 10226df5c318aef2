"""One database fixture, parametrized over SQLite, PostgreSQL, MariaDB, and PgBouncer.

URLs come from the environment (scripts/test sets them):
KEYCAP_TEST_DATABASES (default "sqlite"), KEYCAP_TEST_POSTGRES_URL,
KEYCAP_TEST_MARIADB_URL, KEYCAP_TEST_PGBOUNCER_URL (server URLs without a
database name; "pgbouncer" is the same PostgreSQL through PgBouncer in
transaction pooling mode). With KEYCAP_REQUIRE_ALL_DATABASES=1 (scripts/test,
CI) a run that lacks any of them fails at collection: a skipped database is not
a passed one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from keycap import APIKeyClient
from keycap._db.engine import create_engine, normalize_url, pooler_flag
from keycap._db.schema import metadata

SECRET = "test-signing-secret-0123456789-abcdefghij"
ALL_DATABASES = ("sqlite", "postgresql", "mariadb", "pgbouncer")


def _enabled() -> tuple[str, ...]:
    names = tuple(
        n.strip() for n in os.environ.get("KEYCAP_TEST_DATABASES", "sqlite").split(",") if n.strip()
    )
    unknown = set(names) - set(ALL_DATABASES)
    if unknown:
        raise pytest.UsageError(f"unknown KEYCAP_TEST_DATABASES entries: {sorted(unknown)}")
    if os.environ.get("KEYCAP_REQUIRE_ALL_DATABASES") == "1" and set(names) != set(ALL_DATABASES):
        raise pytest.UsageError(
            f"KEYCAP_REQUIRE_ALL_DATABASES=1 but only {names} are configured; run scripts/test"
        )
    return names


DATABASES = _enabled()


def server_url(name: str, database: str, tmp: Path) -> str:
    """The URL of ``database`` on the named backend (a file under ``tmp`` for SQLite)."""
    if name == "sqlite":
        return f"sqlite:///{tmp / (database + '.db')}"
    env = {
        "postgresql": "KEYCAP_TEST_POSTGRES_URL",
        "mariadb": "KEYCAP_TEST_MARIADB_URL",
        "pgbouncer": "KEYCAP_TEST_PGBOUNCER_URL",
    }[name]
    base = os.environ.get(env)
    if not base:
        raise pytest.UsageError(f"{name} is enabled but {env} is not set")
    url = f"{base.rstrip('/')}/{database}"
    # PostgreSQL through PgBouncer in transaction pooling mode: keycap is told so in
    # the URL, as a user's configuration would.
    return url + "?transaction_pooler=true" if name == "pgbouncer" else url


def app_engine(db_url: str, **kwargs: Any) -> tuple[AsyncEngine, dict[str, Any]]:
    """An engine the app builds itself for ``db_url``, and the client options that go
    with it: behind PgBouncer, docs/deployment.md's recipe and ``transaction_pooler``."""
    url = normalize_url(db_url)
    if not pooler_flag(url):
        return create_async_engine(url, **kwargs), {}
    url = url.difference_update_query(["transaction_pooler"])
    engine = create_async_engine(
        url.update_query_dict({"prepared_statement_cache_size": "0"}),
        connect_args={"statement_cache_size": 0, "prepared_statement_name_func": lambda: ""},
        **kwargs,
    )
    return engine, {"transaction_pooler": True}


def pytest_report_header() -> str:
    return "keycap databases: " + ", ".join(DATABASES)


@dataclass
class FakeClock:
    """An injectable clock: ``clock()`` returns ``now``; ``advance`` moves it."""

    now: datetime = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


async def _create_tables(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.drop_all)
            await conn.run_sync(metadata.create_all)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keycap")


@pytest.fixture(scope="session", params=DATABASES)
def database(request: pytest.FixtureRequest, session_tmp: Path) -> Iterator[tuple[str, str]]:
    """``(backend name, URL)`` of a database with keycap's tables, once per session."""
    name: str = request.param
    url = server_url(name, "keycap_test", session_tmp)
    asyncio.run(_create_tables(url))
    yield name, url


@pytest.fixture
def backend(database: tuple[str, str]) -> str:
    return database[0]


@pytest.fixture
def db_url(database: tuple[str, str]) -> str:
    return database[1]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(db_url: str, clock: FakeClock) -> AsyncIterator[APIKeyClient]:
    """A client on an emptied database, with the fake clock."""
    async with APIKeyClient(db_url, signing_secret=SECRET, clock=clock) as c:
        async with c.engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                await conn.execute(delete(table))
        yield c


#: Lines the concurrency tests report (admitted counts, final values); printed at the end.
REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("keycap concurrency results")
        for line in REPORT:
            terminalreporter.write_line(line)
