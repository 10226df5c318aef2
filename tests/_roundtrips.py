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
from collections.abc import AsyncIterator, Iterator
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
