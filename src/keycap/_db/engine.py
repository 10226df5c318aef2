"""Engines, URLs, transactions, and the one place driver errors become keycap errors."""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from keycap._db import inthread
from keycap._db.hot import Hot
from keycap._errors import ConfigurationError, DatabaseError, DatabaseUnavailableError, KeycapError

log = logging.getLogger("keycap")

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


#: The URL query parameter that says the URL leads to a transaction pooler.
POOLER_PARAMETER = "transaction_pooler"
#: The pool's size and overflow (SQLAlchemy's ``pool_size`` and ``max_overflow``).
POOL_PARAMETERS = ("pool_size", "max_overflow")
#: keycap's own URL parameters, taken out before the driver sees the URL.
KEYCAP_PARAMETERS = (POOLER_PARAMETER, *POOL_PARAMETERS)
_FLAG_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def normalize_url(raw: object) -> URL:
    """Map plain URLs to keycap's async drivers; refuse sync drivers.

    keycap's own ``?transaction_pooler=true`` stays in the URL; :func:`pooler_flag`
    reads it and :func:`create_engine` takes it out before the driver sees it.

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


def pooler_flag(url: URL) -> bool:
    """Whether ``url`` says ``?transaction_pooler=true``.

    Raises:
        ConfigurationError: the parameter is not true/false, or not on PostgreSQL.
    """
    raw = url.query.get(POOLER_PARAMETER)
    if raw is None:
        return False
    value = _FLAG_WORDS.get(str(raw).strip().lower()) if isinstance(raw, str) else None
    if value is None:
        raise ConfigurationError(f"{POOLER_PARAMETER} in the database URL must be true or false")
    if value and url.get_backend_name() != "postgresql":
        raise ConfigurationError(f"{POOLER_PARAMETER} is for PostgreSQL behind PgBouncer")
    return value


def pool_options(url: URL) -> dict[str, int]:
    """``?pool_size=N&max_overflow=M`` from ``url``, for the engine keycap creates.

    SQLAlchemy's defaults (5 and 10) close every connection beyond the fifth as
    it is returned and open a new one at the next burst: a service with more
    concurrent calls per process than that pays for a connection per call
    (docs/deployment.md, "The connection pool").

    Raises:
        ConfigurationError: not a whole number in range, or an in-memory SQLite
            database (one connection, no pool to size).
    """
    options: dict[str, int] = {}
    for name in POOL_PARAMETERS:
        raw = url.query.get(name)
        if raw is None:
            continue
        text = raw if isinstance(raw, str) else ""
        least = 1 if name == "pool_size" else 0
        if not text.strip().isdigit() or not least <= int(text) <= 10_000:
            raise ConfigurationError(
                f"{name} in the database URL must be a whole number from {least} to 10000"
            )
        options[name] = int(text)
    if options and url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigurationError("an in-memory SQLite database has no pool to size")
    return options


def _extra_for(url: URL) -> str:
    return _DEFAULT_DRIVER[url.get_backend_name()][2]


@dataclass(frozen=True, slots=True)
class Waits:
    """How long keycap waits for the database, in seconds.

    ``call``: one database call (a statement, or a unit of work: checkout, its
    statements and commit) from the caller's side; past it the caller gets
    DatabaseUnavailableError, and the call still finishes (commits or rolls back)
    and returns its connection on its own. It also bounds the wait for a pooled
    connection and for a new one, and (asyncpg) each statement.
    ``lock``: a statement's wait for a row lock (PostgreSQL ``lock_timeout``,
    InnoDB ``innodb_lock_wait_timeout``, whole seconds, at least 1) or for
    SQLite's write lock (``busy_timeout``); None leaves the server's setting.
    """

    call: float = 10.0
    lock: float | None = 5.0


def create_engine(
    raw: object, waits: Waits | None = None, *, transaction_pooler: bool = False
) -> AsyncEngine:
    """An AsyncEngine for a URL, set up for keycap's concurrency rules and ``waits``.

    ``transaction_pooler`` (or ``?transaction_pooler=true`` in the URL): the URL
    leads to PgBouncer in transaction mode, or a pooler like it, which gives each
    transaction whichever server connection is free. The driver then prepares
    only unnamed statements and caches none (a named one would be missing, or
    taken, on the next server connection), and nothing is sent as a startup
    parameter (PgBouncer refuses those it does not know): ``waits.lock`` must be
    None, the lock timeout being the server's (docs/deployment.md).

    Raises:
        ConfigurationError: bad URL, driver not installed, or settings a pooler
            cannot take.
    """
    url = normalize_url(raw)
    pooled = transaction_pooler or pooler_flag(url)
    pool = pool_options(url)
    url = url.difference_update_query(KEYCAP_PARAMETERS)
    waits = waits or (Waits(lock=None) if pooled else Waits())
    backend = url.get_backend_name()
    if pooled:
        if backend != "postgresql":
            raise ConfigurationError("transaction_pooler is for PostgreSQL behind PgBouncer")
        if waits.lock is not None:
            raise ConfigurationError(
                "behind a transaction pooler keycap cannot set lock_timeout on its "
                "connections: pass lock_timeout=None and set it on the role "
                "(ALTER ROLE ... SET lock_timeout = '5s') or in the pooler"
            )
    kwargs: dict[str, Any] = dict(pool)
    connect: dict[str, Any] = {}
    # aiomysql: the pool's reset is keycap's own (_skip_needless_rollback).
    own_reset = backend in ("mysql", "mariadb") and url.get_driver_name() == "aiomysql"
    if backend != "sqlite":
        kwargs["pool_timeout"] = waits.call
    if own_reset:
        kwargs["pool_reset_on_return"] = None
    if backend in ("mysql", "mariadb"):
        kwargs["pool_recycle"] = 3600  # MySQL drops idle connections after wait_timeout
        connect["connect_timeout"] = max(1, math.ceil(waits.call))
        if waits.lock is not None:
            seconds = max(1, math.ceil(waits.lock))
            connect["init_command"] = f"SET SESSION innodb_lock_wait_timeout = {seconds}"
    elif backend == "postgresql" and url.get_driver_name() == "asyncpg":
        connect["timeout"] = waits.call
        connect["command_timeout"] = waits.call
        if waits.lock is not None:
            connect["server_settings"] = {"lock_timeout": str(math.ceil(waits.lock * 1000))}
        if pooled:
            connect.update(POOLED_ASYNCPG)
            url = url.update_query_dict({"prepared_statement_cache_size": "0"})
    elif pooled:  # psycopg: never switch to named server-side prepared statements
        connect["prepare_threshold"] = None
    if connect:
        kwargs["connect_args"] = connect
    try:
        engine = create_async_engine(url, **kwargs)
    except (ImportError, exc.NoSuchModuleError):
        raise ConfigurationError(
            f"the {url.get_driver_name()} driver is not installed: "
            f"pip install 'keycap[{_extra_for(url)}]'"
        ) from None
    if pooled:
        _POOLED.add(engine.sync_engine)
    if own_reset:
        _skip_needless_rollback(engine)
    if backend == "sqlite":
        busy_ms = 30_000 if waits.lock is None else math.ceil(waits.lock * 1000)
        _configure_sqlite(engine, memory=url.database in (None, "", ":memory:"), busy_ms=busy_ms)
    return engine


#: asyncpg's connect arguments behind a transaction pooler: no statement cache in
#: asyncpg, and SQLAlchemy prepares every statement unnamed ("" is PostgreSQL's
#: unnamed statement), so nothing prepared outlives its transaction on a server
#: connection another client gets next (with uuid names, as SQLAlchemy's docs
#: suggest, the statements would pile up on the server connections).
POOLED_ASYNCPG: dict[str, Any] = {
    "statement_cache_size": 0,
    "prepared_statement_name_func": lambda: "",
}


#: Engines create_engine made for a transaction pooler: a client given one of them
#: (``APIKeyClient(other.engine, ...)``) knows without being told.
_POOLED: weakref.WeakSet[Engine] = weakref.WeakSet()


def made_for_pooler(engine: AsyncEngine) -> bool:
    """Whether keycap's :func:`create_engine` made ``engine`` for a transaction pooler."""
    return engine.sync_engine in _POOLED


