"""Statements: every SQL keycap runs, one module per table, and the engine.

* ``engine``: engines, URLs, the two ways in (a transaction, or autocommit), and
  the one place driver errors become keycap errors.
* ``schema`` and ``types``: the tables, and the column types that make them
  behave alike on SQLite, PostgreSQL and MySQL/MariaDB.
* ``build``: what every statement shares (the row type, BIGINT binds, the cached
  UPDATE that reports the rows it changed).
* ``grant``: the SQL twins of the grant rule, and the one spelling of "which rate
  limits and budgets apply to a key".
* ``tenancy``, ``keys``, ``rate_limits``, ``budgets``, ``holds``, ``operations``
  (idempotency), ``ledger``: the statements of each table.
* ``rows``: rows to the public result models.

A statement takes a connection and never opens a transaction: the unit of work
that calls it (``keycap._ops``) does, so the transaction boundary is visible
where the statements are strung together.

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
  foreign-key checks, a planner choosing another scan); :func:`keycap._ops.units.retrying` runs
  the whole unit again, a bounded number of times, and so does a
  serialization failure or SQLite's busy error.
* A multi-row UPDATE (every rate limit, every budget) is all or nothing: each
  row's WHERE is its own limit, and when fewer rows change than there are
  limits or budgets, the whole transaction rolls back.
* Every debit re-checks in its WHERE that the key is not revoked, disabled or
  expired, so an expired key can never be charged or reserve.
* SELECTs only find ids and build error details; nothing is decided on what
  they read.
"""
