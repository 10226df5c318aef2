"""MariaDB's compound statements (``keycap._db.blocks``): a metered,
rate-limited or tracked validation, a charge, a reserve, a settlement within
its hold and a release in one round trip.

tests/test_round_trips.py shows these calls take the block (one round trip);
tests/test_one_statement.py storms them from four processes, alone and beside
the transactions that still run (idempotent charges) on the same rows; here,
what is MariaDB's own.
"""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from keycap import APIKeyClient, Budget, BudgetExceededError
from keycap._db import blocks
from keycap._rules.policy import Requirement
from tests._ledger import assert_balances_match_ledger
from tests.conftest import DATABASES

MARIADB = [name for name in DATABASES if name == "mariadb"]
ON_MARIADB = pytest.mark.parametrize("database", MARIADB, indirect=True)


@ON_MARIADB
async def test_the_block_path_is_taken_once_the_server_is_known(client: APIKeyClient) -> None:
    await client.create_organization("A")  # the dialect has met the server
    assert client._db.one_block


@ON_MARIADB
async def test_a_settlement_beyond_its_hold_and_a_hold_on_no_budget_stay_exact(
    client: APIKeyClient,
) -> None:
    org = (await client.create_organization("A")).id
    budgeted = await client.create_key(org, budgets=[Budget(D("1.00"))])
    hold = await client.reserve(budgeted.id, D("0.10"))
    settled = await client.settle(hold.id, D("0.30"))  # beyond: the transaction
    assert settled.charged == D("0.30")
    free = await client.create_key(org)
    for close in ("settle", "release"):
        hold = await client.reserve(free.id, D("0.10"))
        if close == "settle":
            assert (await client.settle(hold.id, D("0.05"))).charged == D("0.05")
        else:
            await client.release(hold.id)
    (status,) = await client.get_budgets(budgeted.id)
    assert status.used == D("0.30") and status.held == 0
    await assert_balances_match_ledger(client)


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
        blocks.reserve_block(dialect),
        blocks.closing_block(dialect, True),
        blocks.closing_block(dialect, False),
        blocks.validation_block(dialect, Requirement(), ("p1",), 1, True),
    ):
        text = block.sql.replace("%%", "").replace("%s", "")
        assert "%" not in text
        assert block.sql.count("%s") - block.sql.count("%%s") == len(block.args(_every_bind(block)))


def _every_bind(block: blocks.Block) -> dict[str, object]:
    return {name: None for part in block.parts for name, _ in part.binds}
