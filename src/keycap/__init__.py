"""keycap: API keys that cannot do more than they were granted.

Start with :class:`APIKeyClient`; every error is a :class:`KeycapError`.
"""

from keycap.client import APIKeyClient
from keycap.errors import (
    AlreadyExistsError,
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailableError,
    DisabledKeyError,
    ExpiredKeyError,
    ForbiddenError,
    InsufficientScopeError,
    InvalidArgumentError,
    InvalidKeyError,
    KeycapError,
    KeyRejectedError,
    NotFoundError,
    RevokedKeyError,
)
from keycap.models import APIKey, IssuedKey, KeyStatus, Organization, Product, Project

__version__ = "0.1.0"

__all__ = [
    "APIKey",
    "APIKeyClient",
    "AlreadyExistsError",
    "ConfigurationError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "DisabledKeyError",
    "ExpiredKeyError",
    "ForbiddenError",
    "InsufficientScopeError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "IssuedKey",
    "KeyRejectedError",
    "KeyStatus",
    "KeycapError",
    "NotFoundError",
    "Organization",
    "Product",
    "Project",
    "RevokedKeyError",
]
