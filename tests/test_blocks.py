"""MariaDB's compound statements (``keycap._db.blocks``): a charge and a metered,
rate-limited or tracked validation in one round trip, exact under storms from
four processes, alone and beside the transactions that still run (idempotent
charges) on the same rows.

tests/test_round_trips.py shows these calls take the block (one round trip);
here, that the block admits exactly what the limits allow.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal as D

import pytest

from keycap import APIKeyClient, Budget, BudgetExceededError, RateLimit
from keycap._db import blocks
from keycap._rules.policy import Requirement
from tests import _workers
from tests._ledger import assert_balances_match_ledger
from tests.conftest import DATABASES, REPORT

MARIADB = [name for name in DATABASES if name == "mariadb"]
ON_MARIADB = pytest.mark.parametrize("database", MARIADB, indirect=True)


def _storm(*jobs: tuple[object, ...]) -> int:
    """Each job ``_workers.storm(*job)`` in a process of its own; the calls admitted."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(jobs), mp_context=ctx) as pool:
        return sum(f.result() for f in [pool.submit(_workers.storm, *job) for job in jobs])


@ON_MARIADB
async def test_the_block_path_is_taken_once_the_server_is_known(client: APIKeyClient) -> None:
    await client.create_organization("A")  # the dialect has met the server
    assert client._db.one_block


@ON_MARIADB
@pytest.mark.concurrency
async def test_a_storm_of_block_charges_admits_exactly_the_budget(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, budgets=[Budget(D("1.00"))])
    admitted = _storm(*[(db_url, "charge", issued.id, "0.01", 64)] * 4)
    REPORT.append(f"{backend}: block, 4x64 charges of 0.01 on 1.00 -> admitted={admitted}")
    assert admitted == 100
    (status,) = await client.get_budgets(issued.id)
    assert status.used == D("1.00")
    await assert_balances_match_ledger(client)


@ON_MARIADB
@pytest.mark.concurrency
async def test_a_storm_of_block_validations_admits_exactly_the_org_budget(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    org = (await client.create_organization("A")).id
    await client.set_budget(org, Budget(D("1.00")))
    issued = await client.create_key(
        org, budgets=[Budget(D("5.00"))], rate_limits=[RateLimit(10_000, "minute")]
    )
    admitted = _storm(*[(db_url, "validate", issued.plaintext, "0.01", 64)] * 4)
    REPORT.append(
        f"{backend}: block, 4x64 validations costing 0.01 on an org budget of 1.00 "
        f"-> admitted={admitted}"
    )
    assert admitted == 100
    assert (await client.get_key(issued.id)).use_count == 100
    await assert_balances_match_ledger(client)


@ON_MARIADB
@pytest.mark.concurrency
async def test_a_storm_of_block_validations_admits_exactly_the_rate_limit(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    issued = await client.create_key(
        (await client.create_organization("A")).id, rate_limits=[RateLimit(100, "minute")]
    )
    at = datetime(2026, 1, 15, 12, 0, 15, tzinfo=UTC).isoformat()  # one instant everywhere
    admitted = _storm(*[(db_url, "validate", issued.plaintext, None, 64, True, at)] * 4)
    REPORT.append(f"{backend}: block, 4x64 validations on 100/minute -> admitted={admitted}")
    assert admitted == 100
    assert (await client.get_key(issued.id)).use_count == 100


@ON_MARIADB
@pytest.mark.concurrency
async def test_block_and_transactional_charges_share_a_budget_exactly(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    # Mixed traffic on the same rows: charges (the block) through one key,
    # idempotent charges (a transaction) through another, on their org's budget.
    org = (await client.create_organization("A")).id
    await client.set_budget(org, Budget(D("1.00")))
    plain = await client.create_key(org, budgets=[Budget(D("0.80"))])
    idempotent = await client.create_key(org, budgets=[Budget(D("0.80"))])
    jobs = [
        (db_url, op, key.id, "0.01", 64)
        for op, key in [("charge", plain), ("idempotent charge", idempotent)] * 2
    ]
    admitted = _storm(*jobs)
    (status,) = await client.get_budgets(org)
    ledger_lines = await assert_balances_match_ledger(client)
    REPORT.append(
        f"{backend}: 2x64 block + 2x64 transactional charges of 0.01 on an org budget of "
        f"1.00 -> admitted={admitted}, org used={status.used}; {'; '.join(ledger_lines)}"
    )
    assert admitted == 100 and status.used == D("1.00")


@ON_MARIADB
async def test_a_refused_block_names_the_budget_as_it_locked_it(client: APIKeyClient) -> None:
    org = (await client.create_organization("A")).id
    await client.set_budget(org, Budget(D("0.05")))
    issued = await client.create_key(org, budgets=[Budget(D("1.00"))])
    await client.charge(issued.id, D("0.04"))
    with pytest.raises(BudgetExceededError) as refused:
        await client.charge(issued.id, D("0.02"))
    assert refused.value.scope == "organization" and refused.value.remaining == D("0.01")
    with pytest.raises(BudgetExceededError):
        await client.validate_key(issued.plaintext, cost=D("0.02"))
    assert (await client.get_key(issued.id)).use_count == 0  # rolled back with the refusal
    await assert_balances_match_ledger(client)


def test_a_block_holds_no_percent_sign_of_its_own() -> None:
    # The driver fills the block's placeholders with "%": every literal one is doubled.
    from sqlalchemy.dialects.mysql import aiomysql

    dialect = aiomysql.dialect()
    for block in (
        blocks.charge_block(dialect, 2),
        blocks.validation_block(dialect, Requirement(), ("p1",), 1, True),
    ):
        text = block.sql.replace("%%", "").replace("%s", "")
        assert "%" not in text
        assert block.sql.count("%s") - block.sql.count("%%s") == len(block.args(_every_bind(block)))


def _every_bind(block: blocks.Block) -> dict[str, object]:
    return {name: None for part in block.parts for name, _ in part.binds}
