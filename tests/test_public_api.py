import inspect
import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest

import keycap
from keycap import _errors as errors

PUBLIC = {
    "APIKey",
    "APIKeyClient",
    "AccessNotGrantedError",
    "AccessRequest",
    "AccessTerms",
    "AlertHandler",
    "AlreadyExistsError",
    "Amount",
    "Budget",
    "BudgetAlert",
    "BudgetExceededError",
    "BudgetStatus",
    "Charge",
    "Clock",
    "ConfigurationError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "DisabledKeyError",
    "ExpiredKeyError",
    "ForbiddenError",
    "Hold",
    "HoldClosedError",
    "IdempotencyConflictError",
    "InsufficientScopeError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "IssuedKey",
    "KeyEvent",
    "KeyRejectedError",
    "KeyStatus",
    "KeycapError",
    "LeasePolicy",
    "MissingKeyError",
    "NotFoundError",
    "PendingSettlement",
    "Organization",
    "Product",
    "Project",
    "RateLimit",
    "RateLimitStatus",
    "Remaining",
    "RateLimitedError",
    "RevokedKeyError",
    "RolledKeyError",
    "Settlement",
    "UNSET",
    "UsageExhaustedError",
    "UsageRow",
    "AnyOf",
    "AuditEntry",
    "Identity",
    "any_of",
}
#: Subpackages documented as public (docs/architecture.md): importing them makes them
#: attributes of ``keycap`` too. Every other module is private (a leading underscore).
PUBLIC_SUBPACKAGES = {"cli", "integrations", "migrations"}


def _public_attributes(*imports: str) -> set[str]:
    """The public attribute names of ``keycap`` in a fresh interpreter, after ``imports``."""
    code = (
        "import json, keycap\n"
        + "".join(f"import {name}\n" for name in imports)
        + "print(json.dumps([n for n in vars(keycap) if not n.startswith('_')]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out))


def test_all_is_exactly_what_we_mean() -> None:
    # Its order is ruff's (RUF022: constants, then classes and the rest), checked by
    # scripts/check; here, what it holds and that nothing is listed twice.
    assert len(keycap.__all__) == len(set(keycap.__all__))
    assert set(keycap.__all__) == PUBLIC


def test_the_public_attributes_of_keycap_are_exactly_all() -> None:
    assert _public_attributes() == set(keycap.__all__)


def test_only_the_documented_subpackages_add_attributes() -> None:
    imported = _public_attributes(
        "keycap.cli",
        "keycap.migrations",
        "keycap.integrations.fastapi",
        "keycap.integrations.starlette",
    )
    assert imported - set(keycap.__all__) == PUBLIC_SUBPACKAGES


def test_every_public_class_is_defined_in_keycap() -> None:
    for name in keycap.__all__:
        value = getattr(keycap, name)
        if inspect.isclass(value):
            assert value.__module__.startswith("keycap."), name


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
