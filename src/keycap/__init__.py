"""keycap: API keys that cannot do more than they were granted.

Start with :class:`APIKeyClient`; every error is a :class:`KeycapError`.
"""

from keycap._client import UNSET, APIKeyClient
from keycap._errors import (
    AccessNotGrantedError,
    AlreadyExistsError,
    BudgetExceededError,
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailableError,
    DisabledKeyError,
    ExpiredKeyError,
    ForbiddenError,
    HoldClosedError,
    IdempotencyConflictError,
    InsufficientScopeError,
    InvalidArgumentError,
    InvalidKeyError,
    KeycapError,
    KeyRejectedError,
    MissingKeyError,
    NotFoundError,
    RateLimitedError,
    RevokedKeyError,
    RolledKeyError,
    UsageExhaustedError,
)
from keycap._models import (
    AccessRequest,
    AccessTerms,
    APIKey,
    AuditEntry,
    BudgetAlert,
    BudgetStatus,
    Charge,
    Hold,
    Identity,
    IssuedKey,
    KeyEvent,
    KeyStatus,
    Organization,
    Product,
    Project,
    RateLimitStatus,
    Remaining,
    Settlement,
    UsageRow,
)
from keycap._ops.results import AlertHandler
from keycap._rules.budgets import Budget
from keycap._rules.leases import LeasePolicy
from keycap._rules.money import Amount
from keycap._rules.rate_limits import RateLimit
from keycap._rules.scopes import AnyOf, any_of
from keycap._rules.timeutil import Clock
from keycap._settlements import PendingSettlement

#: The one place the version is written; pyproject.toml reads it from here.
__version__ = "0.1.0"

__all__ = [
    "UNSET",
    "APIKey",
    "APIKeyClient",
    "AccessNotGrantedError",
    "AccessRequest",
    "AccessTerms",
    "AlertHandler",
    "AlreadyExistsError",
    "Amount",
    "AnyOf",
    "AuditEntry",
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
    "Identity",
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
    "Organization",
    "PendingSettlement",
    "Product",
    "Project",
    "RateLimit",
    "RateLimitStatus",
    "RateLimitedError",
    "Remaining",
    "RevokedKeyError",
    "RolledKeyError",
    "Settlement",
    "UsageExhaustedError",
    "UsageRow",
    "any_of",
]
