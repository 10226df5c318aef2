"""keycap's Alembic migrations, shipped in the package.

They keep their own version table (``keycap_alembic_version``) and only look at
``keycap_*`` tables, so they live beside the app's own migrations. Run them with
``keycap db upgrade``, ``alembic upgrade head`` (the repository's alembic.ini),
``await client.migrate()``, or from the app's own Alembic env.py with
:func:`upgrade_with` (docs/migrations.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VERSION_TABLE = "keycap_alembic_version"
TABLE_PREFIX = "keycap_"
SCRIPT_LOCATION = str(Path(__file__).parent)


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic filter: keycap compares and migrates its own tables only."""
    if type_ == "table":
        return bool(name) and str(name).startswith(TABLE_PREFIX)
    return True


def config(url: str | None = None) -> Any:
    """An Alembic ``Config`` for keycap's migrations, no ini file needed."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


def _upgrade_steps(revision: str) -> Any:
    """The ``fn`` of a migration context that upgrades from where it stands to
    ``revision`` with keycap's scripts."""
    from alembic.runtime.migration import MigrationStep
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(SCRIPT_LOCATION)

    def steps(current: Any, _context: Any) -> list[Any]:
        revisions = script.iterate_revisions(revision, current, implicit_base=True)
        return [
            MigrationStep.upgrade_from_script(script.revision_map, rev)
            for rev in reversed(list(revisions))
        ]

    return steps


def upgrade_connection(connection: Any, revision: str = "head") -> None:
    """Upgrade keycap's tables on an open *sync* connection (inside ``run_sync``),
    in the connection's current transaction if it has one. From an app's own
    env.py use :func:`upgrade_with`, which also knows which command is running.

    Alembic's ``context`` proxy does not nest: ``alembic.command.upgrade`` called
    from inside another Alembic run would tear down the caller's proxy. So this
    drives a ``MigrationContext`` directly; keycap's revisions use only ``op``.
    """
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    from keycap._db.schema import metadata

    steps = _upgrade_steps(revision)
    context = MigrationContext.configure(
        connection,
        opts={"version_table": VERSION_TABLE, "target_metadata": metadata, "fn": steps},
    )
    with Operations.context(context), context.begin_transaction():
        context.run_migrations()


def sql_url(url: str) -> str:
    """``url`` as Alembic's offline (``--sql``) mode wants it: only the dialect
    matters there, and keycap's own URL parameters are dropped."""
    from keycap._db.engine import KEYCAP_PARAMETERS, normalize_url

    parsed = normalize_url(url).difference_update_query(KEYCAP_PARAMETERS)
    return parsed.render_as_string(hide_password=False)


def not_keycap(name: str | None, type_: str, parent_names: Any) -> bool:
    """For your own ``context.configure(include_name=...)``: your autogenerate,
    ``alembic check`` and ``revision --autogenerate`` leave keycap's tables alone."""
    return not (type_ == "table" and bool(name) and str(name).startswith(TABLE_PREFIX))


def upgrade_with(context: Any, revision: str = "head") -> None:
    """Upgrade keycap's tables from your own Alembic ``env.py``, inside your
    ``with context.begin_transaction():`` and after your ``context.run_migrations()``.

    - On ``alembic upgrade``: keycap's migrations run on the same connection, in
      the same transaction: on PostgreSQL, if either fails, neither is committed.
      (MySQL and MariaDB commit every DDL statement on their own, and so does
      SQLite through Python's sqlite3, which runs DDL outside transactions:
      there a failure leaves what ran before it.)
    - With ``--sql``: keycap's DDL is written into the same script, from its base
      (keycap's tables are assumed absent, as Alembic assumes yours are). Not on
      SQLite, where keycap's migrations need the live database (a clear error).
    - On every other command (``current``, ``check``, ``history``, ``revision
      --autogenerate``, ``stamp``, ``downgrade``): nothing. A command that only
      reads never changes the schema. Downgrade keycap on its own
      (``alembic -c`` with :func:`config`), if ever.

    Reads the ``fn`` option of the migration context (the function Alembic's
    command hands to env.py, named ``upgrade`` by ``alembic upgrade``);
    tests/test_migrations.py pins it.
    """
    app = context.get_context()
    command = getattr(app.opts.get("fn"), "__name__", None)
    if command != "upgrade":
        return
    if context.is_offline_mode():
        _upgrade_script(app, revision)
    else:
        upgrade_connection(app.connection, revision)


def _upgrade_script(app: Any, revision: str) -> None:
    """keycap's upgrade as SQL, written where the app's migration context writes."""
    from alembic.util import CommandError

    if app.dialect.name == "sqlite":
        raise CommandError(
            "keycap's migrations cannot be written as SQL for SQLite: they rebuild "
            "tables (batch mode), which needs the live database; run them online"
        )
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    from keycap._db.schema import metadata

    steps = _upgrade_steps(revision)
    context = MigrationContext.configure(
        dialect_name=app.dialect.name,
        opts={
            "as_sql": True,
            "output_buffer": app.output_buffer,
            "literal_binds": True,
            "transactional_ddl": False,  # the app's script has BEGIN and COMMIT
            "version_table": VERSION_TABLE,
            "target_metadata": metadata,
            "fn": steps,
        },
    )
    with Operations.context(context), context.begin_transaction():
        context.run_migrations()


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade keycap's tables at ``url`` (plain or async URL). Not for use inside a
    running event loop: there, ``await client.migrate()``."""
    from alembic import command

    command.upgrade(config(url), revision)


# --- where a database stands (``keycap db current / check / history``) ---------------


def revisions() -> list[tuple[str, str]]:
    """Every shipped revision, oldest first: ``(revision, message)``."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(SCRIPT_LOCATION)
    return [(r.revision, r.doc or "") for r in reversed(list(script.walk_revisions()))]


def head() -> str:
    """The newest shipped revision."""
    return revisions()[-1][0]


def resolve(revision: str) -> str:
    """A shipped revision by its id (or ``head``).

    Raises:
        ValueError: no shipped revision is called so.
    """
    known = [r for r, _ in revisions()]
    if revision == "head":
        return known[-1]
    if revision not in known:
        raise ValueError(f"unknown revision {revision!r}: one of {', '.join(known)} or head")
    return revision


def current_revision(connection: Any) -> str | None:
    """The revision keycap's tables are at on an open *sync* connection; None if
    the migrations never ran there. Reads only."""
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def differences(connection: Any) -> list[Any]:
    """How keycap's tables differ from what the package expects, as Alembic's
    autogenerate sees them (only ``keycap_*`` tables). Reads only."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from keycap._db.schema import metadata

    context = MigrationContext.configure(
        connection,
        opts={
            "version_table": VERSION_TABLE,
            "include_name": include_name,
            "compare_type": True,
            "target_metadata": metadata,
        },
    )
    return list(compare_metadata(context, metadata))
