"""Metered operations: each one transaction, all-or-nothing, retried on transient conflicts.

The statements and why they are safe live in ``keycap.db.metering``; this
package strings them into units of work (``charges``, ``holds``, ``release``,
``validation``), turns a refusal into the error that says which limit refused
(``refusals``), builds results, and reports alerts after commit (``results``).
"""

from keycap.metering.charges import charge
from keycap.metering.holds import reserve, settle
from keycap.metering.release import hold_model, release, sweep
from keycap.metering.results import (
    AlertHandler,
    budget_status,
    rate_limit_status,
    usage_cap_error,
)
from keycap.metering.validation import validate

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
