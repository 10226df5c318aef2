"""Budgets, charges, holds, rate limits and usage caps on every database (one process)."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from keycap import (
    APIKeyClient,
    Budget,
    BudgetAlert,
    BudgetExceededError,
    DisabledKeyError,
    ExpiredKeyError,
    HoldClosedError,
    InvalidArgumentError,
    NotFoundError,
    RateLimit,
    RateLimitedError,
    RevokedKeyError,
    UsageExhaustedError,
)
from keycap._db.metering import LAST_USED_STEP
from tests._ledger import assert_balances_match_ledger
from tests.conftest import SECRET, FakeClock

D = Decimal


async def _org(client: APIKeyClient) -> str:
    return (await client.create_organization("Acme")).id


async def test_charge_until_the_budget_is_spent(client: APIKeyClient) -> None:
    issued = await client.create_key(await _org(client), budgets=[Budget(D("1.00"))])
    for expected in ("0.70", "0.40", "0.10"):
        charged = await client.charge(issued.id, D("0.30"))
        (status,) = charged.budgets
        assert status.remaining == D(expected)
        assert isinstance(status.used, Decimal) and isinstance(status.remaining, Decimal)
    with pytest.raises(BudgetExceededError) as info:
        await client.charge(issued.id, D("0.30"))
    error = info.value
    assert (error.scope, error.meter, error.period) == ("key", "spend", "month")
    assert (error.limit, error.used, error.remaining, error.requested) == (
        D("1"),
        D("0.9"),
        D("0.1"),
        D("0.3"),
    )
    assert error.reset_at == datetime(2026, 2, 1, tzinfo=UTC)
    assert error.to_dict()["remaining"] == "0.100000"  # exact strings, never floats
    await client.charge(issued.id, D("0.10"))  # exactly up to the limit
    await assert_balances_match_ledger(client)


async def test_a_budget_of_zero_spends_nothing_but_authenticates(client: APIKeyClient) -> None:
    issued = await client.create_key(await _org(client), budgets=[Budget(0)])
    await client.validate_key(issued.plaintext)
    with pytest.raises(BudgetExceededError):
        await client.charge(issued.id, D("0.000001"))
    with pytest.raises(BudgetExceededError):
        await client.validate_key(issued.plaintext, cost=D("0.01"))
    await client.charge(issued.id, 0)  # a zero cost always fits


async def test_key_project_and_org_budgets_all_or_nothing(client: APIKeyClient) -> None:
    org = await _org(client)
    project = (await client.create_project(org, "agents")).id
    a = await client.create_key(org, project_id=project, budgets=[Budget(D("5"))])
    b = await client.create_key(org, project_id=project)
    await client.set_budget(project, Budget(D("3")))
    org_budget = await client.set_budget(org, Budget(D("2")))
    charged = await client.charge(a.id, D("1.5"))
    assert [s.scope for s in charged.budgets] == [
        "organization",
        "project",
        "key",
    ]  # tightest first
    with pytest.raises(BudgetExceededError) as info:
        await client.charge(b.id, D("0.6"))
    assert info.value.scope == "organization" and info.value.budget_id == org_budget.id
    # The refused charge took nothing from the project budget either.
    (project_budget,) = await client.get_budgets(project)
    assert project_budget.used == D("1.5")
    (key_budget,) = await client.get_budgets(a.id)
    assert key_budget.used == D("1.5")
    await client.charge(b.id, D("0.5"))
    await assert_balances_match_ledger(client)


async def test_meters_are_separate(client: APIKeyClient) -> None:
    issued = await client.create_key(
        await _org(client),
        budgets=[Budget(D("5"), "month"), Budget(100_000, "day", meter="tokens")],
    )
    charged = await client.charge(issued.id, {"spend": D("0.02"), "tokens": 60_000})
    assert {s.meter: s.remaining for s in charged.budgets} == {"spend": D("4.98"), "tokens": 40_000}
    with pytest.raises(BudgetExceededError) as info:
        await client.charge(issued.id, {"spend": D("0.02"), "tokens": 60_000})
    assert info.value.meter == "tokens"
    (spend,) = [b for b in await client.get_budgets(issued.id) if b.meter == "spend"]
    assert spend.used == D("0.02")  # the refused call charged no spend either


async def test_anchored_month_resets_on_feb_28_then_mar_31(
    client: APIKeyClient, clock: FakeClock
) -> None:
    clock.now = datetime(2026, 1, 31, 9, tzinfo=UTC)
    issued = await client.create_key(
        await _org(client), budgets=[Budget(D("1"), "month", anchor_day=31)]
    )
    await client.charge(issued.id, D("1"))
    clock.now = datetime(2026, 2, 27, 23, 59, 59, tzinfo=UTC)
    with pytest.raises(BudgetExceededError) as info:
        await client.charge(issued.id, D("0.01"))
    assert info.value.reset_at == datetime(2026, 2, 28, tzinfo=UTC)
    clock.now = datetime(2026, 2, 28, tzinfo=UTC)
    (status,) = (await client.charge(issued.id, D("1"))).budgets
    assert (status.period_start, status.reset_at) == (
        datetime(2026, 2, 28, tzinfo=UTC),
        datetime(2026, 3, 31, tzinfo=UTC),
    )
    clock.now = datetime(2026, 3, 30, 23, tzinfo=UTC)
    with pytest.raises(BudgetExceededError):
        await client.charge(issued.id, D("0.01"))
    clock.now = datetime(2026, 3, 31, tzinfo=UTC)
    await client.charge(issued.id, D("1"))
    await assert_balances_match_ledger(client)


async def test_a_lagging_clock_does_not_reset_a_period_twice(
    client: APIKeyClient, clock: FakeClock
) -> None:
    issued = await client.create_key(await _org(client), budgets=[Budget(D("1"), "day")])
    clock.now = datetime(2026, 1, 16, 0, 0, 1, tzinfo=UTC)  # a server already in the new day
    await client.charge(issued.id, D("0.9"))
    lagging = APIKeyClient(
        client.engine,
        signing_secret=SECRET,
        clock=lambda: datetime(2026, 1, 15, 23, 59, 58, tzinfo=UTC),
    )
    with pytest.raises(BudgetExceededError):
        await lagging.charge(issued.id, D("0.2"))  # counted in the newer period, not reset
    await lagging.charge(issued.id, D("0.1"))
    await assert_balances_match_ledger(client)


async def test_week_periods_reset_and_lifetime_periods_never_do(
    client: APIKeyClient, clock: FakeClock
) -> None:
    issued = await client.create_key(
        await _org(client),
        budgets=[Budget(D("1"), "week"), Budget(D("2"), "lifetime", meter="credits")],
    )
    await client.charge(issued.id, {"spend": D("1"), "credits": D("1")})
    clock.now = datetime(2026, 1, 19, tzinfo=UTC)  # the next Monday
    await client.charge(issued.id, {"spend": D("1"), "credits": D("1")})
    clock.advance(days=400)
    with pytest.raises(BudgetExceededError) as info:
        await client.charge(issued.id, {"credits": D("0.5")})
    assert info.value.reset_at is None and info.value.period == "lifetime"


async def test_credit_tops_up_the_current_period(client: APIKeyClient, clock: FakeClock) -> None:
    issued = await client.create_key(await _org(client), budgets=[Budget(D("1"))])
    (budget,) = await client.get_budgets(issued.id)
    await client.charge(issued.id, D("1"))
    topped = await client.grant_credit(budget.id, D("0.5"))
    assert (topped.credit, topped.remaining) == (D("0.5"), D("0.5"))
    await client.charge(issued.id, D("0.5"))
    clock.now = datetime(2026, 2, 1, tzinfo=UTC)  # a new period: credit was for January
    (fresh,) = await client.get_budgets(issued.id)
    assert (fresh.credit, fresh.used, fresh.remaining) == (0, 0, D("1"))
    await assert_balances_match_ledger(client)


async def test_changing_and_removing_budgets(client: APIKeyClient) -> None:
    org = await _org(client)
    issued = await client.create_key(org)
    first = await client.set_budget(issued.id, Budget(D("1")))
    await client.charge(issued.id, D("0.6"))
    changed = await client.set_budget(issued.id, Budget(D("0.5"), alert_thresholds=[80]))
    assert changed.id == first.id and changed.used == D("0.6") and changed.remaining == 0
    with pytest.raises(BudgetExceededError):
        await client.charge(issued.id, D("0.01"))
    assert await client.remove_budget(first.id) is True
    assert await client.remove_budget(first.id) is False
    await client.charge(issued.id, D("100"))  # no budget: nothing limits it
    with pytest.raises(NotFoundError):
        await client.set_budget("key_AAAAAAAAAAAA", Budget(1))
    with pytest.raises(NotFoundError):
        await client.set_budget("prod_AAAAAAAAAAAAAAAA", Budget(1))  # products carry no budgets


async def test_alerts_fire_once_per_threshold_per_period(db_url: str, clock: FakeClock) -> None:
    seen: list[BudgetAlert] = []

    async def on_alert(alert: BudgetAlert) -> None:
        seen.append(alert)

    async with APIKeyClient(
        db_url, signing_secret=SECRET, clock=clock, on_budget_alert=on_alert
    ) as c:
        org = (await c.create_organization(f"alerts-{id(seen)}")).id
        issued = await c.create_key(org, budgets=[Budget(D("10"), alert_thresholds=[50, 80, 100])])
        results = [await c.charge(issued.id, D("3")) for _ in range(3)]
        assert [tuple(a.threshold for a in r.alerts) for r in results] == [(), (50,), (80,)]
        assert [a.threshold for a in seen] == [50, 80]
        last = await c.charge(issued.id, D("1"))  # exactly 100%
        assert [a.threshold for a in last.alerts] == [100] and seen[-1].used == D("10")
        clock.now = datetime(2026, 2, 1, tzinfo=UTC)
        await c.charge(issued.id, D("6"))
        assert [a.threshold for a in seen] == [50, 80, 100, 50]


async def test_a_failing_alert_handler_does_not_undo_the_charge(
    db_url: str, clock: FakeClock
) -> None:
    async def broken(alert: BudgetAlert) -> None:
        raise RuntimeError("webhook down")

    async with APIKeyClient(
        db_url, signing_secret=SECRET, clock=clock, on_budget_alert=broken
    ) as c:
        org = (await c.create_organization(f"broken-{id(broken)}")).id
        issued = await c.create_key(org, budgets=[Budget(D("1"), alert_thresholds=[50])])
        charged = await c.charge(issued.id, D("0.6"))
        assert [a.threshold for a in charged.alerts] == [50]
        assert (await c.get_budgets(issued.id))[0].used == D("0.6")


async def test_dead_keys_cannot_be_charged_or_reserve(
    client: APIKeyClient, clock: FakeClock
) -> None:
    org = await _org(client)
    expired = await client.create_key(org, expires_in="1h", budgets=[Budget(D("5"))])
    revoked = await client.create_key(org, budgets=[Budget(D("5"))])
    disabled = await client.create_key(org)  # no budget: the key's state still decides
    await client.revoke_key(revoked.id)
    await client.disable_key(disabled.id)
    clock.advance(hours=1)
    for issued, error in (
        (expired, ExpiredKeyError),
        (revoked, RevokedKeyError),
        (disabled, DisabledKeyError),
    ):
        with pytest.raises(error):
            await client.charge(issued.id, D("0.01"))
        with pytest.raises(error):
            await client.reserve(issued.id, D("0.01"))
    with pytest.raises(NotFoundError):
        await client.charge("key_AAAAAAAAAAAA", D("1"))
    await assert_balances_match_ledger(client)
    assert await client.usage(org_id=org, since=clock.now - timedelta(days=1)) == []


async def test_a_repeated_idempotency_key_replays_the_charge(client: APIKeyClient) -> None:
    issued = await client.create_key(await _org(client), budgets=[Budget(D("1"))])
    first = await client.charge(
        issued.id, D("0.4"), idempotency_key="req-1", metadata={"model": "x"}
    )
    again = await client.charge(issued.id, D("0.4"), idempotency_key="req-1")
    assert (first.replayed, again.replayed) == (False, True)
    assert again.budgets == first.budgets and again.amounts == first.amounts
    assert (await client.get_budgets(issued.id))[0].used == D("0.4")
    await client.charge(issued.id, D("0.4"), idempotency_key="req-2")
    assert (await client.get_budgets(issued.id))[0].used == D("0.8")
    await assert_balances_match_ledger(client)


async def test_concurrent_duplicates_charge_once(client: APIKeyClient, backend: str) -> None:
    """A retry racing the original (same idempotency key, both in flight) charges once."""
    import asyncio

    issued = await client.create_key(await _org(client), budgets=[Budget(D("1"))])
    results = await asyncio.gather(
        *(client.charge(issued.id, D("0.25"), idempotency_key="same") for _ in range(8))
    )
    assert sorted(r.replayed for r in results) == [False] + [True] * 7
    assert (await client.get_budgets(issued.id))[0].used == D("0.25")
    holds = await asyncio.gather(
        *(client.reserve(issued.id, D("0.5"), idempotency_key="h") for _ in range(8))
    )
    assert len({h.id for h in holds}) == 1
    settled = await asyncio.gather(
        *(client.settle(holds[0].id, D("0.1"), idempotency_key="s") for _ in range(8))
    )
    assert sum(not r.replayed for r in settled) == 1
    (status,) = await client.get_budgets(issued.id)
    assert (status.used, status.held) == (D("0.35"), 0)
    await assert_balances_match_ledger(client)


async def test_holds_settle_below_at_and_above(client: APIKeyClient) -> None:
    issued = await client.create_key(await _org(client), budgets=[Budget(D("1"))])
    hold = await client.reserve(issued.id, D("0.5"))
    assert (hold.status, hold.budgets[0].held, hold.budgets[0].remaining) == (
        "open",
        D("0.5"),
        D("0.5"),
    )
    with pytest.raises(BudgetExceededError):
        await client.reserve(issued.id, D("0.6"))  # used + held + amount <= limit
    below = await client.settle(hold.id, D("0.2"))
    assert (below.charged, below.returned, below.shortfall) == (D("0.2"), D("0.3"), 0)
    with pytest.raises(HoldClosedError):
        await client.settle(hold.id, D("0.2"))
    at = await client.settle((await client.reserve(issued.id, D("0.3"))).id, D("0.3"))
    assert (at.charged, at.returned, at.shortfall) == (D("0.3"), 0, 0)
    # 0.5 used; hold 0.2, then use 0.9: 0.2 held + 0.3 that still fits; 0.4 short.
    above = await client.settle((await client.reserve(issued.id, D("0.2"))).id, D("0.9"))
    assert (above.charged, above.returned, above.shortfall) == (D("0.5"), 0, D("0.4"))
    assert above.budgets[0].used == D("1") and above.budgets[0].held == 0
    await assert_balances_match_ledger(client)


async def test_the_documented_agent_example(client: APIKeyClient) -> None:
    """docs/limits-and-budgets.md: $5/month, reserve 0.40, settle 0.1234: 38 completions."""
    issued = await client.create_key(await _org(client), budgets=[Budget(D("5.00"), "month")])
    completions = 0
    while True:
        try:
            hold = await client.reserve(issued.id, D("0.40"))
        except BudgetExceededError as error:
            assert error.remaining == D("0.3108")
            assert error.reset_at == datetime(2026, 2, 1, tzinfo=UTC)
            break
        result = await client.settle(hold.id, D("0.1234"))
        assert (result.charged, result.returned) == (D("0.1234"), D("0.2766"))
        completions += 1
    assert completions == 38


async def test_release_and_expiry_return_the_hold_to_every_budget(
    client: APIKeyClient, clock: FakeClock
) -> None:
    org = await _org(client)
    issued = await client.create_key(org)
    org_budget = await client.set_budget(org, Budget(D("1")))
    released = await client.release((await client.reserve(issued.id, D("0.5"))).id)
    assert released.status == "released" and released.budgets[0].held == 0
    with pytest.raises(HoldClosedError):
        await client.release(released.id)
    await client.reserve(issued.id, D("0.6"), ttl="30s")
    clock.advance(seconds=31)
    # Lazily: the expired hold stands in this reservation's way, so it is returned first.
    lazy = await client.reserve(issued.id, D("0.6"), ttl="30s")
    assert lazy.budgets[0].held == D("0.6")
    clock.advance(seconds=31)
    assert (await client.get_budgets(org))[0].held == 0  # a status read returns it first
    assert await client.sweep_expired_holds() == 0
    assert (await client.get_hold(lazy.id)).status == "expired"
    assert (await client.get_budgets(org))[0].held == 0
    with pytest.raises(HoldClosedError):
        await client.settle(lazy.id, D("0.1"))
    assert org_budget.id == (await client.get_budgets(org))[0].id
    await assert_balances_match_ledger(client)


async def test_reserve_settle_and_release_replay_by_idempotency_key(client: APIKeyClient) -> None:
    issued = await client.create_key(await _org(client), budgets=[Budget(D("1"))])
    hold = await client.reserve(issued.id, D("0.5"), idempotency_key="r1")
    assert (await client.reserve(issued.id, D("0.5"), idempotency_key="r1")).id == hold.id
    settled = await client.settle(hold.id, D("0.1"), idempotency_key="s1")
    replay = await client.settle(hold.id, D("0.1"), idempotency_key="s1")
    assert replay.replayed and replay.charged == settled.charged
    other = await client.reserve(issued.id, D("0.2"), idempotency_key="r2")
    await client.release(other.id, idempotency_key="x1")
    assert (await client.release(other.id, idempotency_key="x1")).replayed
    (status,) = await client.get_budgets(issued.id)
    assert (status.used, status.held) == (D("0.1"), 0)
    await assert_balances_match_ledger(client)


async def test_deleting_a_key_returns_its_holds_to_shared_budgets(client: APIKeyClient) -> None:
    org = await _org(client)
    await client.set_budget(org, Budget(D("1")))
    issued = await client.create_key(org, budgets=[Budget(D("1"))])
    await client.reserve(issued.id, D("0.7"))
    await client.charge(issued.id, D("0.1"))
    await client.delete_key(issued.id)
    (org_budget,) = await client.get_budgets(org)
    assert (org_budget.held, org_budget.used) == (0, D("0.1"))  # no phantom reservation
    await assert_balances_match_ledger(client)


async def test_rate_limit_with_exact_retry_after(client: APIKeyClient, clock: FakeClock) -> None:
    clock.now = datetime(2026, 1, 15, 12, 0, 10, tzinfo=UTC)
    issued = await client.create_key(await _org(client), rate_limits=[RateLimit(3, "minute")])
    results = [await client.validate_key(issued.plaintext) for _ in range(3)]
    assert [k.rate_limit.remaining for k in results] == [2, 1, 0]  # type: ignore[union-attr]
    with pytest.raises(RateLimitedError) as info:
        await client.validate_key(issued.plaintext)
    error = info.value
    # Full window: 50 s to the next one, then until 3 * weight + 1 <= 3 with the
    # weight in rounded-up thousandths: weight <= 0.666, i.e. 20.04 s into it.
    assert error.retry_after == pytest.approx(50 + 20.04, abs=1e-9)
    assert (error.limit, error.remaining, error.scope, error.name) == (3, 0, "key", "3/minute")
    assert (await client.get_key(issued.id)).use_count == 3  # the refusal counted nothing
    clock.advance(seconds=error.retry_after - 0.001)
    with pytest.raises(RateLimitedError):
        await client.validate_key(issued.plaintext)
    clock.advance(seconds=0.001)
    await client.validate_key(issued.plaintext)


async def test_project_rate_limit_is_shared(client: APIKeyClient) -> None:
    org = await _org(client)
    project = (await client.create_project(org, "p")).id
    a = await client.create_key(org, project_id=project)
    b = await client.create_key(org, project_id=project)
    other = await client.create_key(org)
    await client.set_rate_limit(project, RateLimit(2, "hour"))
    await client.validate_key(a.plaintext)
    await client.validate_key(b.plaintext)
    with pytest.raises(RateLimitedError) as info:
        await client.validate_key(a.plaintext)
    assert info.value.scope == "project"
    await client.validate_key(other.plaintext)  # not under the project
    assert await client.remove_rate_limit(project, "2/hour") is True
    await client.validate_key(a.plaintext)


async def test_token_rate_limit_counts_the_cost(client: APIKeyClient) -> None:
    issued = await client.create_key(
        await _org(client), rate_limits=[RateLimit(1000, "minute", meter="tokens")]
    )
    await client.validate_key(issued.plaintext, cost={"tokens": 600})
    with pytest.raises(RateLimitedError) as info:
        await client.validate_key(issued.plaintext, cost={"tokens": 600})
    assert info.value.remaining == D("400")
    await client.validate_key(issued.plaintext, cost={"tokens": 400})
    with pytest.raises(RateLimitedError) as never:
        await client.validate_key(issued.plaintext, cost={"tokens": 1001})
    assert never.value.retry_after is None


async def test_validation_is_all_or_nothing(client: APIKeyClient) -> None:
    issued = await client.create_key(
        await _org(client), rate_limits=[RateLimit(10, "minute")], budgets=[Budget(D("1"))]
    )
    ok = await client.validate_key(issued.plaintext, cost=D("0.6"))
    assert ok.charge is not None and ok.charge.budgets[0].remaining == D("0.4")
    assert ok.rate_limit is not None and ok.rate_limit.remaining == 9
    with pytest.raises(BudgetExceededError):
        await client.validate_key(issued.plaintext, cost=D("0.6"))
    # The refused call burnt no rate token and counted no use.
    again = await client.validate_key(issued.plaintext, cost=D("0.4"))
    assert again.rate_limit.remaining == 8 and again.use_count == 2  # type: ignore[union-attr]
    await assert_balances_match_ledger(client)


async def test_a_key_is_refused_after_max_uses_accepted_validations(client: APIKeyClient) -> None:
    org = await _org(client)
    issued = await client.create_key(org, max_uses=2)
    await client.validate_key(issued.plaintext)
    await client.validate_key(issued.plaintext, track_usage=False)  # a capped key always counts
    with pytest.raises(UsageExhaustedError) as info:
        await client.validate_key(issued.plaintext)
    assert info.value.max_uses == 2
    assert (await client.get_key(issued.id)).use_count == 2
    raised = await client.update_key(issued.id, max_uses=3)
    assert raised.max_uses == 3
    await client.validate_key(issued.plaintext)
    metered = await client.create_key(org, max_uses=1, rate_limits=[RateLimit(5, "minute")])
    await client.validate_key(metered.plaintext)
    with pytest.raises(UsageExhaustedError):
        await client.validate_key(metered.plaintext)


async def test_usage_totals_what_was_charged_per_day_and_meter(
    client: APIKeyClient, clock: FakeClock
) -> None:
    org = await _org(client)
    project = (await client.create_project(org, "p")).id
    a = await client.create_key(org, project_id=project, budgets=[Budget(D("100"))])
    b = await client.create_key(org)
    await client.set_budget(org, Budget(D("100")))
    await client.charge(a.id, D("1.25"))
    await client.charge(b.id, {"spend": D("2"), "tokens": 10})
    clock.advance(days=1)
    await client.settle((await client.reserve(a.id, D("1"))).id, D("0.5"))
    since = clock.now - timedelta(days=5)
    by_org = await client.usage(org_id=org, since=since)
    assert [(r.period, r.meter, r.amount, r.charges) for r in by_org] == [
        ("2026-01-15", "spend", D("3.25"), 2),
        ("2026-01-15", "tokens", D("10"), 1),
        ("2026-01-16", "spend", D("0.5"), 1),
    ]
    assert [r.amount for r in await client.usage(key_id=a.id, since=since, per="month")] == [
        D("1.75")
    ]
    assert [r.amount for r in await client.usage(project_id=project, since=since)] == [
        D("1.25"),
        D("0.5"),
    ]


@pytest.mark.parametrize(
    "amount",
    [D("-0.01"), D("NaN"), D("Infinity"), 0.5, D("0.0000001"), D(10) ** 13, "1", None, True],
    ids=repr,
)
async def test_bad_amounts_change_nothing(client: APIKeyClient, amount: object) -> None:
    issued = await client.create_key(await _org(client), budgets=[Budget(D("1"))])
    calls = [
        lambda: client.charge(issued.id, amount),  # type: ignore[arg-type]
        lambda: client.reserve(issued.id, amount),  # type: ignore[arg-type]
        lambda: client.charge(issued.id, {"spend": amount}),  # type: ignore[dict-item]
    ]
    if amount is not None:  # cost=None means "no cost"
        calls.append(lambda: client.validate_key(issued.plaintext, cost=amount))  # type: ignore[arg-type]
    for call in calls:
        with pytest.raises(InvalidArgumentError):
            await call()
    (status,) = await client.get_budgets(issued.id)
    assert (status.used, status.held) == (0, 0)
    assert (await client.get_key(issued.id)).use_count == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"limit": 0.5}, id="float-limit"),
        pytest.param({"limit": 1, "period": "year"}, id="unknown-period"),
        pytest.param({"limit": 1, "period": "day", "anchor_day": 3}, id="anchor-on-a-day-budget"),
        pytest.param({"limit": 1, "alert_thresholds": [0]}, id="threshold-of-zero"),
    ],
)
def test_a_bad_budget_is_refused_when_built(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        Budget(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"budgets": ["not a budget"]}, id="budgets-not-budgets"),
        pytest.param({"rate_limits": ["100/minute"]}, id="rate-limits-not-rate-limits"),
        pytest.param({"max_uses": -1}, id="negative-max-uses"),
        pytest.param({"max_uses": 1.0}, id="float-max-uses"),
    ],
)
async def test_a_bad_key_argument_creates_nothing(
    client: APIKeyClient, bad: dict[str, object]
) -> None:
    org = await _org(client)
    with pytest.raises(InvalidArgumentError):
        await client.create_key(org, **bad)  # type: ignore[arg-type]
    assert await client.list_keys() == []


async def test_a_bad_ttl_or_idempotency_key_is_refused(client: APIKeyClient) -> None:
    issued = await client.create_key(await _org(client))
    with pytest.raises(InvalidArgumentError):
        await client.reserve(issued.id, D("1"), ttl="31d")
    with pytest.raises(InvalidArgumentError):
        await client.charge(issued.id, D("1"), idempotency_key="")


@pytest.mark.slow
async def test_ten_thousand_micro_charges_sum_exactly(client: APIKeyClient, backend: str) -> None:
    """10,000 charges of 0.000001 through ten keys fill an org budget of 0.01 exactly."""
    import asyncio

    org = await _org(client)
    await client.set_budget(org, Budget(D("0.01")))
    keys = [(await client.create_key(org)).id for _ in range(10)]
    sem = asyncio.Semaphore(1 if backend == "sqlite" else 10)

    async def spend(key_id: str) -> None:
        for _ in range(1000):
            async with sem:
                await client.charge(key_id, D("0.000001"))

    await asyncio.gather(*(spend(k) for k in keys))
    (status,) = await client.get_budgets(org)
    assert (status.used, status.remaining) == (D("0.01"), 0)
    assert type(status.used) is Decimal and type(status.remaining) is Decimal
    with pytest.raises(BudgetExceededError):
        await client.charge(keys[0], D("0.000001"))
    since = datetime(2026, 1, 1, tzinfo=UTC)
    (row,) = await client.usage(org_id=org, since=since)
    assert (row.amount, row.charges) == (D("0.01"), 10_000) and type(row.amount) is Decimal
    await assert_balances_match_ledger(client)


@pytest.mark.parametrize("delete", ["project", "product"])
async def test_deleting_a_project_or_product_returns_its_keys_holds(
    client: APIKeyClient, delete: str
) -> None:
    org = await _org(client)
    await client.set_budget(org, Budget(D("1")))
    project = (await client.create_project(org, "p")).id
    product = (await client.create_product(org, "x")).id
    await client.add_product_to_project(product, project)
    issued = await client.create_key(org, project_id=project, product_id=product)
    await client.reserve(issued.id, D("0.6"))
    if delete == "project":
        await client.delete_project(project)
    else:
        await client.delete_product(product)
    (org_budget,) = await client.get_budgets(org)
    assert org_budget.held == 0  # no phantom reservation left on the organization
    await assert_balances_match_ledger(client)


async def test_tracking_off_writes_no_use_on_the_metered_path(client: APIKeyClient) -> None:
    issued = await client.create_key(
        await _org(client), rate_limits=[RateLimit(5, "minute")], budgets=[Budget(D("1"))]
    )
    key = await client.validate_key(issued.plaintext, track_usage=False, cost=D("0.1"))
    assert key.rate_limit is not None and key.rate_limit.remaining == 4  # limits still apply
    stored = await client.get_key(issued.id)
    assert (stored.use_count, stored.last_used_at) == (0, None)


async def test_a_charge_is_a_use_of_the_key_to_within_a_second(
    client: APIKeyClient, clock: FakeClock
) -> None:
    # PostgreSQL's one-statement charge moves last_used_at only when it is at
    # least LAST_USED_STEP old: 64 callers charging one key then write no row
    # version of the key per charge. The transactions elsewhere move it always.
    issued = await client.create_key(await _org(client), budgets=[Budget(D(10))])
    first = clock.now
    await client.charge(issued.id, D("0.01"))
    assert (await client.get_key(issued.id)).last_used_at == first
    clock.advance(seconds=0.5)
    await client.reserve(issued.id, D("0.01"))
    stored = (await client.get_key(issued.id)).last_used_at
    assert stored is not None and clock.now - LAST_USED_STEP <= stored <= clock.now
    clock.advance(seconds=1)
    await client.charge(issued.id, D("0.01"))
    assert (await client.get_key(issued.id)).last_used_at == clock.now


async def test_a_replayed_charge_or_reserve_is_the_original_marked_replayed(
    client: APIKeyClient, clock: FakeClock
) -> None:
    # One statement (one block on MariaDB) writes the call's operation with it;
    # its replay is rebuilt from what that stored: the same budgets, amounts and
    # alerts, as they were then.
    org = await _org(client)
    await client.set_budget(org, Budget(D("10"), alert_thresholds=[50]))
    issued = await client.create_key(
        org, budgets=[Budget(D("2"), alert_thresholds=[25, 75]), Budget(D("5"), meter="tokens")]
    )
    amounts = {"spend": D("0.60"), "tokens": D("1.25"), "images": D("3")}
    first = await client.charge(issued.id, amounts, idempotency_key="c-1")
    assert [a.threshold for a in first.alerts] == [25]
    clock.advance(days=40)  # another period: the replay still says what the charge did
    again = await client.charge(issued.id, amounts, idempotency_key="c-1")
    assert again == first.model_copy(update={"replayed": True})
    hold = await client.reserve(issued.id, D("0.25"), idempotency_key="r-1")
    assert await client.reserve(issued.id, D("0.25"), idempotency_key="r-1") == (
        hold.model_copy(update={"replayed": True})
    )
    settled = await client.settle(hold.id, D("0.20"), idempotency_key="s-1")
    assert await client.settle(hold.id, D("0.20"), idempotency_key="s-1") == (
        settled.model_copy(update={"replayed": True})
    )
    other = await client.reserve(issued.id, D("0.25"))
    released = await client.release(other.id, idempotency_key="x-1")
    assert await client.release(other.id, idempotency_key="x-1") == (
        released.model_copy(update={"replayed": True})
    )
    beyond = await client.reserve(issued.id, D("0.10"))  # settled beyond: a transaction
    over = await client.settle(beyond.id, D("0.30"), idempotency_key="s-2")
    assert await client.settle(beyond.id, D("0.30"), idempotency_key="s-2") == (
        over.model_copy(update={"replayed": True})
    )
    await assert_balances_match_ledger(client)


async def test_an_idempotent_call_writes_its_key_on_its_ledger_entries(
    client: APIKeyClient,
) -> None:
    from sqlalchemy import select

    from keycap._db.schema import ledger

    org = await _org(client)
    await client.set_budget(org, Budget(D("10")))
    issued = await client.create_key(org, budgets=[Budget(D("2"))])
    await client.charge(issued.id, {"spend": D("0.5"), "tokens": D(1)}, idempotency_key="pay-1")
    hold = await client.reserve(issued.id, D("0.25"), idempotency_key="hold-1")
    await client.settle(hold.id, D("0.2"), idempotency_key="settle-1")
    other = await client.reserve(issued.id, D("0.25"))
    await client.release(other.id, idempotency_key="release-1")
    async with client.engine.connect() as conn:
        query = select(ledger.c.kind, ledger.c.idempotency_key).where(ledger.c.kind != "hold")
        rows = (await conn.execute(query)).all()
    assert sorted(rows) == sorted(
        [("charge", "pay-1")] * 3 + [("settle", "settle-1")] * 2 + [("release", "release-1")] * 2
    )


async def test_a_result_stored_by_a_transaction_replays_through_one_statement(
    client: APIKeyClient, clock: FakeClock
) -> None:
    # Operations written by a transaction (a keyless identity's calls, and
    # every call before one statement wrote its own) hold the result itself.
    from keycap._db import operations
    from keycap._ops.units import Idempotency

    org = await _org(client)
    issued = await client.create_key(org, budgets=[Budget(D("2"))])
    stored = await client.charge(issued.id, D("0.5"))
    idem = Idempotency.of("charge", issued.id, "old-1", amounts={"spend": 500_000})
    async with client.engine.begin() as conn:
        op_id = await operations.claim_operation(
            conn,
            org_id=org,
            scope=issued.id,
            kind="charge",
            idempotency_key="old-1",
            request_hash=idem.request_hash,
            now=clock(),
        )
        await operations.store_result(conn, op_id, stored.model_dump(mode="json"))
    again = await client.charge(issued.id, D("0.5"), idempotency_key="old-1")
    assert again == stored.model_copy(update={"replayed": True})
    assert (await client.get_budgets(issued.id))[0].used == D("0.5")
