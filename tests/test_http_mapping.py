"""The framework-free HTTP mapping: pure, no server, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from starlette.datastructures import Headers

from keycap import _errors as errors
from keycap._rules.money import plain
from keycap.integrations._http import (
    HTTPOptions,
    RateLimitView,
    credential,
    problem,
    rate_limit_headers,
)

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
KEY = "sk_live_" + "a" * 51


def budget_error() -> errors.BudgetExceededError:
    return errors.BudgetExceededError(
        budget_id="bud_AAAAAAAAAAAAAAAA",
        scope="key",
        subject_id="key_AAAAAAAAAAAA",
        meter="spend",
        period="day",
        limit=Decimal("5.000000"),
        used=Decimal("4.900000"),
        held=Decimal("0"),
        remaining=Decimal("0.100000"),
        requested=Decimal("0.250000"),
        reset_at=NOW + timedelta(hours=12, seconds=0.5),
    )


def rate_error(retry_after: float | None) -> errors.RateLimitedError:
    return errors.RateLimitedError(
        name="minute",
        scope="key",
        limit=100,
        remaining=0,
        retry_after=retry_after,
        reset_at=NOW + timedelta(seconds=60),
        window_seconds=Decimal(60),
    )


STATUSES = [
    (errors.MissingKeyError(), 401),
    (errors.InvalidKeyError(), 401),
    (errors.RolledKeyError(NOW), 401),
    (errors.ExpiredKeyError(NOW), 401),
    (errors.RevokedKeyError(NOW), 401),
    (errors.DisabledKeyError(NOW), 401),
    (errors.ForbiddenError("product"), 403),
    (errors.InsufficientScopeError(["a", "b"]), 403),
    (rate_error(45.6), 429),
    (errors.UsageExhaustedError(10), 403),
    (budget_error(), 402),
    (errors.DatabaseUnavailableError(), 503),
    (errors.DatabaseError(), 500),
    (errors.NotFoundError("key", "key_AAAAAAAAAAAA"), 404),
    (errors.AlreadyExistsError("organization", "org_AAAAAAAAAAAAAAAA"), 409),
    (errors.HoldClosedError("hold_AAAAAAAAAAAAAAAA", "settled"), 409),
    (errors.IdempotencyConflictError("pay-7", "charge"), 409),
    (errors.AccessNotGrantedError("denied", "use the team key"), 409),
    (errors.InvalidArgumentError("name", "must not be empty"), 400),
    (errors.ConfigurationError("no client"), 500),
]


def test_every_error_class_has_a_status() -> None:
    mapped = {type(error) for error, _ in STATUSES}
    every = {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.KeycapError)
    }
    assert every - mapped == {errors.KeycapError, errors.KeyRejectedError}


@pytest.mark.parametrize(("error", "status"), STATUSES, ids=lambda x: type(x).__name__)
def test_each_error_has_a_status_and_a_problem_body(error: errors.KeycapError, status: int) -> None:
    found = problem(error, HTTPOptions(), NOW)
    assert found.status == status
    assert found.body["status"] == status and found.body["code"] == error.code
    assert "message" not in found.body
    if not isinstance(error, errors.DatabaseError):
        assert found.body["detail"] == error.message
    if isinstance(error, errors.HoldClosedError):
        assert found.body["keycap_status"] == "settled"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        pytest.param(
            errors.DatabaseUnavailableError(
                "database unavailable: ConnectionRefusedError: connect to db.internal:5432"
            ),
            503,
            id="unavailable",
        ),
        pytest.param(
            errors.DatabaseError("database error: NumericValueOutOfRange: bigint out of range"),
            500,
            id="statement-failed",
        ),
    ],
)
def test_a_database_failure_keeps_the_drivers_words_out_of_the_body(
    error: errors.DatabaseError, status: int
) -> None:
    found = problem(error, HTTPOptions(), NOW)
    assert found.status == status
    assert found.body["code"] == error.code
    text = repr(found.body) + repr(found.headers)
    assert "db.internal" not in text and "bigint" not in text and "Error:" not in text
    if status == 503:
        assert found.body["detail"] == "the service is temporarily unavailable"
        assert found.headers == {"Retry-After": "1"}


def test_refusals_carry_their_headers() -> None:
    options = HTTPOptions()
    assert problem(rate_error(45.6), options, NOW).headers == {
        "RateLimit-Policy": '"minute";q=100;w=60',
        "RateLimit": '"minute";r=0;t=60',  # when the whole limit is back
        "Retry-After": "46",  # when this call fits; rounded up: never too early
    }
    assert problem(rate_error(45.6), HTTPOptions(rate_limit_headers="legacy"), NOW).headers == {
        "RateLimit-Limit": "100",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "60",
        "Retry-After": "46",
    }
    assert "Retry-After" not in problem(rate_error(None), options, NOW).headers
    assert problem(budget_error(), options, NOW).headers == {"Keycap-Budget-Remaining": "0.1"}
    as_429 = problem(budget_error(), HTTPOptions(budget_status=429), NOW)
    assert as_429.status == 429 and as_429.headers["Retry-After"] == str(12 * 3600 + 1)
    cap = problem(errors.UsageExhaustedError(3), HTTPOptions(usage_exhausted_status=429), NOW)
    assert cap.status == 429


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"authorization": f"Bearer {KEY}"}, KEY),
        ({"authorization": f"bEaReR {KEY}"}, KEY),
        ({"authorization": f"Basic {KEY}"}, None),
        ({"authorization": "Bearer "}, None),
        ({"authorization": "Bearer", "x-api-key": KEY}, KEY),
        ({"x-api-key": f"  {KEY} "}, KEY),
        ({"X-Api-Key": KEY}, KEY),
        ({}, None),
        ({"x-api-key": ""}, None),
    ],
)
def test_the_credential_is_read_from_bearer_or_key_headers(
    headers: dict[str, str], expected: str | None
) -> None:
    assert credential(Headers(headers), HTTPOptions().headers) == expected


def test_an_absurd_header_is_cut_but_stays_invalid() -> None:
    found = credential(Headers({"x-api-key": "k" * 100_000}), ("x-api-key",))
    assert found is not None and 512 < len(found) < 1000


def test_bad_http_options_are_refused() -> None:
    for bad in (
        {"budget_status": 400},
        {"usage_exhausted_status": 402},
        {"headers": ()},
        {"headers": "authorization"},
    ):
        with pytest.raises(errors.ConfigurationError):
            HTTPOptions(**bad)  # type: ignore[arg-type]


def test_amounts_in_headers_are_exact_and_plain() -> None:
    assert [plain(x) for x in (Decimal("0.100000"), Decimal("0E-6"), Decimal("5"), 7)] == [
        "0.1",
        "0",
        "5",
        "7",
    ]
    assert plain(Decimal("1000000.000000")) == "1000000"


def test_a_metered_limit_is_told_in_whole_units_with_its_meter() -> None:
    view = RateLimitView("tokens/min", Decimal("1000.5"), Decimal("10.7"), Decimal("0.5"), "tokens")
    assert rate_limit_headers(view, NOW + timedelta(seconds=1.2), NOW) == {
        # Integers only: the quota and what is left round down, the window up.
        "RateLimit-Policy": '"tokens/min";q=1000;w=1;keycap-meter="tokens"',
        "RateLimit": '"tokens/min";r=10;t=2',
    }


def test_an_unknown_rate_limit_header_style_is_refused() -> None:
    with pytest.raises(errors.ConfigurationError, match="ietf"):
        HTTPOptions(rate_limit_headers="2022")
