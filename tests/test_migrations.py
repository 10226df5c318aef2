"""keycap's shipped Alembic migrations on every database, beside an app's own tables."""

import asyncio
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Column, Integer, MetaData, Table, inspect

import keycap.migrations as migrations
from keycap import APIKeyClient
from keycap._db.engine import create_engine
from keycap._db.schema import metadata as keycap_metadata
from tests._run import python
from tests.conftest import SECRET, server_url

ROOT = Path(__file__).resolve().parent.parent


async def _reset_with_app_table(url: str) -> None:
    """Empty the database, then add one table of 'the app' that keycap must not touch."""
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            existing = MetaData()
            await conn.run_sync(existing.reflect)
            await conn.run_sync(existing.drop_all)
            app = MetaData()
            Table("app_users", app, Column("id", Integer, primary_key=True))
            await conn.run_sync(app.create_all)
    finally:
        await engine.dispose()


async def _table_names(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


@pytest.fixture
def migrations_url(backend: str, tmp_path: Path) -> Iterator[str]:
    url = server_url(backend, "keycap_migrations", tmp_path)
    asyncio.run(_reset_with_app_table(url))
    yield url


KEYCAP_TABLES = {t.name for t in keycap_metadata.sorted_tables}


def test_upgrade_check_downgrade_upgrade(migrations_url: str) -> None:
    cfg = migrations.config(migrations_url)
    command.upgrade(cfg, "head")
    assert asyncio.run(_table_names(migrations_url)) == {
        *KEYCAP_TABLES,
        "app_users",
        "keycap_alembic_version",
    }
    command.check(cfg)  # raises if the models and the migrated schema differ
    command.downgrade(cfg, "base")
    assert asyncio.run(_table_names(migrations_url)) == {"app_users", "keycap_alembic_version"}
    command.upgrade(cfg, "head")
    command.check(cfg)
    assert "app_users" in asyncio.run(_table_names(migrations_url))


def test_alembic_upgrade_head_from_the_repo_root(migrations_url: str) -> None:
    env = {**os.environ, "KEYCAP_DATABASE_URL": migrations_url}
    result = python("-m", "alembic", "upgrade", "head", cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert asyncio.run(_table_names(migrations_url)) >= KEYCAP_TABLES
    current = python("-m", "alembic", "current", cwd=ROOT, env=env)
    assert "(head)" in current.stdout


def test_alembic_without_a_url_says_what_to_set() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KEYCAP_DATABASE_URL"}
    result = python("-m", "alembic", "upgrade", "head", cwd=ROOT, env=env)
    assert result.returncode != 0
    assert "KEYCAP_DATABASE_URL" in result.stderr


async def test_client_migrate_then_use(migrations_url: str) -> None:
    async with APIKeyClient(migrations_url, signing_secret=SECRET) as client:
        await client.migrate()
        await client.migrate()  # idempotent
        org = await client.create_organization("A")
        issued = await client.create_key(org.id)
        assert (await client.validate_key(issued.plaintext)).use_count == 1


def test_the_wheel_ships_the_migrations(tmp_path: Path) -> None:
    result = python(
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        str(ROOT),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("keycap-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "keycap/py.typed",
        "keycap/migrations/env.py",
        "keycap/migrations/script.py.mako",
        "keycap/migrations/versions/0001_initial_keycap_schema.py",
    } <= names


APP_ENV_PY = """
# An app's own env.py, from Alembic's async template, with docs/migrations.md's recipe.
import asyncio
import os

import sqlalchemy as sa
from alembic import context

import keycap.migrations
from keycap._db.engine import create_engine  # the test's way to an engine for any test URL

target_metadata = sa.MetaData()
sa.Table("app_users", target_metadata, sa.Column("id", sa.Integer, primary_key=True))
sa.Table("app_orders", target_metadata, sa.Column("id", sa.Integer, primary_key=True))
URL = os.environ["APP_DATABASE_URL"]


def do_run_migrations(connection):
    context.configure(connection=connection, target_metadata=target_metadata,
                      include_name=keycap.migrations.not_keycap)
    with context.begin_transaction():
        context.run_migrations()
        keycap.migrations.upgrade_with(context)


async def run_async_migrations():
    engine = create_engine(URL)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=keycap.migrations.sql_url(URL), target_metadata=target_metadata,
                      literal_binds=True, include_name=keycap.migrations.not_keycap)
    with context.begin_transaction():
        context.run_migrations()
        keycap.migrations.upgrade_with(context)
else:
    asyncio.run(run_async_migrations())
"""

APP_REVISION = """
from alembic import op
import sqlalchemy as sa
revision = "app1"
down_revision = None
def upgrade():
    op.create_table("app_orders", sa.Column("id", sa.Integer, primary_key=True))
"""


def _app(tmp_path: Path, url: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """An app's Alembic project in ``tmp_path`` (docs/migrations.md's recipe), and a
    function that runs ``alembic`` commands in it against ``url``."""
    (tmp_path / "versions").mkdir()
    (tmp_path / "env.py").write_text(APP_ENV_PY)
    (tmp_path / "versions" / "app1.py").write_text(APP_REVISION)
    (tmp_path / "script.py.mako").write_text(
        (Path(migrations.SCRIPT_LOCATION) / "script.py.mako").read_text()
    )
    (tmp_path / "alembic.ini").write_text(f"[alembic]\nscript_location = {tmp_path}\n")
    env = {**os.environ, "APP_DATABASE_URL": url}

    def alembic(*args: str) -> subprocess.CompletedProcess[str]:
        ini = str(tmp_path / "alembic.ini")
        return subprocess.run(
            [sys.executable, "-m", "alembic", "-c", ini, *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip

    return alembic


def test_the_recipe_upgrades_the_app_and_keycap_in_one_run(
    migrations_url: str, tmp_path: Path
) -> None:
    alembic = _app(tmp_path, migrations_url)
    for _ in range(2):  # and again, when both are already at head
        result = alembic("upgrade", "head")
        assert result.returncode == 0, result.stderr
    tables = asyncio.run(_table_names(migrations_url))
    assert {"app_orders", "alembic_version", "keycap_alembic_version", *KEYCAP_TABLES} <= tables
    assert alembic("check").returncode == 0  # the app's autogenerate ignores keycap's tables


def test_read_only_alembic_commands_change_nothing(migrations_url: str, tmp_path: Path) -> None:
    alembic = _app(tmp_path, migrations_url)
    before = asyncio.run(_table_names(migrations_url))
    for command_ in (
        ["current"],
        ["history"],
        ["check"],
        ["revision", "--autogenerate", "-m", "x"],
    ):
        alembic(*command_)  # check fails (app_orders is missing): it must still change nothing
    after = asyncio.run(_table_names(migrations_url))
    # Alembic itself may create the app's own version table; keycap adds nothing.
    assert before == {"app_users"} and after - {"alembic_version"} == before


def test_upgrade_sql_writes_the_app_and_keycap_into_one_script(
    migrations_url: str, backend: str, tmp_path: Path
) -> None:
    result = _app(tmp_path, migrations_url)("upgrade", "head", "--sql")
    if backend == "sqlite":  # keycap's batch-mode migrations need the live database
        said = result.stdout + result.stderr  # Alembic prints "FAILED: ..." on stdout
        assert result.returncode != 0 and "cannot be written as SQL for SQLite" in said
        return
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert "CREATE TABLE app_orders" in script
    assert "CREATE TABLE keycap_organizations" in script and "keycap_alembic_version" in script
    assert script.index("app_orders") < script.index("keycap_organizations")
    if "BEGIN" in script:  # transactional DDL: one BEGIN, one COMMIT around both
        assert script.count("BEGIN") == 1 and script.count("COMMIT") == 1
        assert script.rindex("COMMIT") > script.rindex("keycap_alembic_version")
    assert asyncio.run(_table_names(migrations_url)) == {"app_users"}  # --sql runs nothing


async def _conflicting_keycap_table(url: str) -> None:
    """A table keycap's first migration will fail to create."""
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            clash = MetaData()
            Table("keycap_organizations", clash, Column("other", Integer, primary_key=True))
            await conn.run_sync(clash.create_all)
    finally:
        await engine.dispose()


def test_a_failing_keycap_step_leaves_nothing_of_either_where_ddl_is_transactional(
    migrations_url: str, backend: str, tmp_path: Path
) -> None:
    asyncio.run(_conflicting_keycap_table(migrations_url))
    result = _app(tmp_path, migrations_url)("upgrade", "head")
    assert result.returncode != 0
    tables = asyncio.run(_table_names(migrations_url))
    if backend in ("mariadb", "sqlite"):
        # MariaDB, and SQLite through Python's sqlite3 (which runs DDL outside any
        # transaction), commit each DDL statement: the app's table stays
        # (docs/migrations.md).
        assert "app_orders" in tables
    else:
        assert tables == {"app_users", "keycap_organizations"}  # neither migration left a trace


def test_the_alembic_command_function_names_the_recipe_reads() -> None:
    # keycap.migrations.upgrade_with tells `alembic upgrade` by the name of the
    # function Alembic's command hands to env.py; a new Alembic that renames it
    # would make the recipe do nothing, and this fails first.
    import inspect as pyinspect

    assert "def upgrade(rev, context)" in pyinspect.getsource(command.upgrade)
    assert "def downgrade(rev, context)" in pyinspect.getsource(command.downgrade)
