"""What a hostile run found (issue 14), each finding as a behaviour, on every database."""

import asyncio
from datetime import datetime, timedelta, timezone
from decimal import Decimal as D

import pytest
from sqlalchemy import exc, func, select, text

from keycap import (
    APIKeyClient,
    Budget,
    BudgetExceededError,
    DatabaseError,
    DatabaseUnavailableError,
    IdempotencyConflictError,
    InvalidArgumentError,
    RateLimit,
    RateLimitedError,
)
from keycap._db.engine import Database, translate
from keycap._db.schema import ledger
from keycap._rules.money import to_micros
from keycap._rules.rate_limits import MAX_CALLS, MAX_METERED
from tests._ledger import assert_balances_match_ledger
from tests.conftest import SECRET, app_engine


async def _org(client: APIKeyClient) -> str:
    return (await client.create_organization("Acme")).id


# --- 1. numbers that overflow -------------------------------------------------------------


def test_a_rate_limit_above_the_maximum_is_refused_naming_it() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        RateLimit(D(10_000_000_000), "month", meter="tokens")
    assert str(MAX_METERED) in str(info.value)
    with pytest.raises(InvalidArgumentError):
        RateLimit(MAX_CALLS + 1, "month")


async def test_the_largest_rate_limits_count_exactly_and_never_overflow(
    client: APIKeyClient,
) -> None:
    issued = await client.create_key(
        await _org(client),
        rate_limits=[
            RateLimit(D(MAX_METERED), "month", meter="tokens"),
            RateLimit(MAX_CALLS, "month"),
        ],
    )
    for _ in range(3):
        await client.validate_key(issued.plaintext, cost={"tokens": D(MAX_METERED) / 4})
    # The largest cost there is: refused as a rate limit, not by the database.
    with pytest.raises(RateLimitedError) as info:
        await client.validate_key(issued.plaintext, cost={"tokens": D(10**12)})
    assert info.value.retry_after is None  # it can never fit
    with pytest.raises(RateLimitedError):
        await client.validate_key(issued.plaintext, cost={"tokens": D(MAX_METERED) / 2})
    statuses = {s.name: s for s in await client.get_rate_limits(issued.id)}
    tokens = statuses[f"{MAX_METERED}/month:tokens"]
    assert tokens.remaining == D(MAX_METERED) / 4 and isinstance(tokens.remaining, D)


async def test_credit_stops_at_the_maximum_and_stays_an_exact_integer(
    client: APIKeyClient,
) -> None:
    issued = await client.create_key(await _org(client), budgets=[Budget(D(1))])
    (budget,) = await client.get_budgets(issued.id)
    await client.grant_credit(budget.id, D(10**12 - 1))
    with pytest.raises(InvalidArgumentError) as info:
        await client.grant_credit(budget.id, D("0.000001"))
    assert "1000000000000" in str(info.value)
    with pytest.raises(InvalidArgumentError):
        await client.set_budget(issued.id, Budget(D(2)))  # the limit plus credit
    (after,) = await client.get_budgets(issued.id)
    assert (after.limit, after.credit, after.remaining) == (D(1), D(10**12 - 1), D(10**12))
    async with client.engine.connect() as conn:
        stored = await conn.scalar(select(func.sum(ledger.c.amount_micros)))
    assert stored == (10**12 - 1) * 10**6 and isinstance(stored, int | D)
    await assert_balances_match_ledger(client)


# --- error classification -----------------------------------------------------------------


def _mysql_error(code: int, message: str) -> exc.OperationalError:
    import pymysql

    return exc.OperationalError("SELECT 1", {}, pymysql.err.OperationalError(code, message))


@pytest.mark.parametrize(
    ("code", "unavailable"),
    [
        pytest.param(1690, False, id="bigint-out-of-range"),
        pytest.param(1366, False, id="incorrect-value"),
        pytest.param(2003, True, id="cannot-connect"),
        pytest.param(2013, True, id="lost-connection"),
        pytest.param(1040, True, id="too-many-connections"),
        pytest.param(1053, True, id="shutdown"),
        pytest.param(1205, True, id="lock-wait-timeout"),
    ],
)
def test_only_mysql_connection_failures_are_unavailable(code: int, unavailable: bool) -> None:
    error = translate(_mysql_error(code, "driver words"))
    assert isinstance(error, DatabaseError)
    assert isinstance(error, DatabaseUnavailableError) is unavailable


