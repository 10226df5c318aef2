"""Alembic environment for keycap's own tables (async engines, own version table)."""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig
from typing import Any

from alembic import context

from keycap._db.engine import create_engine, normalize_url
from keycap._db.schema import metadata
from keycap._errors import ConfigurationError
from keycap.migrations import VERSION_TABLE, include_name

config = context.config
if config.config_file_name is not None and config.get_section("loggers"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = (
        config.attributes.get("url")
        or os.environ.get("KEYCAP_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise ConfigurationError("set KEYCAP_DATABASE_URL to the database to migrate")
    return str(url)


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        compare_type=True,
        render_as_batch=False,
        **kwargs,
    )


def _run(connection: Any) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    _configure(url=normalize_url(_url()), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    _run(connection)
else:
    asyncio.run(_run_async(_url()))
