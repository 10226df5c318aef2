"""Engines, URLs, transactions, and the one place driver errors become keycap errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from keycap._errors import ConfigurationError, DatabaseError, DatabaseUnavailableError, KeycapError

# Plain scheme -> the async driver keycap installs for it (extras sqlite/postgresql/mysql).
_DEFAULT_DRIVER = {
    "sqlite": ("sqlite", "aiosqlite", "sqlite"),
    "postgresql": ("postgresql", "asyncpg", "postgresql"),
    "postgres": ("postgresql", "asyncpg", "postgresql"),
    "mysql": ("mysql", "aiomysql", "mysql"),
    "mariadb": ("mariadb", "aiomysql", "mysql"),
}
_ASYNC_DRIVERS = {
    "sqlite": {"aiosqlite"},
    "postgresql": {"asyncpg", "psycopg", "psycopg_async"},
    "mysql": {"aiomysql", "asyncmy"},
    "mariadb": {"aiomysql", "asyncmy"},
}


def normalize_url(raw: object) -> URL:
    """Map plain URLs to keycap's async drivers; refuse sync drivers.

    Raises:
        ConfigurationError: not a URL, an unknown database, or a sync driver.
    """
    if isinstance(raw, URL):
        url = raw
    elif isinstance(raw, str):
        try:
            url = make_url(raw)
        except (exc.ArgumentError, ValueError):
            # Never echo the URL: it may hold a password.
            raise ConfigurationError("database URL is not a valid URL") from None
    else:
        raise ConfigurationError("database must be a URL string or an AsyncEngine")
    backend, _, driver = url.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if backend not in _ASYNC_DRIVERS:
        raise ConfigurationError(
            f"unsupported database {backend!r}: use sqlite, postgresql, mysql or mariadb"
        )
    if not driver:
        backend, driver, _extra = _DEFAULT_DRIVER[url.drivername.partition("+")[0]]
    elif driver not in _ASYNC_DRIVERS[backend]:
        raise ConfigurationError(
            f"driver {driver!r} is synchronous; keycap is async: use {backend}+"
            + " or ".join(sorted(_ASYNC_DRIVERS[backend]))
            + f", or plain {backend}://"
        )
    url = url.set(drivername=f"{backend}+{driver}")
    if backend in ("mysql", "mariadb") and "charset" not in url.query:
        url = url.update_query_dict({"charset": "utf8mb4"})
    return url


def _extra_for(url: URL) -> str:
    return _DEFAULT_DRIVER[url.get_backend_name()][2]


def create_engine(raw: object) -> AsyncEngine:
    """An AsyncEngine for a URL, set up for keycap's concurrency rules.

    Raises:
        ConfigurationError: bad URL or driver not installed.
    """
    url = normalize_url(raw)
    kwargs: dict[str, Any] = {}
    if url.get_backend_name() in ("mysql", "mariadb"):
        kwargs["pool_recycle"] = 3600  # MySQL drops idle connections after wait_timeout
    try:
        engine = create_async_engine(url, **kwargs)
    except (ImportError, exc.NoSuchModuleError):
        raise ConfigurationError(
            f"the {url.get_driver_name()} driver is not installed: "
            f"pip install 'keycap[{_extra_for(url)}]'"
        ) from None
    if url.get_backend_name() == "sqlite":
        _configure_sqlite(engine, memory=url.database in (None, "", ":memory:"))
    return engine


def _configure_sqlite(engine: AsyncEngine, *, memory: bool) -> None:
    # SQLite serialises writers. WAL lets readers run beside the writer; the busy
    # timeout makes a second process wait for the write lock instead of failing;
    # foreign keys are off unless asked for, per connection.
    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


class Conflict(DatabaseError):
    """A unique or foreign-key constraint refused a write. Callers that expect one
    catch it and say which entity clashed; one that escapes is still a DatabaseError."""

    code = "database_conflict"


# SQLite raises OperationalError for schema mistakes and bad values too (no such
# table, integer overflow); only these mean the database file cannot be used now.
_SQLITE_UNAVAILABLE = (
    "unable to open database",
    "database is locked",
    "disk i/o error",
    "database or disk is full",
)
# MySQL/MariaDB: the drivers raise OperationalError for every server error they do
# not map (an out-of-range BIGINT is one), so the error number decides. Client errors
# (2000-2999: cannot connect, server gone, lost connection) and these server errors
# mean "the server cannot take this now": too many connections (1040, 1203),
# shutdown in progress (1053), a killed connection (1927), read-only or offline mode
# (1290 is not here: it is the user's configuration), resources exhausted (1041).
_MYSQL_UNAVAILABLE = frozenset({1040, 1041, 1053, 1203, 1927, 3032, 4031})
# PostgreSQL SQLSTATE classes that mean "the server cannot take this now", whatever
# exception class the driver maps them to: connection exceptions (08), insufficient
# resources (53: too many clients, out of memory, disk full), and the server shutting
# down or starting up (57P01-57P03).
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P")


def translate(error: BaseException) -> KeycapError:
    """The keycap error for a driver or SQLAlchemy error. Messages carry no SQL parameters."""
    if isinstance(error, exc.IntegrityError):
        return Conflict(f"constraint violated: {_describe(error)}")
    if isinstance(error, exc.DBAPIError):
        detail = _describe(error)
        sqlstate = str(getattr(error.orig, "sqlstate", None) or "")
        if (
            error.connection_invalidated
            or isinstance(error, exc.InterfaceError)
            or sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
        ):
            return DatabaseUnavailableError(f"database unavailable: {detail}")
        if isinstance(error, exc.OperationalError) and _unavailable(error):
            return DatabaseUnavailableError(f"database unavailable: {detail}")
        return DatabaseError(f"database error: {detail}")
    if isinstance(error, OSError | TimeoutError):
        return DatabaseUnavailableError(f"database unavailable: {type(error).__name__}")
    if isinstance(error, exc.TimeoutError):
        # The pool had no connection to give within its timeout: the database is
        # too busy to take this call now.
        return DatabaseUnavailableError("database unavailable: no free connection in the pool")
    if isinstance(error, exc.SQLAlchemyError):
        return DatabaseError(f"database error: {type(error).__name__}")
    # asyncpg raises its own errors at connect time (bad password, server starting).
    module = type(error).__module__
    if module.startswith(("asyncpg", "pymysql", "aiomysql", "sqlite3", "aiosqlite")):
        return DatabaseUnavailableError(f"database unavailable: {type(error).__name__}")
    raise error


def _unavailable(error: exc.OperationalError) -> bool:
    """An OperationalError that means the server cannot be used now, not that this
    statement was wrong."""
    args = getattr(error.orig, "args", ())
    if args and isinstance(args[0], int):  # MySQL/MariaDB error number
        code = args[0]
        return 2000 <= code < 3000 or code in _MYSQL_UNAVAILABLE
    if type(error.orig).__module__.startswith(("sqlite3", "aiosqlite")):
        return str(error.orig).strip().lower().startswith(_SQLITE_UNAVAILABLE)
    return True  # PostgreSQL's drivers raise it for connection failures


def is_transient(error: BaseException) -> bool:
    """A deadlock, serialization failure or busy database: the unit of work that met
    it may simply be run again."""
    cause = error.__cause__ if isinstance(error, DatabaseError) else error
    orig = getattr(cause, "orig", cause)
    if getattr(orig, "sqlstate", None) in ("40P01", "40001"):
        return True
    args = getattr(orig, "args", ())
    if args and args[0] in (1213, 1205):  # MySQL deadlock, lock wait timeout
        return True
    return "database is locked" in str(orig)


def _describe(error: exc.DBAPIError) -> str:
    orig = error.orig if error.orig is not None else error
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first[:200]}" if first else type(orig).__name__


@asynccontextmanager
async def _translated(
    connecting: AbstractAsyncContextManager[AsyncConnection],
) -> AsyncIterator[AsyncConnection]:
    """Enter ``connecting``; whatever the driver raises inside comes out as a KeycapError."""
    try:
        async with connecting as conn:
            yield conn
    except KeycapError:
        raise
    except Exception as error:
        raise translate(error) from error


P = ParamSpec("P")
T = TypeVar("T")


class Database:
    """The engine and the two ways keycap talks to it.

    ``begin()`` is one transaction; ``autocommit()`` runs statements that are
    each atomic on their own (the validation hot path) with no BEGIN/COMMIT
    round trips. :meth:`run` and :meth:`run_in_transaction` call one statement
    function (``keycap._db.keys.get_key``, ...) in either.
    """

    def __init__(self, engine: AsyncEngine, *, owned: bool) -> None:
        self.engine = engine
        self.owned = owned
        self.dialect: str = engine.dialect.name
        self.is_mysql = self.dialect in ("mysql", "mariadb")
        #: PostgreSQL and SQLite can return the row an UPDATE changed; MySQL/MariaDB cannot.
        self.update_returning: bool = bool(engine.dialect.update_returning)
        # One pool for both: a second, autocommit-only pool would save the level
        # switch per checkout (local with asyncpg, a round trip each way with
        # aiomysql) but double the connections an app's database must allow.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        async with _translated(self.engine.begin()) as conn:
            yield conn

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        async with _translated(self._autocommit.connect()) as conn:
            yield conn

    async def run(
        self,
        statement: Callable[Concatenate[AsyncConnection, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``statement(conn, ...)`` on an autocommit connection: for a statement that
        is atomic on its own."""
        async with self.autocommit() as conn:
            return await statement(conn, *args, **kwargs)

    async def run_in_transaction(
        self,
        statement: Callable[Concatenate[AsyncConnection, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``statement(conn, ...)`` in a transaction of its own."""
        async with self.begin() as conn:
            return await statement(conn, *args, **kwargs)

    async def dispose(self) -> None:
        if self.owned:
            await self.engine.dispose()