def require_pooler_settings(engine: AsyncEngine) -> None:
    """Make ``engine``, which the user built, refuse to connect unless it can work
    behind a transaction pooler: PostgreSQL, and (asyncpg) no statement cache in
    asyncpg or SQLAlchemy, with statement names that cannot collide.

    Reads private attributes of SQLAlchemy's asyncpg adapter and of asyncpg
    (tests/test_pooler.py pins them).

    Raises:
        ConfigurationError: not PostgreSQL (now), or unsuitable (at connect).
    """
    if engine.dialect.name != "postgresql":
        raise ConfigurationError("transaction_pooler is for PostgreSQL behind PgBouncer")
    if engine.dialect.driver != "asyncpg":
        return

    @event.listens_for(engine.sync_engine, "connect")
    def _check(dbapi_connection: Any, _record: Any) -> None:
        cached = dbapi_connection._prepared_statement_cache is not None
        cached = cached or dbapi_connection._connection._stmt_cache.get_max_size() != 0
        named = dbapi_connection._prepared_statement_name_func() is None
        if cached or named:
            raise ConfigurationError(
                "this engine cannot work behind a transaction pooler: create it with "
                "?prepared_statement_cache_size=0 and connect_args "
                "statement_cache_size=0 and prepared_statement_name_func "
                "(docs/deployment.md), or pass keycap the URL"
            )


