"""Round trips to a database server, counted on the wire.

A :class:`WireCounter` is a TCP proxy in the test's own event loop between the
driver and the server. A round trip is an exchange: the client sends (however
many messages, however many writes) and then the server answers. Counting
turns of the conversation, not statements, is what the driver really pays:
asyncpg's Parse/Bind/Execute/Sync sent together is one; a BEGIN is one; the
pool's ROLLBACK at checkin is one.

SQLite has no server: :func:`count_sqlite_hops` counts the calls aiosqlite makes
into its worker thread instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal as D
from typing import Any

from sqlalchemy.engine import make_url


class WireCounter:
    """A counting proxy to ``host:port``; :meth:`url` rewrites a URL to go through it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.round_trips = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> WireCounter:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    def url(self, url: str) -> str:
        assert self._server is not None
        listen_port = self._server.sockets[0].getsockname()[1]
        parsed = make_url(url).set(host="127.0.0.1", port=listen_port)
        return parsed.render_as_string(hide_password=False)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.host, self.port)
        # Who spoke last on this connection: a client burst after the server spoke
        # (or the first one) starts a new round trip.
        state = {"last": "server"}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, side: str) -> None:
            try:
                while data := await src.read(65536):
                    if side == "client" and state["last"] == "server":
                        self.round_trips += 1
                    state["last"] = side
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for task in (
            asyncio.create_task(pump(client_r, server_w, "client")),
            asyncio.create_task(pump(server_r, client_w, "server")),
        ):
            self._pumps.add(task)

    @contextlib.contextmanager
    def counting(self) -> Iterator[list[int]]:
        """``with counter.counting() as seen:``; ``seen[0]`` is the round trips inside."""
        seen = [0]
        before = self.round_trips
        try:
            yield seen
        finally:
            seen[0] = self.round_trips - before


@contextlib.asynccontextmanager
async def wire_counter(url: str) -> AsyncIterator[WireCounter]:
    parsed = make_url(url)
    async with WireCounter(parsed.host or "127.0.0.1", parsed.port or 5432) as counter:
        yield counter


@contextlib.contextmanager
def count_sqlite_hops() -> Iterator[list[int]]:
    """Calls into aiosqlite's worker thread inside the block: ``seen[0]``."""
    import aiosqlite.core

    seen = [0]
    original = aiosqlite.core.Connection._execute

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        seen[0] += 1
        return await original(self, fn, *args, **kwargs)

    aiosqlite.core.Connection._execute = counted  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        aiosqlite.core.Connection._execute = original  # type: ignore[method-assign]


# --- the hot calls, measured (tests/test_round_trips.py pins them; the benchmark
# prints them) -----------------------------------------------------------------------

Call = Callable[[], Awaitable[Any]]


async def hot_calls(client: Any) -> dict[str, Call]:
    """Each hot call of issue 10 on keys made for it, in the common case (admitted)."""
    from keycap import Budget, RateLimit

    org = (await client.create_organization("round trips")).id
    plain = await client.create_key(org)
    limited = await client.create_key(org, rate_limits=[RateLimit(1_000_000, "minute")])
    metered = await client.create_key(
        org, budgets=[Budget(D(1000))], rate_limits=[RateLimit(1_000_000, "minute")]
    )
    await client.set_budget(org, Budget(D(5000)))

    async def settle() -> Any:
        hold = await client.reserve(metered.id, D("0.05"))
        return lambda: client.settle(hold.id, D("0.03"))

    async def release() -> Any:
        hold = await client.reserve(metered.id, D("0.05"))
        return lambda: client.release(hold.id)

    async def replayed() -> Any:
        key = uuid.uuid4().hex
        await client.charge(metered.id, D("0.01"), idempotency_key=key)
        return lambda: client.charge(metered.id, D("0.01"), idempotency_key=key)

    def fresh() -> str:
        return uuid.uuid4().hex

    async def settle_idempotently() -> Any:
        hold = await client.reserve(metered.id, D("0.05"))
        return lambda: client.settle(hold.id, D("0.03"), idempotency_key=fresh())

    async def release_idempotently() -> Any:
        hold = await client.reserve(metered.id, D("0.05"))
        return lambda: client.release(hold.id, idempotency_key=fresh())

    return {
        "validate (read)": lambda: client.validate_key(plain.plaintext, track_usage=False),
        "validate (tracked)": lambda: client.validate_key(plain.plaintext),
        "validate (rate-limited)": lambda: client.validate_key(limited.plaintext),
        "validate (metered)": lambda: client.validate_key(metered.plaintext, cost=D("0.01")),
        "charge": lambda: client.charge(metered.id, D("0.01")),
        "reserve": lambda: client.reserve(metered.id, D("0.01")),
        # These need a hold, or a charge, first: the setup call returns the measured one.
        "settle": settle,
        "release": release,
        "charge (idempotent)": lambda: client.charge(
            metered.id, D("0.01"), idempotency_key=fresh()
        ),
        "charge (replayed)": replayed,
        "reserve (idempotent)": lambda: client.reserve(
            metered.id, D("0.01"), idempotency_key=fresh()
        ),
        "settle (idempotent)": settle_idempotently,
        "release (idempotent)": release_idempotently,
    }


_NEEDS_SETUP = {
    "settle",
    "release",
    "charge (replayed)",
    "settle (idempotent)",
    "release (idempotent)",
}


async def measure(client: Any, counting: Callable[[], Any]) -> dict[str, int]:
    """Round trips (SQLite: thread hops) of each of :func:`hot_calls`, warm, alone."""
    calls = await hot_calls(client)
    seen: dict[str, int] = {}
    for name, call in calls.items():
        for _ in range(3):  # warm: statements prepared, caches filled, the key known
            await ((await call())() if name in _NEEDS_SETUP else call())
        measured = await call() if name in _NEEDS_SETUP else call
        with counting() as count:
            await measured()
        seen[name] = count[0]
    return seen
