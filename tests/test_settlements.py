"""The kept settlements of keycap._settlements, without a database: the settle and
charge they call are stand-ins that fail as the database would."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal as D

import pytest

from keycap import (
    DatabaseUnavailableError,
    HoldClosedError,
    NotFoundError,
    PendingSettlement,
)
from keycap._models import Settlement
from keycap._settlements import Pending

NOW = datetime(2026, 1, 15, tzinfo=UTC)


def pending(hold: str) -> PendingSettlement:
    return PendingSettlement(hold, D("0.40"), f"keycap-settle-{hold}", NOW)


class Database:
    """A stand-in for settle and charge: down, up, or failing as told per hold."""

    def __init__(self) -> None:
        self.down = True
        self.refuse: dict[str, Exception] = {}
        self.settled: list[str] = []
        self.charged: list[str] = []

    async def settle(self, p: PendingSettlement) -> Settlement:
        if self.down:
            raise DatabaseUnavailableError("database unavailable: frozen")
        if p.hold_id in self.refuse:
            raise self.refuse[p.hold_id]
        self.settled.append(p.hold_id)
        return Settlement.model_construct()

    async def charge(self, p: PendingSettlement) -> object:
        self.charged.append(p.hold_id)
        return None


async def test_kept_settlements_are_written_in_order_once_the_database_is_back() -> None:
    db = Database()
    queue = Pending(db.settle, db.charge, None)
    for hold in ("a", "b"):
        await queue.keep(pending(hold), DatabaseUnavailableError("down"))
    assert await queue.retry() == 0 and [p.hold_id for p in queue.kept] == ["a", "b"]
    db.down = False
    assert await queue.retry() == 2
    assert (db.settled, queue.kept) == (["a", "b"], ())
    await queue.close()


async def test_a_hold_that_expired_meanwhile_is_charged_instead() -> None:
    db = Database()
    queue = Pending(db.settle, db.charge, None)
    await queue.keep(pending("a"), DatabaseUnavailableError("down"))
    db.down = False
    db.refuse["a"] = HoldClosedError("a", "expired")
    assert await queue.retry() == 1
    assert (db.settled, db.charged) == ([], ["a"])
    await queue.close()


@pytest.mark.parametrize(
    ("settle_refusal", "charge_refusal"),
    [
        (HoldClosedError("a", "released"), None),
        (HoldClosedError("a", "expired"), NotFoundError("key", "(deleted)")),
    ],
    ids=["released-meanwhile", "expired-and-its-key-deleted"],
)
async def test_what_cannot_be_written_any_more_is_logged_as_lost(
    settle_refusal: Exception,
    charge_refusal: Exception | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Database()

    async def charge(p: PendingSettlement) -> object:
        if charge_refusal is not None:
            raise charge_refusal
        return await db.charge(p)

    queue = Pending(db.settle, charge, None)
    await queue.keep(pending("a"), DatabaseUnavailableError("down"))
    db.down = False
    db.refuse["a"] = settle_refusal
    with caplog.at_level(logging.ERROR, logger="keycap.settlements"):
        assert await queue.retry() == 0
    assert queue.kept == () and db.charged == [] and "lost" in caplog.text
    await queue.close()


async def test_past_the_limit_only_the_hook_keeps_a_settlement(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Database()
    handed: list[str] = []

    async def hook(p: PendingSettlement) -> None:
        handed.append(p.hold_id)
        if p.hold_id == "b":
            raise RuntimeError("the hook's own store is down")

    queue = Pending(db.settle, db.charge, hook, limit=1)
    with caplog.at_level(logging.WARNING, logger="keycap.settlements"):
        await queue.keep(pending("a"), DatabaseUnavailableError("down"))
        await queue.keep(pending("b"), DatabaseUnavailableError("down"))
    assert [p.hold_id for p in queue.kept] == ["a"] and handed == ["a", "b"]
    assert "not kept" in caplog.text and "hook failed" in caplog.text
    await queue.close()


async def test_closing_with_the_database_still_down_logs_each_unwritten_settlement(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Database()
    queue = Pending(db.settle, db.charge, None)
    await queue.keep(pending("a"), DatabaseUnavailableError("down"))
    with caplog.at_level(logging.ERROR, logger="keycap.settlements"):
        await queue.close()
    assert "hold a" in caplog.text and "unwritten" in caplog.text and queue.kept == ()
