from decimal import Decimal

import pytest

from keycap._errors import InvalidArgumentError
from keycap._rules.money import costs, from_micros, to_micros


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        (Decimal("0.03"), 30_000),
        (Decimal("1"), 1_000_000),
        (Decimal("0.000001"), 1),
        (Decimal("1.500000"), 1_500_000),
        (Decimal("1E+2"), 100_000_000),
        (5, 5_000_000),
        (0, 0),
        (Decimal("1000000000000"), 10**18),
    ],
)
def test_amounts_convert_to_micro_units_exactly(value: Decimal, micros: int) -> None:
    assert to_micros(value, "x") == micros
    assert from_micros(micros) == Decimal(value)


@pytest.mark.parametrize(
    "bad",
    [
        0.03,
        1.0,
        float("nan"),
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        Decimal("-0.01"),
        -1,
        Decimal("0.0000001"),
        Decimal("1.0000005"),
        Decimal("1000000000000.000001"),
        10**13,
        "0.03",
        None,
        True,
        b"1",
        [1],
    ],
)
def test_an_inexact_or_out_of_range_amount_is_refused(bad: object) -> None:
    with pytest.raises(InvalidArgumentError):
        to_micros(bad, "amount")


def test_zero_can_be_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        to_micros(Decimal(0), "amount", allow_zero=False)


def test_from_micros_is_a_decimal_with_six_places() -> None:
    value = from_micros(990_000)
    assert isinstance(value, Decimal) and str(value) == "0.990000"


def test_a_cost_is_an_amount_or_a_map_of_meters() -> None:
    assert costs(Decimal("0.5")) == {"spend": 500_000}
    assert costs({"spend": Decimal("1"), "tokens": 1500}) == {
        "spend": 1_000_000,
        "tokens": 1_500_000_000,
    }


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({}, id="no-meter"),
        pytest.param({"Bad": 1}, id="uppercase-meter"),
        pytest.param({"spend": 0.5}, id="float-amount"),
        pytest.param({"x" * 33: 1}, id="meter-name-too-long"),
    ],
)
def test_a_bad_cost_is_refused(bad: object) -> None:
    with pytest.raises(InvalidArgumentError):
        costs(bad)  # type: ignore[arg-type]


def test_ten_thousand_micro_charges_sum_exactly() -> None:
    assert from_micros(sum(to_micros(Decimal("0.000001"), "x") for _ in range(10_000))) == Decimal(
        "0.01"
    )
