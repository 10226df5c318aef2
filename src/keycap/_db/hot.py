"""The hot path's execution layer: a statement written with SQLAlchemy Core,
compiled once, run on the pool's driver connection.

:meth:`Hot.rows` checks a connection out of the engine's pool, runs the
statement and checks the connection back in, all in one greenlet:

- PostgreSQL with asyncpg: every hot statement, prepared once per connection,
  then one round trip per call, in autocommit (no transaction is begun on the
  connection, as it is returned to the pool);
- MySQL/MariaDB with aiomysql: statements that only read, sent with a
  ``COMMIT`` in the same query (:data:`WITH_COMMIT`): one round trip, where a
  ``SELECT`` on a pooled connection is otherwise followed by the ``ROLLBACK``
  that ends its implicit transaction.

It skips what ``AsyncConnection.execute`` costs per call and does not need
here: the connection and transaction objects, the execution context, the
``Result`` and its row objects, and the switch to AUTOCOMMIT and back.

What stays SQLAlchemy's: the pool (and its events, invalidation and reset), the
dialect, the compiled SQL, and every bind and result processor of the
statement's types (``UTCDateTime``, ``JSONText``). The engine's execution
events do not fire for it: when something listens to them (SQL
instrumentation, a statement log), :attr:`Hot.usable` is false and the
statement runs through ``AsyncConnection.execute``, where they do. A driver error comes out as
``AsyncConnection.execute`` would raise it (a ``sqlalchemy.exc.DBAPIError``
around the dialect's translation), and a lost connection invalidates the pool
as it would, so ``keycap._db.engine.translate`` and ``is_transient`` see the
same errors on either path.

It leans on SQLAlchemy internals (a compiled statement's ``_bind_processors``,
the asyncpg adapter's ``_handle_exception``, the pool's
``_invalidate``): ``tests/test_hot.py`` checks that they still exist, and the
dependencies are pinned below the next minor versions.

Behind a transaction pooler, with other drivers, and on MySQL/MariaDB for a
write, :class:`keycap._db.engine.Database` runs the same statements through
``AsyncConnection.execute`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_only, greenlet_spawn


class HotRow(dict[str, Any]):
    """A result row, read as SQLAlchemy's are: by attribute, or through ``_mapping``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def _mapping(self) -> dict[str, Any]:
        return self


@dataclass(frozen=True, slots=True)
class Compiled:
    """A statement compiled for one dialect: its SQL, its binds in position order
    with their processors, and its result columns with theirs."""

    sql: str
    binds: tuple[tuple[str, Callable[[Any], Any] | None], ...]
    defaults: Mapping[str, Any]
    names: tuple[str, ...]
    #: The result columns that have a processor, and it.
    results: tuple[tuple[str, Callable[[Any], Any]], ...]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        """The statement's positional arguments for ``params``, processed."""
        values = {**self.defaults, **params}
        out = []
        for name, process in self.binds:
            value = values[name]
            out.append(process(value) if process is not None and value is not None else value)
        return out

    def row(self, record: Any) -> HotRow:
        """A row of the driver's (an asyncpg ``Record``, an aiomysql tuple) as a HotRow."""
        out = HotRow(zip(self.names, record, strict=True))
        for name, process in self.results:
            if (value := out[name]) is not None:
                out[name] = process(value)
        return out


@lru_cache(maxsize=512)
def compiled(stmt: Any, dialect: Dialect) -> Compiled:
    """``stmt`` compiled once for ``dialect`` (statements are cached objects)."""
    c = stmt.compile(dialect=dialect)
    processors = c._bind_processors
    names = c.positiontup or []
    defaults = {
        name: bind.effective_value
        for name, bind in ((c.bind_names[b], b) for b in c.binds.values())
        if not bind.required
    }
    columns = list(stmt.exported_columns)  # a SELECT's, or an UPDATE's RETURNING
    keys = tuple(col.key for col in columns)
    if len(set(keys)) != len(keys):
        raise ValueError("a hot statement's result columns must have distinct names")
    results = []
    for col in columns:
        process = col.type.dialect_impl(dialect).result_processor(dialect, None)
        if process is not None:
            results.append((col.key, process))
    return Compiled(
        sql=c.string,
        binds=tuple((name, processors.get(name)) for name in names),
        defaults=defaults,
        names=keys,
        results=tuple(results),
    )


#: The statements prepared on one connection, kept in the pool's ``info`` of that
#: connection (dropped with it). asyncpg's own cache skips statements over 15 kB,
#: as a metered validation's is; keycap's statements are few and bounded.
PREPARED = "keycap.hot.prepared"
MAX_PREPARED = 256


async def _run_asyncpg(fairy: Any, sql: str, args: list[Any], *, stale: type[Exception]) -> Any:
    """``sql`` prepared once on the connection (then one round trip per call), run.
    A statement the server no longer accepts as prepared (its tables changed
    under it) is prepared again, once: it did not run."""
    driver = fairy.driver_connection
    cache: dict[str, Any] = fairy.info.setdefault(PREPARED, {})
    for attempt in (1, 2):
        prepared = cache.get(sql)
        if prepared is None:
            if len(cache) >= MAX_PREPARED:
                cache.clear()
            prepared = cache[sql] = await driver.prepare(sql)
        try:
            return await prepared.fetch(*args)
        except stale:
            cache.pop(sql, None)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


#: What follows a statement on MySQL/MariaDB, in the same ``COM_QUERY`` (aiomysql
#: always asks the server for multi-statement queries): it ends the implicit
#: transaction the statement opened, so no ``ROLLBACK`` has to follow at checkin.
WITH_COMMIT = ";COMMIT"


