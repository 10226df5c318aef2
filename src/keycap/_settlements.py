"""Settlements the database could not take when they were made, kept and retried.

``APIKeyClient.settle_eventually`` (and KeycapMiddleware's meters, which use
it) settles at once when the database answers. When it does not (a
``DatabaseUnavailableError``), the settlement is kept here, in memory, handed
to the client's ``on_unsettled`` hook (to persist it, if you want it to survive
the process), and retried with backoff until the database takes it. A hold
that expired meanwhile (its amount went back to the budgets) is charged
instead, so what was used is still paid. Logs go to ``keycap.settlements``:
kept at WARNING, lost at ERROR.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from keycap._errors import DatabaseUnavailableError, HoldClosedError, KeycapError
from keycap._models import Settlement

log = logging.getLogger("keycap.settlements")

#: Settlements kept in memory at most; past it they go to the hook and the log only.
LIMIT = 10_000
_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class PendingSettlement:
    """A settlement not yet written: settle ``hold_id`` with ``actual``.

    Replaying it is safe: ``client.settle(hold_id, actual,
    idempotency_key=idempotency_key)`` settles once however often it is sent.
    """

    hold_id: str
    actual: Decimal
    idempotency_key: str
    failed_at: datetime


Settle = Callable[[PendingSettlement], Awaitable[Settlement]]
Charge = Callable[[PendingSettlement], Awaitable[object]]
Hook = Callable[[PendingSettlement], Awaitable[None]]


class Pending:
    """The kept settlements of one client, and the task that retries them."""

    def __init__(self, settle: Settle, charge: Charge, hook: Hook | None, limit: int = LIMIT):
        self._settle, self._charge, self._hook, self._limit = settle, charge, hook, limit
        self._kept: dict[str, PendingSettlement] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def kept(self) -> tuple[PendingSettlement, ...]:
        return tuple(self._kept.values())

    async def keep(self, pending: PendingSettlement, error: KeycapError) -> None:
        if len(self._kept) >= self._limit:
            log.error(
                "keycap: settlement of hold %s (%s) not kept: %d already waiting; "
                "only the on_unsettled hook has it",
                pending.hold_id,
                pending.actual,
                len(self._kept),
            )
        else:
            self._kept[pending.hold_id] = pending
            log.warning(
                "keycap: settlement of hold %s (%s) kept for retry: %s",
                pending.hold_id,
                pending.actual,
                error.code,
            )
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._retry_until_written())
        if self._hook is not None:
            try:
                await self._hook(pending)
            except Exception:
                log.exception("keycap: the on_unsettled hook failed for hold %s", pending.hold_id)

    async def retry(self) -> int:
        """Try every kept settlement once; how many were written (or charged)."""
        written = 0
        for pending in list(self._kept.values()):
            try:
                await self._write(pending)
            except DatabaseUnavailableError:
                break  # still down: the rest would fail the same way
            except KeycapError as error:
                log.error(
                    "keycap: settlement of hold %s (%s) lost: %s",
                    pending.hold_id,
                    pending.actual,
                    error,
                )
            else:
                written += 1
            self._kept.pop(pending.hold_id, None)
        return written

    async def _write(self, pending: PendingSettlement) -> None:
        try:
            await self._settle(pending)
        except HoldClosedError as closed:
            if closed.status != "expired":
                raise  # settled or released already: nothing left to write
            # Its amount went back to the budgets at its ttl: charge what was used.
            await self._charge(pending)

    async def _retry_until_written(self) -> None:
        attempt = 0
        while self._kept:
            await asyncio.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
            attempt += 1
            await self.retry()

    async def close(self) -> None:
        """Stop retrying: one last try, then whatever is left is logged as lost."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._kept:
            await self.retry()
        for pending in self._kept.values():
            log.error(
                "keycap: client closed with the settlement of hold %s (%s) unwritten",
                pending.hold_id,
                pending.actual,
            )
        self._kept.clear()
