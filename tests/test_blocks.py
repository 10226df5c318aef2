"""MariaDB's compound statements (``keycap._db.blocks``): a metered,
rate-limited or tracked validation, a charge, a reserve, a settlement within
its hold and a release in one round trip.

tests/test_round_trips.py shows these calls take the block (one round trip);
tests/test_one_statement.py storms them from four processes, alone and beside
the transactions that still run (a keyless identity's charges) on the same
rows; here, what is MariaDB's own.
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


@ON_MARIADB
async def test_a_failed_block_leaves_no_transaction_behind_on_its_connection(
    db_url: str,
) -> None:
    """A statement that fails ends the block but not its transaction, and the
    server's error says nothing of it: left open, the pooled connection's read
    view would hide what others commit afterwards (a replayed reserve's hold
    read as missing)."""
    from sqlalchemy import text

    from keycap._db.engine import Conflict, Database, create_engine

    engine = create_engine(db_url + "?pool_size=1&max_overflow=0")  # one connection
    db = Database(engine, owned=True)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE IF EXISTS kc_probe"))
            await conn.execute(text("CREATE TABLE kc_probe (id INT PRIMARY KEY)"))
            await conn.execute(text("INSERT INTO kc_probe VALUES (1)"))
        ok = "BEGIN NOT ATOMIC START TRANSACTION; SELECT COUNT(*) FROM kc_probe; COMMIT; END"
        await db.block(ok, [])  # its last status: no transaction open
        failing = (
            "BEGIN NOT ATOMIC DECLARE v INT; START TRANSACTION;"
            " SELECT COUNT(*) INTO v FROM kc_probe; INSERT INTO kc_probe VALUES (1); COMMIT; END"
        )
        with pytest.raises(Conflict):
            await db.block(failing, [])
        other = create_engine(db_url)
        try:
            async with other.begin() as conn:
                await conn.execute(text("INSERT INTO kc_probe VALUES (2)"))
        finally:
            await other.dispose()
        async with db.reading() as conn:
            seen = (await conn.execute(text("SELECT id FROM kc_probe ORDER BY id"))).scalars()
            assert list(seen) == [1, 2]
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE IF EXISTS kc_probe"))
        await db.dispose()
