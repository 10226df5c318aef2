"""keycap's Alembic migrations, shipped in the package.

They keep their own version table (``keycap_alembic_version``) and only look at
``keycap_*`` tables, so they live beside the app's own migrations. Run them with
``alembic upgrade head`` (the repository's alembic.ini, or ``-c`` pointing at
:func:`config`), with ``await client.migrate()``, or from the app's own Alembic
env.py with :func:`upgrade_connection` (docs/migrations.md).
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


def upgrade_connection(connection: Any, revision: str = "head") -> None:
    """Upgrade keycap's tables on an open *sync* connection (inside ``run_sync``, or
    at the end of an app's own env.py), in the connection's current transaction.

    Alembic's ``context`` proxy does not nest: ``alembic.command.upgrade`` called
    from inside another Alembic run would tear down the caller's proxy. So this
    drives a ``MigrationContext`` directly; keycap's revisions use only ``op``.
    """
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext, MigrationStep
    from alembic.script import ScriptDirectory

    from keycap._db.schema import metadata

    script = ScriptDirectory(SCRIPT_LOCATION)

    def steps(current: Any, _context: Any) -> list[Any]:
        revisions = script.iterate_revisions(revision, current, implicit_base=True)
        return [
            MigrationStep.upgrade_from_script(script.revision_map, rev)
            for rev in reversed(list(revisions))
        ]

    context = MigrationContext.configure(
        connection,
        opts={"version_table": VERSION_TABLE, "target_metadata": metadata, "fn": steps},
    )
    with Operations.context(context), context.begin_transaction():
        context.run_migrations()


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade keycap's tables at ``url`` (plain or async URL). Not for use inside a
    running event loop: there, ``await client.migrate()``."""
    from alembic import command

    command.upgrade(config(url), revision)
