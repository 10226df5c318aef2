"""How money moves, without a database: the settlement split and the ledger entries."""

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from keycap._rules import movements
from keycap._rules.movements import Origin, split_settlement

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
ORIGIN = Origin(
    now=NOW,
    org_id="org_a",
    key_id="key_a",
    project_id="proj_a",
    hold_id="hold_a",
    idempotency_key="pay-1",
    metadata={"model": "m"},
)


def budget(id_: str, meter: str = "spend", org_id: str = "org_a") -> SimpleNamespace:
    return SimpleNamespace(id=id_, meter=meter, org_id=org_id, period_start=NOW)


@pytest.mark.parametrize(
    ("held", "actual", "room", "within", "returned", "fits", "shortfall"),
    [
        pytest.param(100, 40, 1000, 40, 60, 0, 0, id="below-the-hold"),
        pytest.param(100, 100, 0, 100, 0, 0, 0, id="exactly-the-hold"),
        pytest.param(100, 0, 0, 0, 100, 0, 0, id="nothing-used"),
        pytest.param(100, 150, 1000, 100, 0, 50, 0, id="excess-that-fits"),
        pytest.param(100, 150, 20, 100, 0, 20, 30, id="excess-partly-fits"),
        pytest.param(100, 150, 0, 100, 0, 0, 50, id="excess-with-no-room"),
        pytest.param(100, 150, None, 100, 0, 50, 0, id="excess-with-no-budget"),
    ],
)
def test_a_settlement_splits_into_within_returned_fits_and_shortfall(
    held: int,
    actual: int,
    room: int | None,
    within: int,
    returned: int,
    fits: int,
    shortfall: int,
) -> None:
    split = split_settlement(held, actual, room)
    assert (split.within, split.returned, split.fits, split.shortfall) == (
        within,
        returned,
        fits,
        shortfall,
    )
    assert split.within + split.returned == held
    assert split.charged + split.shortfall == actual


def test_a_dead_key_is_charged_nothing_beyond_the_hold() -> None:
    split = split_settlement(100, 150, None).nothing_beyond_the_hold()
    assert (split.charged, split.fits, split.shortfall) == (100, 0, 50)


def test_a_charge_has_one_entry_per_budget_and_one_primary_per_meter() -> None:
    debited = [(budget("bud_key"), 30), (budget("bud_org"), 30), (budget("bud_tok", "tokens"), 7)]
    entries = movements.charges(ORIGIN, debited, {"spend": 30, "tokens": 7})
    assert [(e["budget_id"], e["is_primary"]) for e in entries] == [
        ("bud_key", True),
        ("bud_org", False),
        ("bud_tok", True),
    ]
    assert all(e["kind"] == "charge" and e["delta_used"] == e["amount_micros"] for e in entries)
    assert [e["metadata"] for e in entries] == [{"model": "m"}, None, {"model": "m"}]


def test_a_meter_no_budget_took_is_still_recorded_once() -> None:
    entries = movements.charges(ORIGIN, [(budget("bud_key"), 30)], {"spend": 30, "tokens": 9})
    unbudgeted = entries[1]
    assert unbudgeted["budget_id"] is None and unbudgeted["period_start"] is None
    assert (unbudgeted["meter"], unbudgeted["amount_micros"], unbudgeted["is_primary"]) == (
        "tokens",
        9,
        True,
    )
    assert unbudgeted["org_id"] == "org_a"


def test_holds_and_releases_move_held_not_used() -> None:
    placed = movements.holds(ORIGIN, [budget("bud_a"), budget("bud_b")], 40)
    assert [(e["kind"], e["delta_used"], e["delta_held"]) for e in placed] == [("hold", 0, 40)] * 2
    assert [e["is_primary"] for e in placed] == [True, False]
    freed = movements.releases(ORIGIN, [budget("bud_a")], 40, expired=False)
    expired = movements.releases(ORIGIN, [budget("bud_a")], 40, expired=True)
    assert (freed[0]["kind"], freed[0]["delta_held"]) == ("release", -40)
    assert expired[0]["kind"] == "expiry"


def test_a_settlement_records_settle_then_excess_then_shortfall() -> None:
    split = split_settlement(100, 150, 20)
    b = budget("bud_a")
    entries = movements.settlement(ORIGIN, "spend", split, [b], [b])
    assert [
        (e["kind"], e["amount_micros"], e["delta_used"], e["delta_held"], e["is_primary"])
        for e in entries
    ] == [
        ("settle", 100, 100, -100, True),
        ("charge", 20, 20, 0, True),
        ("shortfall", 30, 0, 0, False),
    ]
    assert all(e["hold_id"] == "hold_a" for e in entries)


def test_a_settlement_with_no_budget_is_unbudgeted() -> None:
    split = split_settlement(100, 130, None)
    entries = movements.settlement(ORIGIN, "spend", split, [], [])
    assert [(e["kind"], e["budget_id"], e["amount_micros"]) for e in entries] == [
        ("settle", None, 100),
        ("charge", None, 30),
    ]


def test_the_sum_of_a_budgets_entries_is_its_balance() -> None:
    b = budget("bud_a")
    entries = [
        *movements.holds(ORIGIN, [b], 100),
        *movements.settlement(ORIGIN, "spend", split_settlement(100, 60, 500), [b], []),
        *movements.charges(ORIGIN, [(b, 25)], {"spend": 25}),
        *movements.holds(ORIGIN, [b], 10),
        *movements.releases(ORIGIN, [b], 10, expired=True),
    ]
    ours = [e for e in entries if e["budget_id"] == "bud_a"]
    assert sum(e["delta_used"] for e in ours) == 85
    assert sum(e["delta_held"] for e in ours) == 0


def test_a_topup_belongs_to_no_key() -> None:
    entry = movements.topup(budget("bud_a"), 500, NOW)
    assert (entry["kind"], entry["key_id"], entry["delta_used"], entry["is_primary"]) == (
        "topup",
        None,
        0,
        True,
    )
