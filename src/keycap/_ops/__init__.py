"""Metered operations: each one transaction, all-or-nothing, retried on transient conflicts.

The statements and why they are safe live in ``keycap._db.metering``; this
package strings them into units of work (``charges``, ``holds``, ``release``,
``validation``), turns a refusal into the error that says which limit refused
(``refusals``), builds results, and reports alerts after commit (``results``).
"""

from keycap._ops.charges import charge
from keycap._ops.holds import reserve, settle
from keycap._ops.release import hold_model, release, sweep
from keycap._ops.results import (
    AlertHandler,
    budget_status,
    rate_limit_status,
    usage_cap_error,
)
from keycap._ops.validation import validate

__all__ = [
    "AlertHandler",
    "budget_status",
    "charge",
    "hold_model",
    "rate_limit_status",
    "release",
    "reserve",
    "settle",
    "sweep",
    "usage_cap_error",
    "validate",
]
