"""Leases: charges admitted in memory from a slice held in the database
(``keycap._rules.leases`` says how big a slice is, and what it trades away).

Per key and meter a process keeps at most one slice: a hold taken with
``reserve`` (``on_expiry`` as the policy says), spent in memory by each charge
that fits it. A charge that does not fit, or comes once the slice is
``refresh`` old, reserves the next, under a lock per key and meter, while the
spent one is settled in the background; when no slice can be had (too little left, or a
budget refuses even a small one) the charge goes the exact way. The budgets
are never overspent: every slice is a hold, exact in the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from keycap._db.engine import Database
from keycap._errors import BudgetExceededError, DatabaseUnavailableError, HoldClosedError
from keycap._models import BudgetStatus, Charge
from keycap._ops import holds
from keycap._ops.release import CHARGE_IN_FULL
from keycap._ops.results import AlertHandler
from keycap._rules.leases import Lease
from keycap._rules.money import from_micros, to_micros

log = logging.getLogger("keycap")


@dataclass(slots=True)
class _Slice:
    hold_id: str
    amount: int
    spent: int
    taken: datetime
    #: Its budgets as the reserve left them (what a leased charge reports).
    budgets: tuple[BudgetStatus, ...]
    #: The result of its last charge: the next of the same amount returns it
    #: again (results are frozen models), sparing the model's construction.
    last: Charge | None = None
    last_amount: int = 0

    def admits(self, amount: int, now: datetime, lease: Lease) -> bool:
        return self.amount - self.spent >= amount and now - self.taken < lease.refresh


#: What the client does with a slice's settlement the database could not take
#: (``hold_id``, ``actual`` in micro-units): keep it and retry it
#: (``APIKeyClient``'s kept settlements), so what the slice admitted is charged.
Keep = Callable[[str, int, DatabaseUnavailableError], Awaitable[None]]


class Leases:
    """The slices of one client, by key and meter.

    Renewing a slice, the caller waits for the next slice's reserve only: the
    spent one is settled afterwards in the background (a task this object
    keeps, awaited by :meth:`close`). A reserve refused while the key's spent
    slice is not yet settled settles it first and tries again, so a refusal is
    never caused by money on its way back.
    """

    def __init__(
        self, db: Database, lease: Lease, on_alert: AlertHandler | None, keep: Keep
    ) -> None:
        self._db = db
        self._lease = lease
        self._on_alert = on_alert
        self._keep = keep
        self._slices: dict[tuple[str, str], _Slice] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        #: What the budgets had left at the last look, by key and meter.
        self._remaining: dict[tuple[str, str], int] = {}
        #: Settles under way, by key and meter.
        self._settling: dict[tuple[str, str], set[asyncio.Task[None]]] = {}

    async def charge(self, key_id: str, meter: str, amount: int, now: datetime) -> Charge | None:
        """``amount`` charged from the key's slice of ``meter``; None: no slice can
        be had, and the caller charges exactly (which may refuse)."""
        at = (key_id, meter)
        if (held := self._slices.get(at)) is not None and held.admits(amount, now, self._lease):
            held.spent += amount  # no await since the check: no other call between
            return _charged(key_id, meter, amount, held)
        async with self._locks.setdefault(at, asyncio.Lock()):
            held = self._slices.get(at)
            if held is not None and held.admits(amount, now, self._lease):
                held.spent += amount
                return _charged(key_id, meter, amount, held)
            spent = self._slices.pop(at, None)
            held, spent = await self._reserve(at, amount, now, spent)
            if spent is not None:
                self._settle_soon(at, spent, now)
            if held is None:
                await self._settled(at)  # the exact charge then sees every slice back
                return None
            held.spent = amount
            self._slices[at] = held
            return _charged(key_id, meter, amount, held)

    async def _reserve(
        self, at: tuple[str, str], amount: int, now: datetime, spent: _Slice | None
    ) -> tuple[_Slice | None, _Slice | None]:
        """The next slice for calls of ``amount`` (None when none can be had), and
        ``spent``, the slice it replaces, if it is still to be settled.

        The next slice is reserved before the spent one is settled: the two would
        wait on each other's row locks, and the caller waits only for the
        reserve. A budget refusing the slice says what it has left: then the spent
        slice (and this key's settles under way) give their money back first,
        and a smaller slice is tried."""
        for _ in range(3):
            size = self._lease.next_slice(amount, self._remaining.get(at))
            if size is None:
                return None, spent
            try:
                hold = await holds.reserve(
                    self._db,
                    key_id=at[0],
                    meter=at[1],
                    amount=size,
                    ttl=self._lease.ttl,
                    idempotency_key=None,
                    now=now,
                    on_expiry=CHARGE_IN_FULL if self._lease.on_expiry == "charge" else None,
                )
            except BaseException as error:
                if isinstance(error, BudgetExceededError):
                    self._remaining[at] = to_micros(error.remaining, "remaining")
                if spent is not None:  # refused, or the key's own error: settle it
                    await self._settle(at, spent, now)
                    spent = None
                if not isinstance(error, BudgetExceededError):
                    raise
                await self._settled(at)
                continue
            self._remaining[at] = min(
                (to_micros(b.remaining, "remaining") for b in hold.budgets), default=size * 8
            )
            return _Slice(hold.id, size, 0, now, hold.budgets), spent
        return None, spent

    def _settle_soon(self, at: tuple[str, str], held: _Slice, now: datetime) -> None:
        task = asyncio.ensure_future(self._settle(at, held, now))
        tasks = self._settling.setdefault(at, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _settled(self, at: tuple[str, str]) -> None:
        """Wait for this key's settles under way."""
        if tasks := self._settling.get(at):
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _settle(self, at: tuple[str, str], held: _Slice, now: datetime) -> None:
        """Settle a slice for what it spent (the rest goes back to the budgets). One
        the database cannot take now is kept and retried (``keep``)."""
        try:
            settled = await holds.settle(
                self._db,
                hold_id=held.hold_id,
                actual=held.spent,
                idempotency_key=None,
                now=now,
                on_alert=self._on_alert,
            )
        except HoldClosedError as closed:
            # Past its ttl before it was settled (the process stalled): its expiry
            # rule applied, and with "release" what it admitted went uncharged.
            log.warning("keycap: a lease's slice %s closed before its settle: %s", at, closed)
        except DatabaseUnavailableError as error:
            await self._keep(held.hold_id, held.spent, error)
        except Exception:
            log.exception("keycap: a lease's slice %s could not be settled", at)
        else:
            remaining = (to_micros(b.remaining, "remaining") for b in settled.budgets)
            self._remaining[at] = min(remaining, default=held.amount * 8)

    async def forget(self, key_id: str, now: datetime) -> None:
        """Settle the key's slices now (it was revoked, disabled or deleted through
        this client: it is refused from the next call on)."""
        for at in {at for at in (*self._slices, *self._settling) if at[0] == key_id}:
            async with self._locks.setdefault(at, asyncio.Lock()):
                if (held := self._slices.pop(at, None)) is not None:
                    await self._settle(at, held, now)
                await self._settled(at)

    async def close(self, now: datetime) -> None:
        """Settle every slice (``APIKeyClient.aclose``)."""
        for key_id in {at[0] for at in (*self._slices, *self._settling)}:
            await self.forget(key_id, now)


def _charged(key_id: str, meter: str, amount: int, held: _Slice) -> Charge:
    """A leased charge's result (a slice is one key's and one meter's)."""
    if held.last is not None and held.last_amount == amount:
        return held.last
    held.last_amount = amount
    held.last = Charge.model_construct(
        key_id=key_id,
        identity_id=None,
        amounts={meter: from_micros(amount)},
        budgets=held.budgets,
        alerts=(),
        replayed=False,
        leased=True,
    )
    return held.last
