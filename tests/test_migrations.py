"""keycap's shipped Alembic migrations on every database, beside an app's own tables."""

import asyncio
import os
import zipfile
from collections.abc import Iterator
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
from alembic import context
from sqlalchemy import create_engine
import keycap.migrations

def do_run_migrations(connection):
    context.configure(connection=connection, target_metadata=None,
                      include_name=lambda name, type_, parents:
                          not (type_ == "table" and name.startswith("keycap_")))
    with context.begin_transaction():
        context.run_migrations()
    keycap.migrations.upgrade_connection(connection)

with create_engine(context.config.get_main_option("sqlalchemy.url")).begin() as connection:
    do_run_migrations(connection)
"""

APP_REVISION = """
from alembic import op
import sqlalchemy as sa
revision = "app1"
down_revision = None
def upgrade():
    op.create_table("app_orders", sa.Column("id", sa.Integer, primary_key=True))
"""


def test_the_documented_recipe_for_an_apps_own_env_py(tmp_path: Path) -> None:
    """docs/migrations.md: the app's env.py runs its migrations, then keycap's."""
    (tmp_path / "versions").mkdir()
    (tmp_path / "env.py").write_text(APP_ENV_PY)
    (tmp_path / "versions" / "app1.py").write_text(APP_REVISION)
    (tmp_path / "script.py.mako").write_text("")
    db = tmp_path / "app.db"
    (tmp_path / "alembic.ini").write_text(
        f"[alembic]\nscript_location = {tmp_path}\nsqlalchemy.url = sqlite:///{db}\n"
    )
    for _ in range(2):  # and again, when both are already at head
        ini = str(tmp_path / "alembic.ini")
        result = python("-m", "alembic", "-c", ini, "upgrade", "head", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    tables = asyncio.run(_table_names(f"sqlite:///{db}"))
    assert {"app_orders", "alembic_version", "keycap_alembic_version", *KEYCAP_TABLES} <= tables
