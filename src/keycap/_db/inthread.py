"""SQLite: a whole unit of work in one call into aiosqlite's worker thread.

aiosqlite runs each call on its connection (execute, fetch, commit, the pool's
rollback) in a thread of its own, one queue hop each: a metered validation was
21 of them. :class:`Runner` sends the unit instead, once: it checks a
connection out of the engine's pool, and in the connection's thread runs the
unit's coroutine to its end on the same ``sqlite3`` connection, through a
synchronous SQLAlchemy engine (the pysqlite dialect: the same SQL, types and
processing as aiosqlite's, which is built on it). While it runs,
``keycap._db.engine.Database`` gives the unit :class:`InThread` connections,
whose ``execute`` completes without suspending, so the coroutine never waits
on the event loop and one ``send`` runs it through.

A unit that awaits anything else (it cannot, in that thread) is unwound with
:class:`Suspended`, rolling its transaction back, and run the usual way: the
one hop is an optimisation, never a change in what a unit does. Nor is it
taken while something listens to the engine's execution events, which the
synchronous engine would not fire (``keycap._db.hot.EXECUTION_EVENTS``).

It leans on aiosqlite's ``Connection._execute`` and ``_conn`` and on the pool's
``_checkin(transaction_was_reset=...)``: ``tests/test_hot.py`` checks that they
still exist, and the dependencies are pinned below their next minor versions.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager, suppress
from contextvars import copy_context
from functools import partial
from typing import Any, TypeVar, cast

from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import StaticPool
from sqlalchemy.util import await_only, greenlet_spawn

from keycap._db.hot import EXECUTION_EVENTS
from keycap._errors import DatabaseError

T = TypeVar("T")

#: Where a pooled connection keeps its synchronous engine (in the pool's ``info``
#: of that connection, dropped with it).
ENGINE = "keycap.inthread.engine"

_here = threading.local()


def active() -> Engine | None:
    """The synchronous engine of the unit running in this thread, if one is."""
    return cast(Engine | None, getattr(_here, "engine", None))


class Suspended(BaseException):
    """Thrown into a unit that awaited something other than the database in the
    driver's thread, to unwind it (a BaseException, so no ``except Exception``
    in the unit stops it)."""


class InThread:
    """The part of an ``AsyncConnection`` keycap's statements use, over a
    synchronous connection in the driver's thread: each call completes at once."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.dialect = conn.dialect

    async def execute(self, stmt: Any, params: Any = None) -> Any:
        return self._conn.execute(stmt, params)

    async def scalar(self, stmt: Any, params: Mapping[str, Any] | None = None) -> Any:
        return self._conn.scalar(stmt, params)


@asynccontextmanager
async def begin() -> AsyncIterator[AsyncConnection]:
    """A transaction on the unit's connection (``Database.begin`` in the thread)."""
    engine = active()
    assert engine is not None
    with engine.begin() as conn:
        yield cast(AsyncConnection, InThread(conn))
    _here.committed = True


@asynccontextmanager
async def connect() -> AsyncIterator[AsyncConnection]:
    """The unit's connection for statements atomic on their own, or reads: each
    committed (or rolled back) when the block ends."""
    engine = active()
    assert engine is not None
    with engine.connect() as conn:
        yield cast(AsyncConnection, InThread(conn))
        if conn.in_transaction():
            conn.commit()
            _here.committed = True


_NOT_DONE: Any = object()


class Runner:
    """Runs units of work in one call into aiosqlite's thread (see the module)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._pool = engine.sync_engine.pool
        self._dispatch = engine.sync_engine.dispatch
        self._dialect_dispatch = engine.dialect.dispatch

    @property
    def usable(self) -> bool:
        """No listener on the engine's execution events (checked at each call)."""
        if self._dialect_dispatch.handle_error:
            return False
        dispatch = self._dispatch
        return not any(getattr(dispatch, name) for name in EXECUTION_EVENTS)

    async def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """``work()`` in one call into the driver's thread; the usual way if it
        awaits anything but the database."""
        # The unit runs in the caller's context (contextvars: the audit log's actor).
        context = copy_context()
        done = await greenlet_spawn(self._fetch, partial(context.run, _drive), work)  # type: ignore[call-arg]
        if done is _NOT_DONE:
            return await work()
        return cast(T, done)

    def _fetch(self, drive: Callable[..., Any], work: Callable[[], Awaitable[Any]]) -> Any:
        fairy = self._pool.connect()
        try:
            driver: Any = fairy.driver_connection  # an aiosqlite.Connection
            done = await_only(driver._execute(drive, fairy, work))
        except Exception:
            fairy._checkin(transaction_was_reset=True)  # the unit's transaction rolled back
            raise
        except BaseException:
            fairy.invalidate()  # cancelled while the thread ran: its state is unknown
            fairy.close()
            raise
        fairy._checkin(transaction_was_reset=True)  # the thread ended every transaction
        return done


def _drive(fairy: Any, work: Callable[[], Awaitable[Any]]) -> Any:
    """In the driver's thread: run ``work()``'s coroutine through, on the pooled
    connection's synchronous engine; ``_NOT_DONE`` if it suspended."""
    engine = fairy.info.get(ENGINE)
    if engine is None:
        raw = fairy.driver_connection._conn  # the sqlite3 connection, of this thread
        engine = fairy.info[ENGINE] = create_engine(
            "sqlite+pysqlite://", creator=lambda: raw, poolclass=StaticPool
        )
    _here.engine, _here.committed = engine, False
    coroutine: Coroutine[Any, Any, Any] = work()  # type: ignore[assignment]
    try:
        try:
            coroutine.send(None)
        except StopIteration as finished:
            return finished.value
        except RuntimeError as error:  # it asked for the event loop, which is not here
            if "event loop" not in str(error):
                raise
        else:
            with suppress(Suspended, StopIteration):
                coroutine.throw(Suspended())
        if _here.committed:  # unwound after a commit: running it again would repeat it
            raise DatabaseError("a unit of work waited on more than SQLite after it committed")
        return _NOT_DONE
    finally:
        coroutine.close()
        _here.engine = None