def _skip_needless_rollback(engine: AsyncEngine) -> None:
    """aiomysql: the pool's ROLLBACK at checkin, only where it can matter.

    A connection comes back to the pool after its SQLAlchemy ``Connection``
    closed: if that had a transaction open, it rolled it back itself
    (``transaction_was_reset``); otherwise the transaction was committed or
    rolled back already, and the pool's ROLLBACK would be one more round trip
    for nothing (one per write on MariaDB). It is still sent when the server
    says a transaction is open (``SERVER_STATUS_IN_TRANS``: a write made on the
    raw driver connection). A connection lost mid-transaction (garbage
    collected under asyncio) is closed, never reset (``terminate_only``).
    Reads ``server_status`` of aiomysql's connection (tests/test_round_trips.py
    pins it).
    """

    @event.listens_for(engine.sync_engine, "reset")
    def _reset(dbapi_connection: Any, _record: Any, state: Any) -> None:
        if state.terminate_only or state.transaction_was_reset:
            return
        if dbapi_connection._connection.server_status & _SERVER_STATUS_IN_TRANS:
            dbapi_connection.rollback()


_SERVER_STATUS_IN_TRANS = 1  # pymysql.constants.SERVER_STATUS.SERVER_STATUS_IN_TRANS


def _configure_sqlite(engine: AsyncEngine, *, memory: bool, busy_ms: int) -> None:
    # SQLite serialises writers. WAL lets readers run beside the writer; the busy
    # timeout makes a second process wait for the write lock instead of failing;
    # foreign keys are off unless asked for, per connection.
    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
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
# shutdown in progress (1053), a killed connection (1927), resources exhausted
# (1041), a lock wait past innodb_lock_wait_timeout (1205: the rows are busy).
_MYSQL_UNAVAILABLE = frozenset({1040, 1041, 1053, 1203, 1205, 1927, 3032, 4031})
# PostgreSQL SQLSTATE classes that mean "the server cannot take this now", whatever
# exception class the driver maps them to: connection exceptions (08), insufficient
# resources (53: too many clients, out of memory, disk full), and the server shutting
# down or starting up (57P01-57P03), and a lock wait past lock_timeout (55P03): the
# rows are busy, try again later.
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P", "55P03")


