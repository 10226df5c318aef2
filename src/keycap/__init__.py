"""keycap: API keys that cannot do more than they were granted.

Start with :class:`APIKeyClient`; every error is a :class:`KeycapError`.
"""

from keycap._client import APIKeyClient
from keycap._errors import (
    AlreadyExistsError,
    BudgetExceededError,
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailableError,
    DisabledKeyError,
    ExpiredKeyError,
    ForbiddenError,
    HoldClosedError,
    InsufficientScopeError,
    InvalidArgumentError,
    InvalidKeyError,
    KeycapError,
    KeyRejectedError,
    MissingKeyError,
    NotFoundError,
    RateLimitedError,
    RevokedKeyError,
    UsageExhaustedError,
)
from keycap._models import (
    APIKey,
    BudgetAlert,
    BudgetStatus,
    Charge,
    Hold,
    IssuedKey,
    KeyStatus,
    Organization,
    Product,
    Project,
    RateLimitStatus,
    Settlement,
    UsageRow,
)
from keycap._rules.budgets import Budget
from keycap._rules.rate_limits import RateLimit

__version__ = "0.1.0"

__all__ = [
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
]
