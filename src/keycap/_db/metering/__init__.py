"""Metering statements: rate windows, usage caps, budgets, holds, the ledger.

Why each consumption is safe under concurrency, on every database:

* Every consumption is one conditional UPDATE whose WHERE is the limit
  (``used + held + :cost <= limit + credit``, the sliding-window inequality,
  ``use_count < max_uses``). The database evaluates it against the row as it
  is at that instant, under the row lock the UPDATE takes (PostgreSQL,
  InnoDB) or the database write lock (SQLite), so two requests can never both
  see room for one. No counter is ever computed in Python and written back.
* A period rollover is folded into the same statement:
  ``used = CASE WHEN period_start < :current THEN 0 ELSE used END + :cost``.
  A reset and a charge cannot interleave, and ``period_start`` only moves
  forward, so a server with a lagging clock cannot reset a period twice.
* MySQL/MariaDB evaluate SET assignments left to right, each seeing the
  columns already assigned; PostgreSQL and SQLite see the old row in every
  assignment. Every multi-column SET here is written with ``ordered_values``
  so that a column the later assignments read (``period_start``,
  ``window_start``) is assigned last: both rules then give the same result.
* A transaction touches rows in one fixed order: the key, then its rate
  limits, then its budgets (each set in one UPDATE, whose index scan visits
  the rows in index order). A deadlock can still be reported (gap locks,
  foreign-key checks, a planner choosing another scan); :func:`retrying` runs
  the whole unit again, a bounded number of times, and so does a
  serialization failure or SQLite's busy error.
* A multi-row UPDATE (every rate limit, every budget) is all or nothing: each
  row's WHERE is its own limit, and when fewer rows change than there are
  limits or budgets, the whole transaction rolls back.
* Every debit re-checks in its WHERE that the key is not revoked, disabled or
  expired, so an expired key can never be charged or reserve.
* SELECTs only find ids and build error details; nothing is decided on what
  they read.

The statements run on every metered call are built once per shape and cached
(``lru_cache``), like the read path's in ``keycap._db.queries``: building and
cache-keying a CASE-heavy UPDATE costs several times more than executing it.
Every per-call value (ids, amounts, times, the window arithmetic) is a bind
parameter named ``m_...``, filled in by the function that runs the statement.
"""

from keycap._db.metering.budgets import (
    applicable_budgets,
    budgets_by_id,
    debit,
    debit_all,
    grant_credit,
    new_budget_row,
    upsert_budget,
)
from keycap._db.metering.core import (
    KeyRef,
    Subject,
    delete_where,
    is_live,
    resolve_subject,
    retrying,
    scope_of,
    select_where,
)
from keycap._db.metering.holds import (
    claim_operation,
    close_hold,
    expired_hold_ids,
    get_hold,
    insert_hold,
    open_hold_ids,
    store_result,
    stored_result,
)
from keycap._db.metering.keys import lock_live_key, record_metered_use
from keycap._db.metering.ledger import insert_ledger, ledger_row, usage
from keycap._db.metering.ratelimits import (
    applicable_rate_limits,
    consume_rates,
    new_rate_limit_row,
    rate_units,
    upsert_rate_limit,
)

__all__ = [
    "KeyRef",
    "Subject",
    "applicable_budgets",
    "applicable_rate_limits",
    "budgets_by_id",
    "claim_operation",
    "close_hold",
    "consume_rates",
    "debit",
    "debit_all",
    "delete_where",
    "expired_hold_ids",
    "get_hold",
    "grant_credit",
    "insert_hold",
    "insert_ledger",
    "is_live",
    "ledger_row",
    "lock_live_key",
    "new_budget_row",
    "new_rate_limit_row",
    "open_hold_ids",
    "rate_units",
    "record_metered_use",
    "resolve_subject",
    "retrying",
    "scope_of",
    "select_where",
    "store_result",
    "stored_result",
    "upsert_budget",
    "upsert_rate_limit",
    "usage",
]