def translate(error: BaseException) -> KeycapError:
    """The keycap error for a driver or SQLAlchemy error. Messages carry no SQL parameters."""
    if isinstance(error, exc.IntegrityError):
        return Conflict(f"constraint violated: {_describe(error)}")
    if isinstance(error, exc.DBAPIError):
        detail = _describe(error)
        sqlstate = str(getattr(error.orig, "sqlstate", None) or "")
        if _pooler_symptom(sqlstate, detail):
            return ConfigurationError(
                f"the database answered like a transaction pooler ({detail}): "
                "create the client with transaction_pooler=True (docs/deployment.md)"
            )
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


def _pooler_symptom(sqlstate: str, detail: str) -> bool:
    """What PostgreSQL drivers meet behind PgBouncer in transaction mode when they
    are not set up for it: a startup parameter it refuses, and prepared statements
    missing (26000) or already taken (42P05) on the server connection it chose, or
    a statement of another client's there ("bind message supplies 1 parameters,
    but prepared statement ... requires 0")."""
    if sqlstate == "08P01":
        return "unsupported startup parameter" in detail or "bind message supplies" in detail
    return sqlstate in ("26000", "42P05") and "prepared statement" in detail


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
    """A deadlock, serialization failure, lock wait timeout or busy database: the
    unit of work that met it may simply be run again."""
    cause = error.__cause__ if isinstance(error, DatabaseError) else error
    orig = getattr(cause, "orig", cause)
    if getattr(orig, "sqlstate", None) in ("40P01", "40001", "55P03"):
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


async def _translating(call: Awaitable[T]) -> T:
    """Await ``call``; whatever the driver raises comes out as a KeycapError."""
    try:
        return await call
    except KeycapError:
        raise
    except Exception as error:
        raise translate(error) from error


