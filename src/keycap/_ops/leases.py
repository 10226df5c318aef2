"""Leases: charges admitted in memory from a slice held in the database
(``keycap._rules.leases`` says how big a slice is, and what it trades away).

Per key and meter a process keeps at most one slice: a hold taken with
``reserve`` (``on_expiry`` as the policy says), spent in memory by each charge
that fits it. A charge that does not fit, or comes once the slice is
``refresh`` old, reserves the next, under a lock per key and meter, while the
spent one is settled in the background; when no slice can be had (too little left, or a
budget refuses even a small one) the charge goes the exact way. The budgets
are never overspent: every slice is a hold, exact in the database.

A slice of *validations* (``validate_key`` with a cost, or of a rate-limited
key) is taken per key, requirement, cost and tracking, in one transaction, for
a number of calls (:meth:`Lease.next_calls`): the key's grant rule and usage
cap decided in SQL with that many uses counted, that many calls consumed of
every rate limit, and a hold per meter for that many calls' cost. Each call
is then admitted in memory: its secret compared (with a per-process keyed
fingerprint, never stored), the key's expiry and client address re-checked.
A slice lasts at most ``refresh``, and never past the end of a consumed rate
limit's window, so no call is counted in a window it was not made in. Its
settlement charges the holds for the calls spent and gives back the uses and
rate-limit units it did not spend.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from keycap._db import keys, rate_limits, rows
from keycap._db.build import AnyRow, KeyRef
from keycap._db.engine import Database
from keycap._errors import BudgetExceededError, DatabaseUnavailableError, HoldClosedError
from keycap._models import APIKey, BudgetStatus, Charge, Hold, RateLimitStatus, Settlement
from keycap._ops import holds
from keycap._ops.refusals import call_units
from keycap._ops.release import CHARGE_IN_FULL
from keycap._ops.results import (
    AlertHandler,
    by_remaining,
    epoch_ms,
    rate_limit_status,
    rate_order,
)
from keycap._ops.units import KeyRefused, RateRefused, Refused, retrying
from keycap._rules import ips, periods
from keycap._rules.leases import Lease, calls_that_fit
from keycap._rules.money import from_micros, to_micros
from keycap._rules.policy import Requirement

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


#: A slice of validations is one key's (its id, and the presented secret's
#: fingerprint), for one requirement, cost (meter, micro-units) and tracking.
Slot = tuple[str, bytes, Requirement, tuple[tuple[str, int], ...], bool]


@dataclass(slots=True)
class _Calls:
    """A slice of validations: ``calls`` admitted in memory until ``until``."""

    calls: int
    spent: int
    until: datetime
    #: The key as the slice's statement left it: what every call it admits returns.
    key: APIKey
    #: The client address the slice was decided for; None when any may spend it
    #: (neither the key nor an identity restricts addresses).
    client: ips.Address | None
    any_client: bool
    #: The hold of each meter, and one call's cost on it.
    holds: tuple[tuple[str, int], ...]
    #: Each rate limit's row after the slice, and one call's units of it.
    limits: tuple[tuple[AnyRow, int], ...]
    #: Whether its uses were counted (tracked, or a capped key).
    counted: bool
    #: The signing secret the key's digest is under.
    pepper_id: str

    def admit(self, now: datetime, client: ips.Address | None) -> APIKey | None:
        if self.spent >= self.calls or now >= self.until:
            return None
        if not self.any_client and client != self.client:
            return None
        expires = self.key.expires_at
        if expires is not None and expires <= now:
            return None  # the exact way says it expired
        self.spent += 1
        return self.key


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
        self._calls: dict[Slot, _Calls] = {}
        self._locks: dict[tuple[Any, ...], asyncio.Lock] = {}
        #: What the budgets had left at the last look, by key and meter.
        self._remaining: dict[tuple[str, str], int] = {}
        #: How many more validations fitted every limit at the last look, by slot.
        self._fits: dict[Slot, int] = {}
        #: Settles under way, by key and meter (or slot).
        self._settling: dict[tuple[Any, ...], set[asyncio.Task[None]]] = {}
        #: Fingerprints presented secrets for :data:`Slot`: this process's own key.
        self._fingerprint_key = os.urandom(32)

    @property
    def validations(self) -> bool:
        """Whether validations are served from slices (``LeasePolicy.validations``)."""
        return self._lease.validations

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
                self._settle_soon(at, self._settle(at, spent, now))
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

    def _settle_soon(self, at: tuple[Any, ...], settle: Awaitable[None]) -> None:
        task = asyncio.ensure_future(settle)
        tasks = self._settling.setdefault(at, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _settled(self, at: tuple[Any, ...]) -> None:
        """Wait for this key's settles under way."""
        if tasks := self._settling.get(at):
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _settle(self, at: tuple[str, str], held: _Slice, now: datetime) -> None:
        """Settle a slice for what it spent (the rest goes back to the budgets)."""
        settled = await self._settle_hold(at, held.hold_id, held.spent, now)
        if settled is not None:
            remaining = (to_micros(b.remaining, "remaining") for b in settled.budgets)
            self._remaining[at] = min(remaining, default=held.amount * 8)

    async def _settle_hold(
        self, at: tuple[Any, ...], hold_id: str, actual: int, now: datetime
    ) -> Settlement | None:
        """Settle a slice's hold for ``actual``; None when it did not settle now. One
        the database cannot take now is kept and retried (``keep``)."""
        try:
            return await holds.settle(
                self._db,
                hold_id=hold_id,
                actual=actual,
                idempotency_key=None,
                now=now,
                on_alert=self._on_alert,
            )
        except HoldClosedError as closed:
            # Past its ttl before it was settled (the process stalled): its expiry
            # rule applied, and with "release" what it admitted went uncharged.
            log.warning("keycap: a lease's slice %s closed before its settle: %s", at[0], closed)
        except DatabaseUnavailableError as error:
            await self._keep(hold_id, actual, error)
        except Exception:
            log.exception("keycap: a lease's slice %s could not be settled", at[0])
        return None

    async def forget(self, key_id: str, now: datetime) -> None:
        """Settle the key's slices now (it was revoked, disabled or deleted through
        this client: it is refused from the next call on)."""
        slots = (*self._slices, *self._calls, *self._settling)
        for at in {at for at in slots if at[0] == key_id}:
            async with self._locks.setdefault(at, asyncio.Lock()):
                if (held := self._slices.pop(at, None)) is not None:
                    await self._settle(at, held, now)
                if (calls := self._calls.pop(at, None)) is not None:
                    await self._settle_calls(at, calls, now)
                await self._settled(at)

    async def close(self, now: datetime) -> None:
        """Settle every slice (``APIKeyClient.aclose``)."""
        for key_id in {at[0] for at in (*self._slices, *self._calls, *self._settling)}:
            await self.forget(key_id, now)

    # --- validations ----------------------------------------------------------------

    def slot(
        self,
        plaintext: str,
        key_id: str,
        req: Requirement,
        amounts: Mapping[str, int] | None,
        track: bool,
    ) -> Slot:
        """Where a validation's slice is kept: a wrong secret finds none, and goes
        the exact way (which refuses it)."""
        seen = hmac.digest(self._fingerprint_key, plaintext.encode(), "sha256")
        return key_id, seen, req, tuple(sorted((amounts or {}).items())), track

    def spend(self, slot: Slot, now: datetime, client: ips.Address | None) -> APIKey | None:
        """A validation admitted from the slot's slice, in memory; None: it has none
        that admits it now."""
        held = self._calls.get(slot)
        return None if held is None else held.admit(now, client)

    async def validate(
        self,
        slot: Slot,
        digests: Callable[[], Awaitable[Mapping[str, str]]],
        taken: Callable[[str], Awaitable[None]],
        now: datetime,
        client: ips.Address | None,
    ) -> APIKey | None:
        """A validation admitted from a new slice (the spent one is settled in the
        background); None: no slice can be had now, and the caller validates
        exactly (which says why, if it refuses). ``digests`` computes the
        presented key's digests; ``taken`` is told the pepper id of the key's
        digest once a slice is taken (the pipeline moves it to the newest)."""
        async with self._locks.setdefault(slot, asyncio.Lock()):
            if (key := self.spend(slot, now, client)) is not None:
                return key  # another caller renewed it meanwhile
            spent = self._calls.pop(slot, None)
            size = self._lease.next_calls(dict(slot[3]), self._fits.get(slot))
            held = None
            if size is not None:
                held = await self._take(slot, await digests(), size, now, client)
            if held is not None:
                await taken(held.pepper_id)
            if spent is not None:
                settle = self._settle_calls(slot, spent, now)
                if held is None:
                    await settle  # the exact call then sees it back
                else:
                    self._settle_soon(slot, settle)
            if held is None:
                await self._settled(slot)
                return None
            self._calls[slot] = held
            return held.admit(now, client)

    def observe(self, slot: Slot, key: APIKey) -> None:
        """Remember how many calls fit after an exact validation (``key`` as it
        returned), which sizes the next slice."""
        amounts = dict(slot[3])
        room = _rate_room([] if key.rate_limit is None else [key.rate_limit], amounts)
        if key.charge is not None:
            room.extend(_budget_room(key.charge.budgets, amounts))
        self._remember(slot, room, key.max_uses, key.use_count)

    def _remember(
        self, slot: Slot, room: list[tuple[int, int]], max_uses: int | None, use_count: int
    ) -> None:
        """Keep how many calls fit (``room``, and the usage cap) for the next slice."""
        if max_uses is not None:
            room.append((max_uses - use_count, 1))
        fits = calls_that_fit(room)
        if fits is None:
            self._fits.pop(slot, None)
        else:
            self._fits[slot] = fits

    async def _take(
        self,
        slot: Slot,
        digests: Mapping[str, str],
        size: int,
        now: datetime,
        client: ips.Address | None,
    ) -> _Calls | None:
        """A slice of ``size`` validations, in one transaction; None: refused (by
        the key, a rate limit or a budget), nothing taken."""
        key_id, _, req, cost, track = slot
        lease = self._lease
        on_expiry = CHARGE_IN_FULL if lease.on_expiry == "charge" else None

        async def unit() -> tuple[AnyRow, list[AnyRow], list[Hold]]:
            async with self._db.begin() as conn:
                row = await keys.record_metered_use(
                    conn, key_id, digests, req, now, track=track, client=client, uses=size
                )
                if row is None:
                    raise KeyRefused()
                key = KeyRef.of(key_id, row)
                scaled = {meter: amount * size for meter, amount in cost}
                limits = await rate_limits.consume_rates(
                    conn, key, scaled, epoch_ms(now), row.rate_limit_count, calls=size
                )
                if limits is None:
                    raise RateRefused(key=key)
                held = [
                    await holds.hold_in(conn, key, meter, amount, now, lease.ttl, on_expiry)
                    for meter, amount in scaled.items()
                    if amount > 0
                ]
                return row, limits, held

        try:
            row, limits, held = await retrying(self._db, unit)
        except Refused:
            self._fits[slot] = 0  # the exact way decides until it sees room again
            return None
        return self._sliced(slot, row, limits, held, size, now, client)

    def _sliced(
        self,
        slot: Slot,
        row: AnyRow,
        limits: Sequence[AnyRow],
        held: Sequence[Hold],
        size: int,
        now: datetime,
        client: ips.Address | None,
    ) -> _Calls:
        """The slice a :meth:`_take` took, and how many calls fit beside it."""
        amounts = dict(slot[3])
        per_limit = [(limit, call_units(limit, amounts)) for limit in limits]
        until = now + self._lease.refresh
        for limit, per_call in per_limit:
            if per_call > 0:
                ends = periods.EPOCH + timedelta(milliseconds=limit.window_start + limit.window_ms)
                until = min(until, ends)
        statuses = [rate_limit_status(limit, now) for limit in limits]
        room = _rate_room(statuses, amounts)
        budgets = by_remaining([b for hold in held for b in hold.budgets])
        room.extend(_budget_room(budgets, amounts))
        self._remember(slot, room, row.max_uses, row.use_count)
        counted = slot[4] or row.max_uses is not None
        charge = None
        if amounts:
            charge = Charge.model_construct(
                key_id=slot[0],
                identity_id=None,
                amounts={meter: from_micros(amount) for meter, amount in amounts.items()},
                budgets=tuple(budgets),
                alerts=(),
                replayed=False,
                leased=True,
            )
        tightest = min(statuses, key=rate_order) if statuses else None
        key = rows.to_key(row, rate_limit=tightest, charge=charge)
        any_client = row.allowed_ips is None and row.identity_id is None
        return _Calls(
            calls=size,
            spent=0,
            until=until,
            key=key,
            client=client,
            any_client=any_client,
            holds=tuple((hold.id, amounts[hold.meter]) for hold in held),
            limits=tuple(per_limit),
            counted=counted,
            pepper_id=row.pepper_id,
        )

    async def _settle_calls(self, slot: Slot, held: _Calls, now: datetime) -> None:
        """Settle a slice of validations: its holds charged for the calls it
        admitted, and the uses and rate-limit units it did not spend given back.
        A give-back that fails is logged: what stays counted only refuses more
        (never admits more) until its window passes."""
        for hold_id, per_call in held.holds:
            await self._settle_hold(slot, hold_id, per_call * held.spent, now)
        unspent = held.calls - held.spent
        if not unspent:
            return

        async def unit() -> None:
            async with self._db.begin() as conn:
                if held.counted:
                    await keys.give_back_uses(conn, slot[0], unspent)
                for limit, per_call in held.limits:
                    await rate_limits.give_back(conn, limit, per_call * unspent)

        try:
            await retrying(self._db, unit)
        except Exception:
            log.exception("keycap: a lease's unspent calls of %s could not be given back", slot[0])


def _rate_room(
    statuses: Sequence[RateLimitStatus], amounts: Mapping[str, int]
) -> list[tuple[int, int]]:
    """``(left, per_call)`` of each rate limit, in its units (calls, or micro-units
    of its meter), for :func:`calls_that_fit`."""
    return [
        (
            int(s.remaining) if s.meter is None else to_micros(s.remaining, "remaining"),
            call_units(s, amounts),
        )
        for s in statuses
    ]


def _budget_room(
    budgets: Sequence[BudgetStatus], amounts: Mapping[str, int]
) -> list[tuple[int, int]]:
    """``(left, per_call)`` of each budget, for :func:`calls_that_fit`."""
    return [(to_micros(b.remaining, "remaining"), amounts.get(b.meter, 0)) for b in budgets]


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