async def _run_aiomysql(fairy: Any, sql: str, args: list[Any]) -> tuple[Any, int]:
    """``sql`` (a read, or a single write) and ``COMMIT`` sent as one query: one
    round trip, the server sending both results at once. Its rows, and how many
    rows it matched. If the statement fails the ``COMMIT`` does not run: it is
    rolled back (:func:`_rolled_back`)."""
    cursor = await fairy.driver_connection.cursor()
    try:
        await cursor.execute(sql + WITH_COMMIT, args)
        found = await cursor.fetchall()
        count = cursor.rowcount
        await cursor.nextset()  # the COMMIT's answer, already received
        return found, count
    except Exception:
        await _rolled_back(fairy)
        raise
    finally:
        await cursor.close()


async def _rolled_back(fairy: Any) -> None:
    """After a failed query on MySQL/MariaDB: roll back the transaction it leaves
    open. The server's error carries no status, so the pool's reset (which rolls
    back only when the last status said "in a transaction") could return the
    connection with it open, and its read view: later reads there would be
    stale. If the rollback fails too, its error is the answer."""
    await fairy.driver_connection.rollback()


async def _run_block(fairy: Any, sql: str, args: list[Any]) -> list[list[Any]]:
    """A compound statement (``keycap._db.blocks``) sent as one query; every result
    set it sent, the server's answer to the one query."""
    cursor = await fairy.driver_connection.cursor()
    try:
        await cursor.execute(sql, args)
        sets = [list(await cursor.fetchall())]
        while await cursor.nextset():
            sets.append(list(await cursor.fetchall()))
        return sets
    except Exception:
        await _rolled_back(fairy)  # a failed statement ends the block, not its transaction
        raise
    finally:
        await cursor.close()


#: The engine events a statement run here would not fire (nor the dialect's
#: ``handle_error``): with a listener on any of them (SQL instrumentation, a
#: statement log), statements take SQLAlchemy's path.
EXECUTION_EVENTS = (
    "before_execute",
    "after_execute",
    "before_cursor_execute",
    "after_cursor_execute",
)


class Hot:
    """Statements run on the pool's driver connections (see the module's docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._server_error: type[Exception]
        self._mysql = engine.dialect.driver == "aiomysql"
        if self._mysql:  # reads and single writes only (Database.statement, .written)
            from pymysql.err import DatabaseError as ServerError  # type: ignore[import-untyped]

            self._server_error = ServerError
        else:
            from asyncpg.exceptions import InvalidCachedStatementError, PostgresError

            self._server_error = PostgresError
            self._asyncpg = partial(_run_asyncpg, stale=InvalidCachedStatementError)
        self._pool = engine.sync_engine.pool
        self._dialect = engine.dialect
        self._dispatch = engine.sync_engine.dispatch
        self._dialect_dispatch = engine.dialect.dispatch

    @property
    def usable(self) -> bool:
        """No listener on the engine's execution events (:data:`EXECUTION_EVENTS`),
        which a statement run here would not fire: checked at each call, since
        they can be added at any time."""
        dispatch = self._dispatch
        if self._dialect_dispatch.handle_error:
            return False
        return not any(getattr(dispatch, name) for name in EXECUTION_EVENTS)

    async def rows(self, stmt: Any, params: Mapping[str, Any]) -> Sequence[HotRow]:
        """The rows of ``stmt`` with ``params``: one round trip, in autocommit."""
        c = compiled(stmt, self._dialect)
        args = c.args(params)
        if self._mysql:
            records, _ = await greenlet_spawn(self._fetch, _run_aiomysql, c.sql, args)
        else:
            records = await greenlet_spawn(self._fetch, self._asyncpg, c.sql, args)
        return [c.row(r) for r in records]

    async def count(self, stmt: Any, params: Mapping[str, Any]) -> int:
        """MySQL/MariaDB: run one write statement and commit it, in one round trip;
        how many rows it matched."""
        c = compiled(stmt, self._dialect)
        _, count = await greenlet_spawn(self._fetch, _run_aiomysql, c.sql, c.args(params))
        return int(count)

    async def block(self, sql: str, args: list[Any]) -> list[list[Any]]:
        """MySQL/MariaDB: a compound statement (its text and its arguments), in one
        round trip; its result sets, as the driver's rows."""
        result: list[list[Any]] = await greenlet_spawn(self._fetch, _run_block, sql, args)
        return result

    def _fetch(self, run: Any, sql: str, args: list[Any]) -> Any:
        fairy = self._pool.connect()
        try:
            return await_only(run(fairy, sql, args))
        except Exception as error:
            raise self._wrapped(fairy, sql, error) from None
        except BaseException:
            fairy.invalidate()  # cancelled mid-statement: the connection's state is unknown
            raise
        finally:
            fairy.close()

    def _wrapped(self, fairy: Any, sql: str, error: Exception) -> Exception:
        """``error`` as ``AsyncConnection.execute`` raises it. A lost connection
        invalidates the pool (every connection opened before it, as SQLAlchemy
        does); any other failure not reported by the server (the driver's own)
        invalidates this connection, whose state is then unknown."""
        from_server = isinstance(error, self._server_error)
        adapted = fairy.dbapi_connection
        try:
            adapted._handle_exception(error)  # raises the dialect's DBAPI error
        except Exception as translated:
            error = translated
        dbapi = self._dialect.loaded_dbapi
        lost = isinstance(error, dbapi.Error) and self._dialect.is_disconnect(error, adapted, None)
        if lost:
            self._pool._invalidate(fairy, error)
        elif not from_server:
            fairy.invalidate(error)
        if not isinstance(error, dbapi.Error):
            return error
        return exc.DBAPIError.instance(
            sql,
            None,
            error,
            dbapi.Error,
            hide_parameters=True,
            connection_invalidated=lost,
            dialect=self._dialect,
        )