class Database:
    """The engine and the two ways keycap talks to it.

    ``begin()`` is one transaction; ``autocommit()`` runs statements that are
    each atomic on their own (the validation hot path) with no BEGIN/COMMIT
    round trips. :meth:`run` and :meth:`run_in_transaction` call one statement
    function (``keycap._db.keys.get_key``, ...) in either.

    Behind a transaction pooler (``transaction_pooler``) ``autocommit()`` is a
    transaction too: the pooler keeps a client on one server connection only
    until the end of a transaction, and asyncpg prepares a statement in one
    exchange and runs it in the next.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        owned: bool,
        call_timeout: float = 10.0,
        transaction_pooler: bool = False,
    ) -> None:
        self.engine = engine
        self.owned = owned
        self.call_timeout = call_timeout
        self.transaction_pooler = transaction_pooler or made_for_pooler(engine)
        # Calls whose caller gave up (cancelled, or timed out) but which are still
        # finishing: kept referenced until done, and awaited by dispose().
        self._finishing: set[asyncio.Future[Any]] = set()
        self.dialect: str = engine.dialect.name
        self.is_mysql = self.dialect in ("mysql", "mariadb")
        #: PostgreSQL and SQLite can return the row an UPDATE changed; MySQL/MariaDB cannot.
        self.update_returning: bool = bool(engine.dialect.update_returning)
        # One pool for both: a second, autocommit-only pool would save the level
        # switch per checkout (local with asyncpg, a round trip each way with
        # aiomysql) but double the connections an app's database must allow.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        # Behind a pooler, and on MySQL/MariaDB, a statement gets a transaction of
        # its own instead (autocommit()).
        self._own_transaction = self.transaction_pooler or self.is_mysql
        #: A charge runs as one statement (``keycap._db.metering``): PostgreSQL only.
        self.one_statement: bool = self.dialect == "postgresql"
        # Such a statement runs on the pool's asyncpg connection (keycap._db.hot);
        # behind a pooler, in a transaction of its own (autocommit()).
        # On MySQL/MariaDB with aiomysql, statements that only read do too.
        driver = engine.dialect.driver
        #: SQLite with aiosqlite: a unit of work in one call into its thread.
        self._in_thread = inthread.Runner(engine) if driver == "aiosqlite" else None
        self._hot = (
            Hot(engine)
            if (driver == "asyncpg" and not self.transaction_pooler) or driver == "aiomysql"
            else None
        )

    @property
    def in_thread(self) -> bool:
        """Work runs in one call into SQLite's thread (``keycap._db.inthread``),
        and is not already running there."""
        runner = self._in_thread
        return runner is not None and runner.usable and not inthread.active()

    @property
    def one_block(self) -> bool:
        """A charge or a metered validation runs as one compound statement
        (``keycap._db.blocks``): MariaDB 10.3 or later with aiomysql, its
        statements on the pool's driver connection (:attr:`Hot.usable`). Known
        once the dialect has met the server; before, the transactions run."""
        hot = self._hot
        dialect = self.engine.dialect
        return (
            hot is not None
            and self.is_mysql
            and getattr(dialect, "is_mariadb", False)
            and (getattr(dialect, "server_version_info", None) or (0,)) >= (10, 3)
            and hot.usable
        )

    async def block(self, sql: str, args: list[Any]) -> list[list[Any]]:
        """Run a compound statement of ``keycap._db.blocks`` (:attr:`one_block`) in
        one round trip; its result sets."""
        hot = self._hot
        assert hot is not None
        return await _translating(hot.block(sql, args))

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        connecting = inthread.begin() if inthread.active() else self.engine.begin()
        async with _translated(connecting) as conn:
            yield conn

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A connection for one statement that is atomic on its own: AUTOCOMMIT on
        PostgreSQL and SQLite. Behind a transaction pooler, and on MySQL/MariaDB,
        a transaction of its own instead: the statement and its COMMIT (switching
        a pooled aiomysql connection to AUTOCOMMIT and back costs four more round
        trips; see :meth:`reading`)."""
        connecting: AbstractAsyncContextManager[AsyncConnection]
        if inthread.active():
            connecting = inthread.connect()
        elif self._own_transaction:
            connecting = self.engine.begin()
        else:
            connecting = self._autocommit.connect()
        async with _translated(connecting) as conn:
            yield conn

    async def statement(
        self, stmt: Any, params: Mapping[str, Any], *, read_only: bool = False
    ) -> Sequence[Any]:
        """The rows of one statement that is atomic on its own, in one round trip:
        on the pool's driver connection (``keycap._db.hot``: asyncpg, and aiomysql
        for a read), else on an :meth:`autocommit` connection (``read_only``:
        :meth:`reading`). Run it inside :meth:`guarded` (:meth:`rows` and
        :meth:`read_rows` do)."""
        hot = self._hot
        if hot is None or not hot.usable or (self.is_mysql and not read_only):
            async with self.reading() if read_only else self.autocommit() as conn:
                return (await conn.execute(stmt, params)).all()
        return await _translating(hot.rows(stmt, params))

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncConnection]:
        """A connection for statements that only read.

        MySQL/MariaDB: a plain connection, whose implicit transaction the pool's
        ROLLBACK ends at checkin: the SELECT and the ROLLBACK are the only round
        trips. Switching such a connection to AUTOCOMMIT and back costs four
        more (``SET AUTOCOMMIT``, ``SET SESSION TRANSACTION ISOLATION LEVEL``,
        ``COMMIT``); the ROLLBACK cannot be skipped, or InnoDB would keep the read
        view and a later read on that connection would be stale.
        Elsewhere: :meth:`autocommit`.
        """
        if self.is_mysql:
            async with _translated(self.engine.connect()) as conn:
                yield conn
        else:
            async with self.autocommit() as conn:
                yield conn

    async def guarded(self, work: Callable[[], Awaitable[T]], within: float | None = None) -> T:
        """Run ``work`` (one unit of work, or one statement) so that no caller can
        leave it half done, and no caller waits for it longer than ``within`` seconds
        (``call_timeout`` unless given).

        It runs in a task of its own, shielded: if the caller is cancelled (a client
        disconnects, a timeout around the call) or the time runs out, the caller
        returns at once, and the work still commits or rolls back and returns its
        connection to the pool. A transaction interrupted at an await point would
        otherwise be left to the garbage collector, holding its locks (SQLite's
        write lock for as long as that takes).

        Raises:
            DatabaseUnavailableError: no answer within ``call_timeout`` seconds.
        """
        if inthread.active():
            return await work()  # already inside a unit in SQLite's thread
        limit = self.call_timeout if within is None else within
        runner = self._in_thread
        if runner is not None and runner.usable:
            task = asyncio.ensure_future(_translating(runner.run(work)))
        else:
            task = asyncio.ensure_future(work())
        try:
            async with asyncio.timeout(limit):
                return await asyncio.shield(task)
        except TimeoutError:
            if not task.done():
                self._let_finish(task)
            raise DatabaseUnavailableError(
                f"database unavailable: no answer within {limit:g}s"
            ) from None
        except asyncio.CancelledError:
            self._let_finish(task)
            raise

    def _let_finish(self, task: asyncio.Future[Any]) -> None:
        self._finishing.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._finishing.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.warning("keycap: a call its caller gave up on failed: %s", error)

    async def run(
        self,
        statement: Callable[Concatenate[AsyncConnection, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``statement(conn, ...)`` on an :meth:`autocommit` connection
        (:meth:`guarded`): for a statement that is atomic on its own."""

        async def work() -> T:
            async with self.autocommit() as conn:
                return await statement(conn, *args, **kwargs)

        return await self.guarded(work)

    async def written(self, stmt: Any, params: Mapping[str, Any]) -> int:
        """How many rows one write statement matched, committed on its own
        (guarded): MySQL/MariaDB, which have no ``RETURNING``. With aiomysql the
        statement and its ``COMMIT`` go as one query (``keycap._db.hot``)."""
        hot = self._hot

        async def work() -> int:
            if hot is not None and hot.usable and self.is_mysql:
                return await _translating(hot.count(stmt, params))
            async with self.autocommit() as conn:
                return int((await conn.execute(stmt, params)).rowcount)

        return await self.guarded(work)

    async def rows(self, stmt: Any, params: Mapping[str, Any]) -> Sequence[Any]:
        """:meth:`statement`, guarded: one statement that is atomic on its own."""
        return await self.guarded(lambda: self.statement(stmt, params))

    async def read_rows(self, stmt: Any, params: Mapping[str, Any]) -> Sequence[Any]:
        """:meth:`rows` for a statement that only reads, tried once more on a dead
        connection (:meth:`read`)."""
        return await self._read_again(lambda: self.statement(stmt, params, read_only=True))

    async def read(
        self,
        statement: Callable[Concatenate[AsyncConnection, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """:meth:`run` for a statement that only reads, tried once more when its
        connection turned out dead (pooled before the server restarted): reading
        again is always safe, and the pool has meanwhile dropped its stale
        connections, so one caller, not every caller, pays for the restart.
        It runs on :meth:`reading`."""

        async def work() -> T:
            async with self.reading() as conn:
                return await statement(conn, *args, **kwargs)

        return await self._read_again(work)

    async def _read_again(self, work: Callable[[], Awaitable[T]]) -> T:
        """``work`` guarded, and once more if its connection turned out dead."""
        try:
            return await self.guarded(work)
        except DatabaseUnavailableError as error:
            cause = error.__cause__
            if not (isinstance(cause, exc.DBAPIError) and cause.connection_invalidated):
                raise
        return await self.guarded(work)

    async def run_in_transaction(
        self,
        statement: Callable[Concatenate[AsyncConnection, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``statement(conn, ...)`` in a transaction of its own (:meth:`guarded`)."""

        async def work() -> T:
            async with self.begin() as conn:
                return await statement(conn, *args, **kwargs)

        return await self.guarded(work)

    async def dispose(self) -> None:
        """Let calls whose callers gave up finish (within ``call_timeout``), then
        dispose the engine if keycap created it."""
        if self._finishing:
            await asyncio.wait(set(self._finishing), timeout=self.call_timeout)
        if self.owned:
            await self.engine.dispose()
