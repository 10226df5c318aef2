"""Leases (``APIKeyClient(leases=LeasePolicy(...))``): charges and validations
admitted in memory from a slice held in the database, settled in batches; never
over a budget, a rate limit or a usage cap."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta
from decimal import Decimal as D

import pytest
from sqlalchemy import select

from keycap import (
    APIKeyClient,
    Budget,
    BudgetExceededError,
    ConfigurationError,
    DatabaseUnavailableError,
    DisabledKeyError,
    ExpiredKeyError,
    ForbiddenError,
    InvalidKeyError,
    LeasePolicy,
    RateLimit,
    RateLimitedError,
    RevokedKeyError,
    UsageExhaustedError,
)
from keycap._db.schema import holds, ledger
from keycap._rules.leases import Lease, calls_that_fit
from keycap._rules.tokens import KeyFormat
from tests import _workers
from tests._ledger import assert_balances_match_ledger
from tests.conftest import REPORT, SECRET, FakeClock

# --- the slice, without a database ------------------------------------------------------


def test_a_slice_shrinks_with_what_is_left_and_stops_near_exhaustion() -> None:
    lease = LeasePolicy(slice="1.00").checked()
    cent = 10_000
    assert lease.next_slice(cent, None) == 1_000_000  # the policy's slice
    assert lease.next_slice(cent, 10_000_000) == 1_000_000
    assert lease.next_slice(cent, 400_000) == 100_000  # a quarter of what is left
    assert lease.next_slice(cent, 170_000) == 40_000  # whole calls: 4 of them
    assert lease.next_slice(cent, 150_000) is None  # 3 calls' worth: charge exactly
    assert lease.next_slice(0, None) is None
    assert lease.next_slice(3 * cent, None) == 990_000  # 33 calls


@pytest.mark.parametrize(
    ("policy", "says"),
    [
        (LeasePolicy(slice="0"), "slice"),
        (LeasePolicy(slice="-1"), "slice"),
        (LeasePolicy(slice="x"), "slice"),
        (LeasePolicy(slice="1", refresh="10s", ttl="5s"), "ttl"),
        (LeasePolicy(slice="1", ttl="31d"), "ttl"),
        (LeasePolicy(slice="1", on_expiry="keep"), "on_expiry"),
        (LeasePolicy(slice="1", min_calls=0), "min_calls"),
    ],
)
def test_a_bad_lease_policy_is_a_configuration_error(policy: LeasePolicy, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        policy.checked()


def test_leases_must_be_a_lease_policy() -> None:
    with pytest.raises(ConfigurationError, match="LeasePolicy"):
        APIKeyClient("sqlite://", signing_secret=SECRET, leases={"slice": "1"})  # type: ignore[arg-type]


def test_a_checked_policy_keeps_its_values() -> None:
    assert LeasePolicy(slice="0.5", refresh="2s", ttl="1m", on_expiry="charge").checked() == (
        Lease(500_000, timedelta(seconds=2), timedelta(minutes=1), "charge", 4)
    )


# --- on every database ------------------------------------------------------------------


async def _leasing(db_url: str, clock: FakeClock, **policy: object) -> APIKeyClient:
    options = {"slice": "0.10", "refresh": "10s", "ttl": "60s", **policy}
    return APIKeyClient(
        db_url,
        signing_secret=SECRET,
        clock=clock,
        leases=LeasePolicy(**options),  # type: ignore[arg-type]
    )


async def test_leased_charges_spend_a_slice_in_memory_and_settle_exactly(
    client: APIKeyClient, db_url: str, clock: FakeClock
) -> None:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, budgets=[Budget(D("1.00"))])
    async with await _leasing(db_url, clock) as leasing:
        charges = [await leasing.charge(issued.id, D("0.01")) for _ in range(25)]
        assert all(c.leased for c in charges)
        (status,) = await client.get_budgets(issued.id)
        assert status.used + status.held == D("0.30")  # 2 slices settled, 1 open
    async with client.engine.connect() as conn:
        opened = (await conn.execute(select(holds.c.status, holds.c.settled_micros))).all()
    # Three slices of 0.10, each settled for what it spent.
    assert sorted(opened) == [("settled", 50_000), ("settled", 100_000), ("settled", 100_000)]
    (status,) = await client.get_budgets(issued.id)
    assert status.used == D("0.25") and status.held == 0
    await assert_balances_match_ledger(client)


async def test_a_charge_with_metadata_or_an_idempotency_key_is_never_leased(
    client: APIKeyClient, db_url: str, clock: FakeClock
) -> None:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, budgets=[Budget(D("1.00"))])
    async with await _leasing(db_url, clock) as leasing:
        assert not (await leasing.charge(issued.id, D("0.01"), metadata={"a": 1})).leased
        assert not (await leasing.charge(issued.id, D("0.01"), idempotency_key="k1")).leased
        assert not (await leasing.charge(issued.id, {"a": D("0.01"), "b": D("1")})).leased
    (status,) = await client.get_budgets(issued.id)
    assert status.used == D("0.02")


async def test_a_key_revoked_by_another_process_is_refused_within_refresh(
    client: APIKeyClient, db_url: str, clock: FakeClock
) -> None:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, budgets=[Budget(D("1.00"))])
    async with await _leasing(db_url, clock, refresh="10s") as leasing:
        await leasing.charge(issued.id, D("0.01"))
        await client.revoke_key(issued.id)  # another client: the lease does not know
        clock.advance(seconds=9)
        assert (await leasing.charge(issued.id, D("0.01"))).leased  # within the bound
        clock.advance(seconds=1)
        with pytest.raises(RevokedKeyError):
            await leasing.charge(issued.id, D("0.01"))
    (status,) = await client.get_budgets(issued.id)
    assert status.used == D("0.02") and status.held == 0
    await assert_balances_match_ledger(client)


async def test_a_key_revoked_through_the_leasing_client_is_refused_at_once(
    client: APIKeyClient, db_url: str, clock: FakeClock
) -> None:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, budgets=[Budget(D("1.00"))])
    async with await _leasing(db_url, clock) as leasing:
        await leasing.charge(issued.id, D("0.01"))
        await leasing.revoke_key(issued.id)
        with pytest.raises(RevokedKeyError):
            await leasing.charge(issued.id, D("0.01"))
    (status,) = await client.get_budgets(issued.id)
    assert status.used == D("0.01") and status.held == 0


async def test_near_exhaustion_leases_shrink_then_charges_go_exact(
    client: APIKeyClient, db_url: str, clock: FakeClock
) -> None:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, budgets=[Budget(D("0.50"))])
    async with await _leasing(db_url, clock, slice="0.20") as leasing:
        admitted = 0
        with pytest.raises(BudgetExceededError):
            while True:
                await leasing.charge(issued.id, D("0.01"))
                admitted += 1
    # Alone, a process strands nothing: the last cents were charged exactly.
    assert admitted == 50
    (status,) = await client.get_budgets(issued.id)
    assert status.used == D("0.50") and status.held == 0
    await assert_balances_match_ledger(client)


@pytest.mark.concurrency
async def test_leases_from_4_processes_never_overspend_and_strand_little(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    org = (await client.create_organization("A")).id
    await client.set_budget(org, Budget(D("2.00")))
    issued = await client.create_key(org, budgets=[Budget(D("5.00"))])
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=ctx) as pool:
        jobs = [pool.submit(_workers.lease_storm, db_url, issued.id, "0.01", 16, "0.20")]
        jobs += [
            pool.submit(_workers.lease_storm, db_url, issued.id, "0.01", 16, "0.20")
            for _ in range(3)
        ]
        admitted = sum(job.result() for job in jobs)
    (status,) = await client.get_budgets(org)
    lines = await assert_balances_match_ledger(client)
    stranded = D("2.00") - status.used
    REPORT.append(
        f"{backend}: leases of 0.20, 4 processes x 16 callers charging 0.01 until refused "
        f"on an org budget of 2.00 -> admitted={admitted}, used={status.used}, "
        f"stranded={stranded}; {'; '.join(lines)}"
    )
    assert status.held == 0 and status.used == D("0.01") * admitted  # every call charged
    assert status.used <= D("2.00")  # never overspent
    # Near exhaustion slices shrink to min_calls (4) calls, and a refusal happens only
    # when no slice can be had: at most a few small slices' worth is left unspent.
    assert stranded <= D("0.20")


@pytest.mark.concurrency
@pytest.mark.parametrize("on_expiry", ["release", "charge"])
@pytest.mark.parametrize("leased", ["charge", "validate"])
async def test_a_killed_lease_holder_leaves_its_slice_to_the_expiry_rule(
    client: APIKeyClient, db_url: str, backend: str, on_expiry: str, leased: str
) -> None:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, budgets=[Budget(D("100"))])
    ctx = multiprocessing.get_context("spawn")
    ready, admitted = ctx.Event(), ctx.Value("i", 0)
    plaintext = issued.plaintext if leased == "validate" else None
    proc = ctx.Process(
        target=_workers.lease_forever,
        args=(db_url, issued.id, on_expiry, admitted, ready, plaintext),
    )
    proc.start()
    assert await asyncio.to_thread(ready.wait, 60), "the leasing process never got going"
    os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    spent = D("0.01") * admitted.value
    (before,) = await client.get_budgets(issued.id)
    assert before.held > 0  # its last slice, left open
    await asyncio.sleep(2.5)  # the slice's ttl (2s), on the real clock
    real = APIKeyClient(db_url, signing_secret=SECRET)
    async with real:
        assert await real.sweep_expired_holds() == 1
    (status,) = await client.get_budgets(issued.id)
    lines = await assert_balances_match_ledger(client)
    async with client.engine.connect() as conn:
        kinds = sorted(set((await conn.execute(select(ledger.c.kind))).scalars()))
    uses = (await client.get_key(issued.id)).use_count
    REPORT.append(
        f"{backend}: SIGKILL of a lease holder ({leased}), on_expiry={on_expiry} -> "
        f"admitted={spent}, used={status.used}, use_count={uses}, ledger kinds={kinds}; "
        f"{'; '.join(lines)}"
    )
    assert status.held == 0
    if leased == "validate":  # its last slice's uses stay counted: never fewer than admitted
        assert uses >= admitted.value
    if on_expiry == "charge":  # never undercharged: the open slice charged in full
        assert status.used >= spent and "expiry" not in kinds
    else:  # released: what the dead process admitted since its last settle is not charged
        assert status.used <= spent and "expiry" in kinds


async def test_a_slice_the_database_cannot_settle_is_kept_and_settled_later(
    client: APIKeyClient, db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keycap._ops import holds as hold_ops
    from keycap._ops import leases as lease_ops

    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, budgets=[Budget(D("1.00"))])
    settle = hold_ops.settle

    async def unavailable(*args: object, **kwargs: object) -> None:
        raise DatabaseUnavailableError("database unavailable: test")

    async with await _leasing(db_url, clock) as leasing:
        for _ in range(10):
            await leasing.charge(issued.id, D("0.01"))  # the first slice, all spent
        monkeypatch.setattr(lease_ops.holds, "settle", unavailable)
        await leasing.charge(issued.id, D("0.01"))  # the second slice: the first's settle fails
        await asyncio.sleep(0)
        assert leasing._leases is not None
        await leasing._leases._settled((issued.id, "spend"))
        (kept,) = leasing.pending_settlements
        assert kept.actual == D("0.10")
        monkeypatch.setattr(lease_ops.holds, "settle", settle)
        assert await leasing.retry_settlements() == 1
    (status,) = await client.get_budgets(issued.id)
    assert status.used == D("0.11") and status.held == 0
    await assert_balances_match_ledger(client)


# --- validations ------------------------------------------------------------------------


def test_a_slice_of_validations_is_sized_by_what_fits() -> None:
    lease = LeasePolicy(slice="0.10", calls=50).checked()
    cent = 10_000
    assert lease.next_calls({}, None) == 50  # the policy's calls
    assert lease.next_calls({"spend": cent}, None) == 10  # the policy's slice of money
    assert lease.next_calls({}, 100) == 25  # a quarter of what fits
    assert lease.next_calls({}, 15) is None  # 3 calls: validate exactly
    assert calls_that_fit([(100, 1), (50_000, cent), (7, 0)]) == 5  # a cost of 0 never binds
    assert calls_that_fit([(7, 0)]) is None
    assert calls_that_fit([(-3, 1)]) == 0


@pytest.mark.parametrize(
    ("policy", "says"),
    [
        (LeasePolicy(slice="1", calls=0), "calls"),
        (LeasePolicy(slice="1", calls=True), "calls"),
        (LeasePolicy(slice="1", validations="yes"), "validations"),  # type: ignore[arg-type]
    ],
)
def test_a_bad_validation_lease_is_a_configuration_error(policy: LeasePolicy, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        policy.checked()


async def _limited_key(client: APIKeyClient, **options: object) -> tuple[str, str]:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(
        org,
        budgets=[Budget(D("1.00"))],
        rate_limits=[RateLimit(1000, "hour")],
        **options,  # type: ignore[arg-type]
    )
    return issued.id, issued.plaintext


async def test_leased_validations_spend_a_slice_in_memory_and_give_back_what_they_did_not(
    client: APIKeyClient, db_url: str, clock: FakeClock
) -> None:
    key_id, plaintext = await _limited_key(client)
    async with await _leasing(db_url, clock, calls=10) as leasing:
        keys = [await leasing.validate_key(plaintext, cost=D("0.01")) for _ in range(25)]
        assert all(k.charge is not None and k.charge.leased for k in keys)
        assert keys[0].rate_limit is not None and keys[0].rate_limit.remaining == 990
        (status,) = await client.get_budgets(key_id)
        assert status.used + status.held == D("0.30")  # 2 slices settled, 1 open
        assert (await client.get_key(key_id)).use_count == 30  # the open slice's too
    async with client.engine.connect() as conn:
        settled = (await conn.execute(select(holds.c.settled_micros))).scalars().all()
    assert sorted(settled) == [50_000, 100_000, 100_000]
    (status,) = await client.get_budgets(key_id)
    assert status.used == D("0.25") and status.held == 0
    assert (await client.get_key(key_id)).use_count == 25  # the unspent 5 given back
    (rate,) = await client.get_rate_limits(key_id)
    assert rate.remaining == 1000 - 25
    await assert_balances_match_ledger(client)


async def test_a_rate_limited_key_is_leased_without_a_cost_and_admitted_exactly_its_limit(
    client: APIKeyClient, db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keycap._ops import leases as lease_ops

    taken: list[int] = []
    take = lease_ops.Leases._take

    async def counted(
        self: lease_ops.Leases, slot: object, d: object, size: int, *a: object
    ) -> object:
        taken.append(size)
        return await take(self, slot, d, size, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(lease_ops.Leases, "_take", counted)
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, rate_limits=[RateLimit(100, "hour")])
    async with await _leasing(db_url, clock, calls=20) as leasing:
        admitted = 0
        with pytest.raises(RateLimitedError):
            while True:
                await leasing.validate_key(issued.plaintext)
                admitted += 1
    # The first call finds the key rate-limited; then slices shrink with what is left.
    assert taken == [20, 19, 15, 11, 8, 6, 5]  # 84 calls; the last 15 exact
    assert admitted == 100  # alone, nothing stranded: near the limit calls go exact
    assert (await client.get_key(issued.id)).use_count == 100


async def test_a_leased_validation_refuses_a_wrong_secret_an_expired_key_and_another_address(
    client: APIKeyClient, db_url: str, clock: FakeClock
) -> None:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(
        org,
        budgets=[Budget(D("1.00"))],
        allowed_ips=["203.0.113.0/24"],
        expires_in=timedelta(seconds=5),
    )
    async with await _leasing(db_url, clock, calls=10) as leasing:
        key = await leasing.validate_key(issued.plaintext, cost=D("0.01"), client_ip="203.0.113.7")
        assert key.charge is not None and key.charge.leased
        _, wrong = KeyFormat().generate(
            KeyFormat().parse(issued.plaintext)
        )  # its id, not its secret
        with pytest.raises(InvalidKeyError):
            await leasing.validate_key(wrong, cost=D("0.01"), client_ip="203.0.113.7")
        with pytest.raises(ForbiddenError):
            await leasing.validate_key(issued.plaintext, cost=D("0.01"), client_ip="198.51.100.1")
        clock.advance(seconds=5)
        with pytest.raises(ExpiredKeyError):
            await leasing.validate_key(issued.plaintext, cost=D("0.01"), client_ip="203.0.113.7")
    (status,) = await client.get_budgets(issued.id)
    assert status.used == D("0.01") and status.held == 0
    await assert_balances_match_ledger(client)


async def test_a_leased_validation_sees_a_revocation_within_refresh_or_at_once_through_it(
    client: APIKeyClient, db_url: str, clock: FakeClock
) -> None:
    key_id, plaintext = await _limited_key(client)
    async with await _leasing(db_url, clock, refresh="10s", calls=10) as leasing:
        await leasing.validate_key(plaintext, cost=D("0.01"))
        await client.disable_key(key_id)  # another client: the lease does not know
        clock.advance(seconds=9)
        assert (await leasing.validate_key(plaintext, cost=D("0.01"))).charge.leased  # type: ignore[union-attr]
        clock.advance(seconds=1)
        with pytest.raises(DisabledKeyError):
            await leasing.validate_key(plaintext, cost=D("0.01"))
        await client.enable_key(key_id)
        await leasing.validate_key(plaintext, cost=D("0.01"))
        await leasing.revoke_key(key_id)  # through the leasing client: at once
        with pytest.raises(RevokedKeyError):
            await leasing.validate_key(plaintext, cost=D("0.01"))
    (status,) = await client.get_budgets(key_id)
    assert status.used == D("0.03") and status.held == 0
    assert (await client.get_key(key_id)).use_count == 3
    await assert_balances_match_ledger(client)


async def test_a_capped_key_leased_is_admitted_exactly_its_uses(
    client: APIKeyClient, db_url: str, clock: FakeClock
) -> None:
    key_id, plaintext = await _limited_key(client, max_uses=30)
    async with await _leasing(db_url, clock, calls=10) as leasing:
        admitted = 0
        with pytest.raises(UsageExhaustedError):
            while True:
                await leasing.validate_key(plaintext, cost=D("0.01"))
                admitted += 1
    assert admitted == 30
    (status,) = await client.get_budgets(key_id)
    assert status.used == D("0.30") and status.held == 0
    assert (await client.get_key(key_id)).use_count == 30


@pytest.mark.concurrency
@pytest.mark.parametrize(("calls", "budget", "most"), [(120, "1.50", 120), (1000, "1.00", 100)])
async def test_leased_validations_from_4_processes_never_overshoot_a_rate_limit_or_budget(
    client: APIKeyClient, db_url: str, backend: str, calls: int, budget: str, most: int
) -> None:
    org = (await client.create_organization("A")).id
    await client.set_budget(org, Budget(D(budget)))
    issued = await client.create_key(org, rate_limits=[RateLimit(calls, "hour")])
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=ctx) as pool:
        jobs = [
            pool.submit(_workers.lease_validate_storm, db_url, issued.plaintext, "0.01", 16, 20)
            for _ in range(4)
        ]
        admitted = sum(job.result() for job in jobs)
    (status,) = await client.get_budgets(org)
    (rate,) = await client.get_rate_limits(issued.id)
    uses = (await client.get_key(issued.id)).use_count
    lines = await assert_balances_match_ledger(client)
    REPORT.append(
        f"{backend}: leased validations (slices of 20 calls), 4 processes x 16 callers, "
        f"0.01 each, {calls}/hour and an org budget of {budget}, until refused -> "
        f"admitted={admitted}, "
        f"used={status.used}, use_count={uses}, rate remaining={rate.remaining}; "
        f"{'; '.join(lines)}"
    )
    assert admitted <= most  # never past the rate limit, or the budget
    assert status.held == 0 and status.used == D("0.01") * admitted  # every call charged
    assert uses == admitted  # what the slices did not spend was given back
    assert rate.remaining == calls - admitted
    assert admitted >= most - 20  # little stranded: slices shrink near the limit
