"""Behind a transaction pooler: PgBouncer in ``pool_mode = transaction``.

Every test that takes the ``database`` fixture also runs through PgBouncer (the
``pgbouncer`` database: the same PostgreSQL, reached through
``?transaction_pooler=true``). These are the tests about the pooler itself: what
keycap leaves on the server connections, what a client not told about the pooler
says, and the settings that cannot work there.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from decimal import Decimal as D
from typing import Any

import pytest
from asyncpg.connection import Connection, _StatementCache
from sqlalchemy import text
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
from sqlalchemy.ext.asyncio import create_async_engine

from keycap import APIKeyClient, Budget, ConfigurationError, KeycapError, RateLimit
from keycap._db.engine import create_engine, normalize_url
from tests.conftest import DATABASES, SECRET, _create_tables, app_engine, server_url

needs_pgbouncer = pytest.mark.skipif(
    "pgbouncer" not in DATABASES, reason="PgBouncer is not among KEYCAP_TEST_DATABASES"
)


def _pgbouncer(database: str = "keycap_pooler") -> str:
    """The PgBouncer URL of ``database``, without keycap's pooler flag.

    Clients set up wrongly leave statements prepared on PgBouncer's server
    connections, so they get a database of their own (``keycap_pooler``, which
    scripts/databases creates): keycap_test's connections stay clean for the
    test that counts what is left there."""
    base = os.environ["KEYCAP_TEST_PGBOUNCER_URL"].rstrip("/")
    return f"{base}/{database}"


@pytest.fixture(scope="module")
def _pooler_tables(tmp_path_factory: pytest.TempPathFactory) -> None:
    """keycap's tables in keycap_pooler as this keycap has them (a database kept
    between runs may hold an older keycap's), made on PostgreSQL directly."""
    tmp = tmp_path_factory.mktemp("pooler")
    asyncio.run(_create_tables(server_url("postgresql", "keycap_pooler", tmp)))


async def _storm(client: APIKeyClient, calls: int = 300) -> dict[str, int]:
    """Read, tracked, metered validations and charges at once; errors by type."""
    org = (await client.create_organization(f"storm-{uuid.uuid4()}")).id
    metered = await client.create_key(
        org, budgets=[Budget(D(1000))], rate_limits=[RateLimit(1_000_000, "minute")]
    )
    plain = await client.create_key(org)
    errors: dict[str, int] = {}

    async def one(i: int) -> None:
        try:
            if i % 4 == 0:
                await client.validate_key(plain.plaintext, track_usage=False)
            elif i % 4 == 1:
                await client.validate_key(plain.plaintext)
            elif i % 4 == 2:
                await client.validate_key(metered.plaintext, cost=D("0.01"))
            else:
                await client.charge(metered.id, D("0.01"))
        except KeycapError as error:
            errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1

    await asyncio.gather(*(one(i) for i in range(calls)))
    return errors


async def _prepared_after_storm(client: APIKeyClient) -> set[int]:
    """After a storm, how many statements PgBouncer's server connections hold
    prepared: each transaction may land on any of them, so ask many times."""
    assert await _storm(client) == {}
    prepared = set()
    for _ in range(40):
        async with client.engine.begin() as conn:
            prepared.add(await conn.scalar(text("SELECT count(*) FROM pg_prepared_statements")))
    return prepared


@needs_pgbouncer
async def test_nothing_stays_prepared_on_the_server_connections_after_a_storm() -> None:
    url = server_url("pgbouncer", "keycap_test", tmp=None)  # type: ignore[arg-type]
    async with APIKeyClient(url, signing_secret=SECRET) as client:
        assert await _prepared_after_storm(client) == {0}


@needs_pgbouncer
@pytest.mark.usefixtures("_pooler_tables")
async def test_uuid_statement_names_would_pile_up_on_the_server_connections() -> None:
    # The negative control: SQLAlchemy's documented PgBouncer recipe names each
    # statement with a uuid. asyncpg closes it at the client connection's next
    # statement, often in a later transaction on another server connection, so
    # the servers keep them. keycap prepares unnamed statements instead.
    engine = create_async_engine(
        normalize_url(_pgbouncer() + "?prepared_statement_cache_size=0"),
        connect_args={
            "statement_cache_size": 0,
            "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
        },
    )
    try:
        async with APIKeyClient(engine, signing_secret=SECRET, transaction_pooler=True) as client:
            assert max(await _prepared_after_storm(client)) > 0
    finally:
        await engine.dispose()