async def test_a_statement_the_database_refuses_is_not_an_outage(
    client: APIKeyClient, backend: str
) -> None:
    overflow = {
        "sqlite": "SELECT abs(-9223372036854775807 - 1)",  # integer overflow
        "postgresql": "SELECT 9223372036854775807::bigint + 1",
        "mariadb": "SELECT CAST(9223372036854775807 AS SIGNED) + 1",
        "pgbouncer": "SELECT 9223372036854775807::bigint + 1",
    }[backend]

    async def run(conn: object) -> object:
        return await conn.execute(text(overflow))  # type: ignore[attr-defined]

    with pytest.raises(DatabaseError) as info:
        await Database(client.engine, owned=False).run(run)
    assert not isinstance(info.value, DatabaseUnavailableError)


async def test_no_free_connection_in_the_pool_is_unavailable(db_url: str) -> None:
    engine, options = app_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    try:
        client = APIKeyClient(engine, signing_secret=SECRET, **options)
        async with engine.connect():  # the only connection, held
            with pytest.raises(DatabaseUnavailableError):
                await client.list_organizations()
    finally:
        await engine.dispose()


# --- 2. idempotency keys reused with other parameters ---------------------------------------


async def test_an_idempotency_key_reused_with_another_amount_is_a_conflict(
    client: APIKeyClient,
) -> None:
    issued = await client.create_key(await _org(client), budgets=[Budget(D(10))])
    await client.charge(issued.id, D("0.03"), idempotency_key="pay-7")
    with pytest.raises(IdempotencyConflictError) as info:
        await client.charge(issued.id, D("5.00"), idempotency_key="pay-7")
    assert (info.value.idempotency_key, info.value.kind) == ("pay-7", "charge")
    assert (await client.charge(issued.id, D("0.03"), idempotency_key="pay-7")).replayed

    await client.reserve(issued.id, D(1), idempotency_key="hold-1")
    with pytest.raises(IdempotencyConflictError):
        await client.reserve(issued.id, D(9), idempotency_key="hold-1")

    hold = await client.reserve(issued.id, D(1))
    await client.settle(hold.id, D("0.5"), idempotency_key="settle-1")
    with pytest.raises(IdempotencyConflictError):
        await client.settle(hold.id, D("0.9"), idempotency_key="settle-1")
    (budget,) = await client.get_budgets(issued.id)
    assert budget.used == D("0.53") and budget.held == D(1)
    await assert_balances_match_ledger(client)


async def test_concurrent_settles_with_one_key_all_return_the_one_result(
    client: APIKeyClient, backend: str
) -> None:
    issued = await client.create_key(await _org(client), budgets=[Budget(D(10))])
    hold = await client.reserve(issued.id, D(1))
    calls = 50 if backend != "sqlite" else 20
    results = await asyncio.gather(
        *(client.settle(hold.id, D("0.4"), idempotency_key="s") for _ in range(calls))
    )
    assert [r.replayed for r in results].count(False) == 1
    assert {(r.charged, r.returned) for r in results} == {(D("0.4"), D("0.6"))}
    (budget,) = await client.get_budgets(issued.id)
    assert (budget.used, budget.held) == (D("0.4"), 0)
    await assert_balances_match_ledger(client)


# --- 5. a budget created while a hold is open ---------------------------------------------


async def test_beyond_its_hold_a_settlement_meets_the_budgets_that_apply_at_settle_time(
    client: APIKeyClient,
) -> None:
    org = await _org(client)
    issued = await client.create_key(org)
    hold = await client.reserve(issued.id, D(1))  # no budget applies yet
    await client.set_budget(org, Budget(D("0.10")))  # created while the hold is open
    settled = await client.settle(hold.id, D(50))
    assert (settled.charged, settled.shortfall) == (D("1.10"), D("48.90"))
    (budget,) = await client.get_budgets(org)
    assert (budget.used, budget.remaining) == (D("0.10"), 0)
    with pytest.raises(BudgetExceededError):
        await client.charge(issued.id, D("0.10"))
    await assert_balances_match_ledger(client)


