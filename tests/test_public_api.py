import inspect
from datetime import UTC, datetime

import pytest

import keycap
from keycap import _errors as errors


def test_all_is_sorted_and_exactly_what_we_mean() -> None:
    assert keycap.__all__ == sorted(keycap.__all__)
    assert set(keycap.__all__) == {
        "APIKey",
        "APIKeyClient",
        "AlreadyExistsError",
        "Budget",
        "BudgetAlert",
        "BudgetExceededError",
        "BudgetStatus",
        "Charge",
        "ConfigurationError",
        "DatabaseError",
        "DatabaseUnavailableError",
        "DisabledKeyError",
        "ExpiredKeyError",
        "ForbiddenError",
        "Hold",
        "HoldClosedError",
        "InsufficientScopeError",
        "InvalidArgumentError",
        "InvalidKeyError",
        "IssuedKey",
        "KeyRejectedError",
        "KeyStatus",
        "KeycapError",
        "MissingKeyError",
        "NotFoundError",
        "Organization",
        "Product",
        "Project",
        "RateLimit",
        "RateLimitStatus",
        "RateLimitedError",
        "RevokedKeyError",
        "Settlement",
        "UsageExhaustedError",
        "UsageRow",
    }
    for name in keycap.__all__:
        assert getattr(keycap, name).__module__.startswith("keycap.")


ERROR_CLASSES = [
    obj
    for obj in vars(errors).values()
    if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == errors.__name__
]


def test_every_error_is_exported_and_under_the_root() -> None:
    assert {cls.__name__ for cls in ERROR_CLASSES} <= set(keycap.__all__)
    assert all(issubclass(cls, errors.KeycapError) for cls in ERROR_CLASSES)


def test_codes_are_unique_and_the_tree_is_drawn_in_the_docstring() -> None:
    codes = [cls.code for cls in ERROR_CLASSES]
    assert len(codes) == len(set(codes))
    for cls in ERROR_CLASSES:
        assert cls.__name__ in (errors.__doc__ or "")


T = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("error", "data"),
    [
        (errors.InvalidKeyError(), {}),
        (errors.MissingKeyError(), {}),
        (
            errors.ExpiredKeyError(T, key_id="key_x"),
            {"expired_at": T.isoformat(), "key_id": "key_x"},
        ),
        (errors.RevokedKeyError(T), {"revoked_at": T.isoformat()}),
        (errors.DisabledKeyError(T), {"disabled_at": T.isoformat()}),
        (errors.ForbiddenError("product"), {"reason": "product"}),
        (errors.InsufficientScopeError(["a", "b"]), {"missing_scopes": ["a", "b"]}),
        (errors.NotFoundError("key", "key_x"), {"resource": "key", "id": "key_x"}),
        (errors.AlreadyExistsError("organization", "org_x"), {"existing_id": "org_x"}),
        (errors.InvalidArgumentError("name", "too long"), {"field": "name"}),
    ],
)
def test_errors_carry_machine_readable_data(error: errors.KeycapError, data: dict) -> None:
    out = error.to_dict()
    assert out["code"] == error.code and out["message"]
    for key, value in data.items():
        assert out[key] == value
    assert type(error).__name__ in repr(error)


def test_invalid_argument_is_also_a_value_error() -> None:
    assert issubclass(errors.InvalidArgumentError, ValueError)


def test_py_typed_ships() -> None:
    from importlib.resources import files

    assert files("keycap").joinpath("py.typed").is_file()