@needs_pgbouncer
async def test_a_client_not_told_of_the_pooler_says_so_in_a_configuration_error() -> None:
    async with APIKeyClient(_pgbouncer(), signing_secret=SECRET) as client:
        with pytest.raises(ConfigurationError, match="transaction_pooler=True") as info:
            await client.list_organizations()
    assert "lock_timeout" in str(info.value)  # the startup parameter PgBouncer refused


@needs_pgbouncer
@pytest.mark.usefixtures("_pooler_tables")
async def test_without_the_flag_failures_behind_the_pooler_say_what_to_do() -> None:
    # lock_timeout=None gets past the startup; then asyncpg's named statements meet
    # other server connections: missing there, taken there, or (seen here) another
    # client's statement bound to this call's values, which PostgreSQL may refuse
    # for any reason (22021: a byte sequence invalid in UTF-8). Those it can tell
    # come out as a ConfigurationError that names the setting.
    async with APIKeyClient(_pgbouncer(), signing_secret=SECRET, lock_timeout=None) as client:
        try:
            errors = await _storm(client, calls=200)
        except ConfigurationError as error:  # one of the set-up calls met it
            assert "transaction_pooler=True" in str(error)
            return
    assert errors.get("ConfigurationError", 0) * 2 >= sum(errors.values()), errors
    assert "DatabaseUnavailableError" not in errors


@needs_pgbouncer
async def test_an_engine_the_app_built_by_the_recipe_works_behind_the_pooler() -> None:
    engine, options = app_engine(server_url("pgbouncer", "keycap_test", tmp=None))  # type: ignore[arg-type]
    assert options == {"transaction_pooler": True}
    try:
        async with APIKeyClient(engine, signing_secret=SECRET, **options) as client:
            assert await _storm(client, calls=120) == {}
    finally:
        await engine.dispose()


@needs_pgbouncer
async def test_an_engine_with_statement_caches_is_refused_behind_the_pooler() -> None:
    engine = create_async_engine(normalize_url(_pgbouncer()))
    try:
        async with APIKeyClient(engine, signing_secret=SECRET, transaction_pooler=True) as client:
            with pytest.raises(ConfigurationError, match="prepared_statement_cache_size=0"):
                await client.list_organizations()
    finally:
        await engine.dispose()


def test_the_private_attributes_the_pooler_check_reads_still_exist() -> None:
    # keycap.require_pooler_settings reads these on an engine the app built; a new
    # SQLAlchemy or asyncpg that renames them fails here, not in production.
    def slots(cls: type) -> set[str]:
        return {name for base in cls.__mro__ for name in getattr(base, "__slots__", ())}

    assert {"_prepared_statement_cache", "_prepared_statement_name_func", "_connection"} <= slots(
        AsyncAdapt_asyncpg_connection
    )
    assert "_stmt_cache" in slots(Connection)
    assert callable(_StatementCache.get_max_size)


@pytest.mark.parametrize(
    ("url", "options", "problem"),
    [
        ("postgresql://u@h/db?transaction_pooler=maybe", {}, "must be true or false"),
        ("mysql://u@h/db?transaction_pooler=true", {}, "for PostgreSQL"),
        ("sqlite:///x.db", {"transaction_pooler": True}, "for PostgreSQL"),
        ("postgresql://u@h/db?transaction_pooler=true", {"lock_timeout": 5}, "lock_timeout=None"),
        ("postgresql://u@h/db", {"transaction_pooler": True, "lock_timeout": 1}, "on the role"),
    ],
    ids=["bad-flag", "mysql", "sqlite", "lock-timeout-url", "lock-timeout-arg"],
)
def test_settings_a_pooler_cannot_take_are_refused_when_built(
    url: str, options: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        APIKeyClient(url, signing_secret=SECRET, **options)


def test_the_pooler_flag_never_reaches_the_driver() -> None:
    engine = create_engine("postgresql://u@h/db?transaction_pooler=true")
    assert "transaction_pooler" not in engine.url.query
    assert engine.url.query["prepared_statement_cache_size"] == "0"
    plain = create_engine("postgresql://u@h/db")
    assert "prepared_statement_cache_size" not in plain.url.query