async def test_a_budget_lowered_while_a_hold_is_open_limits_only_the_excess(
    client: APIKeyClient,
) -> None:
    issued = await client.create_key(await _org(client), budgets=[Budget(D(10))])
    hold = await client.reserve(issued.id, D(4))
    await client.set_budget(issued.id, Budget(D(5)))  # lowered: 1 left beside the hold
    settled = await client.settle(hold.id, D(7))
    assert (settled.charged, settled.shortfall) == (D(5), D(2))
    (budget,) = await client.get_budgets(issued.id)
    assert (budget.used, budget.held) == (D(5), 0)
    await assert_balances_match_ledger(client)


# --- 7. strings compare alike on every database ----------------------------------------------


async def test_whitespace_at_either_end_is_refused_everywhere(client: APIKeyClient) -> None:
    org = await _org(client)
    issued = await client.create_key(org, budgets=[Budget(D(10))])
    await client.create_product(org, "chat-api")
    await client.charge(issued.id, D("0.07"), idempotency_key="pay-7")
    with pytest.raises(InvalidArgumentError):
        await client.charge(issued.id, D("1.00"), idempotency_key="pay-7 ")
    for name in ("Acme ", " Acme", "Acme\u00a0"):
        with pytest.raises(InvalidArgumentError):
            await client.create_organization(name)
    with pytest.raises(InvalidArgumentError):
        await client.validate_key(issued.plaintext, product_name="chat-api ")
    await client.validate_key(issued.plaintext, product_name="chat-api")


# --- 8. the ledger survives every deletion -----------------------------------------------------


async def test_deleting_an_organization_keeps_its_ledger_and_releases_its_holds(
    client: APIKeyClient,
) -> None:
    org = await _org(client)
    issued = await client.create_key(org, budgets=[Budget(D(10))])
    await client.set_budget(org, Budget(D(10)))
    await client.charge(issued.id, D("0.25"))
    await client.reserve(issued.id, D(1))
    before = await client.usage(org_id=org)
    await client.delete_organization(org)

    async with client.engine.connect() as conn:
        kinds = (
            await conn.execute(
                select(ledger.c.kind, func.count())
                .where(ledger.c.org_id == org)
                .group_by(ledger.c.kind)
            )
        ).all()
    assert dict(kinds) == {"charge": 2, "hold": 2, "release": 2}  # key and org budget each
    assert await client.usage(org_id=org) == before
    assert [r.amount for r in before] == [D("0.25")]


# --- 9. smaller holes in input checking --------------------------------------------------------


@pytest.mark.parametrize(
    "amount",
    [
        pytest.param(D("0.03" + "0" * 60 + "1"), id="a-one-past-60-zeros"),
        pytest.param(D("0.02" + "9" * 70), id="seventy-nines"),
        pytest.param(D("1E-999999999"), id="tiny-exponent"),
    ],
)
def test_an_amount_with_more_than_six_places_is_refused_at_any_precision(amount: D) -> None:
    with pytest.raises(InvalidArgumentError):
        to_micros(amount, "amount")


@pytest.mark.parametrize(
    "when",
    [
        pytest.param(datetime.min.replace(tzinfo=timezone(timedelta(hours=5))), id="min+5h"),
        pytest.param(datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))), id="max-5h"),
    ],
)
async def test_a_datetime_outside_utc_range_is_an_invalid_argument(
    client: APIKeyClient, when: datetime
) -> None:
    org = await _org(client)
    issued = await client.create_key(org)
    with pytest.raises(InvalidArgumentError):
        await client.create_key(org, expires_at=when)
    with pytest.raises(InvalidArgumentError):
        await client.update_key(issued.id, expires_at=when)
    with pytest.raises(InvalidArgumentError):
        await client.usage(org_id=org, since=when)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"metadata": {1: "a", "1": "b"}}, id="int-metadata-key"),
        pytest.param({"metadata": {"a": [{2: "x"}]}}, id="nested-int-key"),
        pytest.param({"scopes": {"chat:write": False}}, id="dict-as-scopes"),
    ],
)
async def test_an_input_that_would_be_stored_otherwise_than_given_is_refused(
    client: APIKeyClient, kwargs: dict[str, object]
) -> None:
    with pytest.raises(InvalidArgumentError):
        await client.create_key(await _org(client), **kwargs)  # type: ignore[arg-type]
    assert await client.list_keys() == []


def test_a_default_rate_limit_name_over_64_characters_is_refused() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        # Trailing zeros are exact (1.000…0 is 1), and they show in the default name.
        RateLimit(D("1." + "0" * 60), "minute", meter="tokens")
    assert info.value.field == "name"
