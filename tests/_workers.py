"""Work run in separate processes by the concurrency tests (must be importable by spawn)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import datetime
from decimal import Decimal
from typing import Any

from keycap import APIKeyClient, KeycapError, LeasePolicy, RateLimitedError
from tests.conftest import SECRET


def validate_many(url: str, plaintext: str, calls: int) -> dict[str, int]:
    async def run() -> dict[str, int]:
        outcomes: Counter[str] = Counter()
        async with APIKeyClient(url, signing_secret=SECRET) as client:

            async def one() -> None:
                try:
                    await client.validate_key(plaintext)
                    outcomes["ok"] += 1
                except KeycapError as error:
                    outcomes[error.code] += 1

            await asyncio.gather(*(one() for _ in range(calls)))
        return dict(outcomes)

    return asyncio.run(run())


def get_or_create_many(url: str, name: str, calls: int) -> list[tuple[str, bool]]:
    async def run() -> list[tuple[str, bool]]:
        async with APIKeyClient(url, signing_secret=SECRET) as client:
            results = await asyncio.gather(
                *(client.get_or_create_organization(name) for _ in range(calls))
            )
        return [(org.id, created) for org, created in results]

    return asyncio.run(run())


class FixedClock:
    """A picklable clock: every process of a test sees the same instant."""

    def __init__(self, iso: str) -> None:
        self.now = datetime.fromisoformat(iso)

    def __call__(self) -> datetime:
        return self.now


def metered_many(
    url: str, op: str, target: str, amount: str | None, calls: int, clock_iso: str | None
) -> dict[str, object]:
    """Fire ``calls`` concurrent operations; count outcomes, collect retry_after values."""

    async def run() -> dict[str, object]:
        outcomes: Counter[str] = Counter()
        retry_afters: set[float | None] = set()
        clock = FixedClock(clock_iso) if clock_iso else None
        async with APIKeyClient(url, signing_secret=SECRET, clock=clock) as client:

            async def one() -> None:
                try:
                    cost = None if amount is None else Decimal(amount)
                    if op == "charge":
                        await client.charge(target, cost)  # type: ignore[arg-type]
                    elif op == "reserve":
                        await client.reserve(target, cost)  # type: ignore[arg-type]
                    else:
                        await client.validate_key(target, cost=cost)
                    outcomes["ok"] += 1
                except RateLimitedError as error:
                    outcomes[error.code] += 1
                    retry_afters.add(error.retry_after)
                except KeycapError as error:
                    outcomes[error.code] += 1

            await asyncio.gather(*(one() for _ in range(calls)))
        return {
            "outcomes": dict(outcomes),
            "retry_afters": sorted(r for r in retry_afters if r is not None),
        }

    return asyncio.run(run())


def charge_forever(url: str, key_id: str, ready: Any) -> None:
    """Charge in a loop until killed (the SIGKILL test)."""

    async def run() -> None:
        async with APIKeyClient(url, signing_secret=SECRET) as client:
            n = 0
            while True:
                await asyncio.gather(
                    *(client.charge(key_id, Decimal("0.000001")) for _ in range(4))
                )
                n += 1
                if n == 5:
                    ready.set()  # a multiprocessing.Event: the test may kill us now

    asyncio.run(run())


def storm(
    url: str,
    op: str,
    target: str,
    amount: str | None,
    calls: int,
    lock_pass: bool = True,
    clock_iso: str | None = None,
) -> int:
    """``calls`` concurrent charges (``op="charge"`` or ``"idempotent charge"``, of a
    key, or of a keyless identity: a transaction on every database) or reserves
    (``"reserve"``, or ``"reserve and settle half"``: then settle for half or
    release) of the key id ``target``, or validations (of the plaintext
    ``target``, with ``amount`` as their cost); how many were admitted.
    With ``lock_pass=False``, PostgreSQL's one-statement forms without their lock
    pass: the negative control of tests/test_one_statement.py."""
    from keycap._db import metering

    if not lock_pass:
        charge, validation = metering.charge_statement, metering.validation_statement
        metering.charge_statement = (  # type: ignore[assignment]
            lambda count, lock_pass=True, idempotent=False: charge(count, False, idempotent)
        )
        metering.validation_statement = (  # type: ignore[assignment]
            lambda req, peppers, count, track, lock_pass=True: validation(
                req, peppers, count, track, False
            )
        )

    async def run() -> int:
        admitted = 0
        clock = FixedClock(clock_iso) if clock_iso else None
        cost = None if amount is None else Decimal(amount)
        async with APIKeyClient(url, signing_secret=SECRET, clock=clock) as client:

            async def one() -> None:
                nonlocal admitted
                try:
                    if op == "charge":
                        await client.charge(target, cost)  # type: ignore[arg-type]
                    elif op == "reserve":
                        await client.reserve(target, cost)  # type: ignore[arg-type]
                    elif op == "reserve and settle half":  # or release, every other call
                        hold = await client.reserve(target, cost)  # type: ignore[arg-type]
                        if admitted % 2:
                            await client.release(hold.id)
                        else:
                            await client.settle(hold.id, cost / 2)  # type: ignore[operator]
                    elif op == "idempotent charge":  # with its operation's row
                        idem = uuid.uuid4().hex
                        await client.charge(target, cost, idempotency_key=idem)  # type: ignore[arg-type]
                    else:
                        await client.validate_key(target, cost=cost)
                    admitted += 1
                except KeycapError as error:
                    assert error.code in ("budget_exceeded", "rate_limited"), error

            await asyncio.gather(*(one() for _ in range(calls)))
        return admitted

    return asyncio.run(run())


def lease_storm(url: str, key_id: str, amount: str, calls: int, slice_: str) -> int:
    """``calls`` concurrent coroutines each charging ``amount`` from this process's
    lease until a charge is refused; how many were admitted. The client's close
    settles the last slice."""

    async def run() -> int:
        admitted = 0
        policy = LeasePolicy(slice=slice_, refresh="1s", ttl="60s")
        async with APIKeyClient(url, signing_secret=SECRET, leases=policy) as client:

            async def one() -> None:
                nonlocal admitted
                while True:
                    try:
                        await client.charge(key_id, Decimal(amount))
                    except KeycapError as error:
                        assert error.code == "budget_exceeded", error
                        return
                    admitted += 1

            await asyncio.gather(*(one() for _ in range(calls)))
        return admitted

    return asyncio.run(run())


def lease_validate_storm(url: str, plaintext: str, amount: str, calls: int, size: int) -> int:
    """``calls`` concurrent coroutines each validating ``plaintext`` with a cost of
    ``amount`` from this process's slices of ``size`` calls, until refused; how
    many were admitted. The client's close settles the last slice."""

    async def run() -> int:
        admitted = 0
        policy = LeasePolicy(slice="1.00", calls=size, refresh="1s", ttl="60s")
        async with APIKeyClient(url, signing_secret=SECRET, leases=policy) as client:

            async def one() -> None:
                nonlocal admitted
                while True:
                    try:
                        await client.validate_key(plaintext, cost=Decimal(amount))
                    except KeycapError as error:
                        assert error.code in ("budget_exceeded", "rate_limited"), error
                        return
                    admitted += 1

            await asyncio.gather(*(one() for _ in range(calls)))
        return admitted

    return asyncio.run(run())


def lease_forever(
    url: str, key_id: str, on_expiry: str, admitted: Any, ready: Any, plaintext: str | None = None
) -> None:
    """Charge 0.01 from a lease in a loop until killed (the lease SIGKILL test),
    counting the admitted calls in ``admitted`` (a shared ``multiprocessing.Value``).
    With ``plaintext``, validate it with a cost of 0.01 instead (slices of 10 calls)."""

    async def run() -> None:
        policy = LeasePolicy(slice="0.10", refresh="1s", ttl="2s", on_expiry=on_expiry, calls=10)
        async with APIKeyClient(url, signing_secret=SECRET, leases=policy) as client:
            while True:
                if plaintext is None:
                    await client.charge(key_id, Decimal("0.01"))
                else:
                    await client.validate_key(plaintext, cost=Decimal("0.01"))
                with admitted.get_lock():
                    admitted.value += 1
                    if admitted.value == 25:
                        ready.set()  # a multiprocessing.Event: the test may kill us now
                await asyncio.sleep(0.01)

    asyncio.run(run())
