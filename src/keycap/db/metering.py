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
(``lru_cache``), like the read path's in ``keycap.db.queries``: building and
cache-keying a CASE-heavy UPDATE costs several times more than executing it.
Every per-call value (ids, amounts, times, the window arithmetic) is a bind
parameter named ``m_...``, filled in by the function that runs the statement.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    String,
    bindparam,
    case,
    cast,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap import budgets as budget_rules
from keycap import ids, periods, ratelimit
from keycap.db.engine import Conflict, Database
from keycap.db.queries import (
    KEY_COLUMNS,
    AnyRow,
    contains,
    grant_predicate,
    hot_binds,
    hot_params,
    key_is_live_now,
)
from keycap.db.schema import (
    budgets,
    holds,
    keys,
    ledger,
    operations,
    organizations,
    projects,
    rate_limits,
)
from keycap.errors import DatabaseError, NotFoundError
from keycap.policy import Requirement

T = TypeVar("T")
ATTEMPTS = 8

SCOPES = {ids.KEY: "key", ids.PROJECT: "project", ids.ORG: "organization"}


def scope_of(subject_id: str) -> str:
    return SCOPES[subject_id.split("_", 1)[0]]


# --- retries --------------------------------------------------------------------------


def is_transient(error: BaseException) -> bool:
    """A deadlock, serialization failure or busy database: the unit may simply be rerun."""
    cause = error.__cause__ if isinstance(error, DatabaseError) else error
    orig = getattr(cause, "orig", cause)
    if getattr(orig, "sqlstate", None) in ("40P01", "40001"):
        return True
    args = getattr(orig, "args", ())
    if args and args[0] in (1213, 1205):  # MySQL deadlock, lock wait timeout
        return True
    return "database is locked" in str(orig)


async def retrying(unit: Callable[[], Awaitable[T]]) -> T:
    """Run ``unit`` (one whole transaction) again after a transient conflict."""
    for attempt in range(ATTEMPTS):
        try:
            return await unit()
        except DatabaseError as error:
            if attempt == ATTEMPTS - 1 or not is_transient(error):
                raise
            await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))  # noqa: S311 - jitter
    raise AssertionError("unreachable")


def big(value: int) -> Any:
    """An integer bound as BIGINT. PostgreSQL types a bind by its context: in
    ``CASE ... THEN 0 ... END + :amount`` the literal 0 would make ``:amount`` an
    int32 and 6e10 micro-units would not fit. Every integer entering a metering
    statement goes through here."""
    return literal(value, BigInteger())


# --- the bind parameters of the cached statements -------------------------------------

_KEY_ID = bindparam("m_key_id", type_=keys.c.id.type)
_ORG_ID = bindparam("m_org_id", type_=keys.c.org_id.type)
_PROJECT_ID = bindparam("m_project_id", type_=keys.c.project_id.type)
_NOW = bindparam("m_now", type_=keys.c.last_used_at.type)
_BUDGET_ID = bindparam("m_budget_id", type_=budgets.c.id.type)
_HOLD_ID = bindparam("m_hold_id", type_=holds.c.id.type)


def _int(name: str) -> Any:
    """A per-call integer, bound as BIGINT (see :func:`big`)."""
    return bindparam(name, type_=BigInteger())


def _key_params(key: KeyRef) -> dict[str, Any]:
    return {"m_key_id": key.id, "m_org_id": key.org_id, "m_project_id": key.project_id}


def _applies_to_key(table: Any) -> ColumnElement[bool]:
    """The row belongs to the key, its project or its organization (the parameters
    of :func:`_key_params`; a key without a project binds NULL, which matches nothing)."""
    return table.c.subject_id.in_([_KEY_ID, _ORG_ID, _PROJECT_ID])  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Changing:
    """A cached single-row UPDATE in both forms :func:`_changed` may run: with
    ``RETURNING``, and plain followed by ``reread`` (a SELECT of the same columns)."""

    returning: Any
    plain: Any
    reread: Any


def _changing(stmt: Any, reread: Any) -> Changing:
    return Changing(stmt.returning(*reread.selected_columns), stmt, reread)


# --- subjects -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a limit or budget belongs to, with the ids its row carries."""

    subject_id: str
    org_id: str
    project_id: str | None
    key_id: str | None

    @property
    def columns(self) -> dict[str, Any]:
        return {
            "subject_id": self.subject_id,
            "org_id": self.org_id,
            "project_id": self.project_id,
            "key_id": self.key_id,
        }


async def resolve_subject(db: Database, subject_id: str) -> Subject:
    """Raises: NotFoundError."""
    kind = subject_id.split("_", 1)[0]
    async with db.autocommit() as conn:
        if kind == ids.KEY:
            row = (
                await conn.execute(
                    select(keys.c.org_id, keys.c.project_id).where(keys.c.id == subject_id)
                )
            ).first()
            if row is not None:
                return Subject(subject_id, row.org_id, row.project_id, subject_id)
        elif kind == ids.PROJECT:
            org = await conn.scalar(select(projects.c.org_id).where(projects.c.id == subject_id))
            if org is not None:
                return Subject(subject_id, org, subject_id, None)
        elif await conn.scalar(select(organizations.c.id).where(organizations.c.id == subject_id)):
            return Subject(subject_id, subject_id, None, None)
    raise NotFoundError(scope_of(subject_id), subject_id)


# --- administration -------------------------------------------------------------------


def new_rate_limit_row(
    subject: Subject, limit: ratelimit.RateLimit, now: datetime
) -> dict[str, Any]:
    """A rate limit's row as created (on its own, or with its key in create_key)."""
    return {
        "id": ids.new_id(ids.RATE_LIMIT),
        **subject.columns,
        "name": limit.key,
        "meter": limit.meter,
        "limit_units": limit.units,
        "window_ms": limit.window_ms,
        "window_start": 0,
        "current_units": 0,
        "previous_units": 0,
        "created_at": now,
    }


def new_budget_row(
    subject: Subject, spec: budget_rules.BudgetSpec, now: datetime
) -> dict[str, Any]:
    """A budget's row as created (on its own, or with its key in create_key)."""
    return {
        "id": ids.new_id(ids.BUDGET),
        **subject.columns,
        "meter": spec.meter,
        "period": spec.period.value,
        "anchor_day": spec.anchor_day,
        "limit_micros": spec.limit_micros,
        "credit_micros": 0,
        "used_micros": 0,
        "held_micros": 0,
        "period_start": periods.start(spec.period, now, spec.anchor_day),
        "thresholds": budget_rules.encode_thresholds(spec.thresholds),
        "created_at": now,
        "updated_at": now,
    }


async def upsert_rate_limit(
    db: Database, subject: Subject, limit: ratelimit.RateLimit, now: datetime
) -> AnyRow:
    """Create or change a limit. Changing the window starts counting afresh."""
    rl = rate_limits.c
    row = new_rate_limit_row(subject, limit, now)
    name, window_ms = row["name"], row["window_ms"]
    try:
        async with db.begin() as conn:
            await conn.execute(insert(rate_limits).values(**row))
    except Conflict:
        same = rl.window_ms == window_ms
        async with db.begin() as conn:
            await conn.execute(
                update(rate_limits)
                .where(rl.subject_id == subject.subject_id, rl.name == name)
                .ordered_values(  # window_ms last: the CASEs read the old one on MySQL too
                    (rl.window_start, case((same, rl.window_start), else_=0)),
                    (rl.current_units, case((same, rl.current_units), else_=0)),
                    (rl.previous_units, case((same, rl.previous_units), else_=0)),
                    (rl.meter, row["meter"]),
                    (rl.limit_units, row["limit_units"]),
                    (rl.window_ms, window_ms),
                )
            )
    async with db.autocommit() as conn:
        return (
            await conn.execute(
                select(rate_limits).where(rl.subject_id == subject.subject_id, rl.name == name)
            )
        ).one()


async def delete_where(db: Database, table: Any, *conditions: Any) -> int:
    async with db.begin() as conn:
        result = await conn.execute(table.delete().where(*conditions))
    return int(result.rowcount)


async def select_where(db: Database, table: Any, *conditions: Any) -> Sequence[AnyRow]:
    async with db.autocommit() as conn:
        return (await conn.execute(select(table).where(*conditions).order_by(table.c.id))).all()


async def upsert_budget(
    db: Database, subject: Subject, spec: budget_rules.BudgetSpec, now: datetime
) -> AnyRow:
    """Create or change a budget (one per subject, meter and period). Changing the
    limit keeps what was used and held."""
    b = budgets.c
    row = new_budget_row(subject, spec, now)
    where = (b.subject_id == subject.subject_id, b.meter == spec.meter, b.period == spec.period)
    try:
        async with db.begin() as conn:
            await conn.execute(insert(budgets).values(**row))
    except Conflict:
        async with db.begin() as conn:
            await conn.execute(
                update(budgets)
                .where(*where)
                .values(
                    limit_micros=spec.limit_micros,
                    anchor_day=spec.anchor_day,
                    thresholds=row["thresholds"],
                    updated_at=now,
                )
            )
    async with db.autocommit() as conn:
        return (await conn.execute(select(budgets).where(*where))).one()


def _rollover(start: Any) -> tuple[Any, Any, Any]:
    """(used, credit, period_start) as they are once the period starting at ``start`` applies."""
    b = budgets.c
    new_period = b.period_start < start
    return (
        case((new_period, big(0)), else_=b.used_micros),
        case((new_period, big(0)), else_=b.credit_micros),
        case((new_period, start), else_=b.period_start),
    )


def _current_start(row: AnyRow, now: datetime) -> datetime:
    return periods.start(periods.Period(row.period), now, row.anchor_day)


async def grant_credit(db: Database, budget_id: str, micros: int, now: datetime) -> AnyRow:
    """Top up a budget for its current period, and record it in the ledger."""
    b = budgets.c

    async def unit() -> AnyRow:
        async with db.begin() as conn:
            row = (await conn.execute(select(budgets).where(b.id == budget_id))).first()
            if row is None:
                raise NotFoundError("budget", budget_id)
            start = _current_start(row, now)
            used, credit, period_start = _rollover(start)
            await conn.execute(
                update(budgets)
                .where(b.id == budget_id)
                .ordered_values(
                    (b.used_micros, used),
                    (b.credit_micros, credit + big(micros)),
                    (b.period_start, period_start),
                    (b.updated_at, now),
                )
            )
            after = (await conn.execute(select(budgets).where(b.id == budget_id))).one()
            await conn.execute(
                insert(ledger).values(
                    ledger_row(after, "topup", micros, 0, 0, True, now, key_id=None)
                )
            )
            return after

    return await retrying(unit)


# --- ledger ---------------------------------------------------------------------------


def ledger_row(
    budget: AnyRow | None,
    kind: str,
    amount: int,
    delta_used: int,
    delta_held: int,
    primary: bool,
    now: datetime,
    *,
    key_id: str | None,
    meter: str | None = None,
    org_id: str | None = None,
    project_id: str | None = None,
    hold_id: str | None = None,
    idempotency_key: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "org_id": budget.org_id if budget is not None else org_id,
        "project_id": project_id,
        "key_id": key_id,
        "budget_id": budget.id if budget is not None else None,
        "hold_id": hold_id,
        "meter": budget.meter if budget is not None else meter,
        "kind": kind,
        "amount_micros": amount,
        "delta_used": delta_used,
        "delta_held": delta_held,
        "period_start": budget.period_start if budget is not None else None,
        "is_primary": primary,
        "idempotency_key": idempotency_key,
        "metadata": dict(metadata) if (metadata and primary) else None,
        "created_at": now,
    }


# --- the key inside a metered transaction ---------------------------------------------


def key_is_live(key_id: Any, now: Any) -> ColumnElement[bool]:
    """The key exists and is not revoked, disabled or expired (re-checked in every debit)."""
    return exists().where(keys.c.id == key_id, *key_is_live_now(now))


async def is_live(conn: AsyncConnection, key_id: str | None, now: datetime) -> bool:
    if key_id is None:
        return False
    return bool(await conn.scalar(_IS_LIVE, {"m_key_id": key_id, "m_now": now}))


_IS_LIVE = select(key_is_live(_KEY_ID, _NOW))


@dataclass(frozen=True, slots=True)
class KeyRef:
    id: str
    org_id: str
    project_id: str | None


async def lock_live_key(conn: AsyncConnection, key_id: str, now: datetime) -> KeyRef | None:
    """Take the key's row lock for this transaction, if the key is live.

    A charge is a use of the key, so it sets ``last_used_at``; the UPDATE both
    checks the key's state and makes a concurrent revoke wait for this
    transaction, which is also what starts SQLite's write transaction before
    anything is read.
    """
    row = await _changed(conn, _lock_key(), {"m_key_id": key_id, "m_now": now})
    return None if row is None else KeyRef(key_id, row.org_id, row.project_id)


@lru_cache(maxsize=1)
def _lock_key() -> Changing:
    k = keys.c
    stmt = update(keys).where(k.id == _KEY_ID, *key_is_live_now(_NOW)).values(last_used_at=_NOW)
    return _changing(stmt, select(k.org_id, k.project_id).where(k.id == _KEY_ID))


async def _changed(
    conn: AsyncConnection, stmt: Changing, params: Mapping[str, Any]
) -> AnyRow | None:
    """Run a single-row UPDATE; the row after it, or None if it changed nothing.

    PostgreSQL and SQLite return it from the UPDATE itself (``RETURNING``);
    MySQL/MariaDB cannot, so the SELECT runs after it, with the same parameters.
    The row is locked by this transaction until commit, so both read what was
    written.
    """
    if conn.dialect.update_returning:
        return (await conn.execute(stmt.returning, params)).first()
    if (await conn.execute(stmt.plain, params)).rowcount != 1:
        return None
    return (await conn.execute(stmt.reread, params)).one()


async def record_metered_use(
    conn: AsyncConnection,
    key_id: str,
    digests: Mapping[str, str],
    req: Requirement,
    now: datetime,
    dialect: str,
    *,
    track: bool,
) -> AnyRow | None:
    """In a metered validation: the whole grant rule and the usage cap
    (``use_count < max_uses``) in the WHERE, with the use counted unless tracking
    is off and the key has no cap. Returns the key's row after it (with
    ``pepper_id``), or None: refused, nothing written."""
    stmt = _metered_use(req, tuple(digests), dialect, track)
    return await _changed(conn, stmt, hot_params(key_id, now, digests))


@lru_cache(maxsize=512)
def _metered_use(req: Requirement, peppers: tuple[str, ...], dialect: str, track: bool) -> Changing:
    k = keys.c
    key_id, digests, now = hot_binds(peppers)
    capped = k.max_uses.is_not(None)
    if track:
        values: Any = ((k.use_count, k.use_count + 1), (k.last_used_at, now))
    else:
        # A capped key is counted all the same. An uncapped one is written to
        # itself: the UPDATE is what takes the key's lock and re-decides the rule,
        # but it records nothing. (use_count first: last_used_at's CASE reads
        # only max_uses, so MySQL's left-to-right SET gives the same result.)
        values = (
            (k.use_count, case((capped, k.use_count + 1), else_=k.use_count)),
            (k.last_used_at, case((capped, now), else_=k.last_used_at)),
        )
    stmt = (
        update(keys)
        .where(
            k.id == key_id,
            grant_predicate(digests, req, now, dialect),
            or_(k.max_uses.is_(None), k.use_count < k.max_uses),
        )
        .ordered_values(*values)
    )
    returned = (*KEY_COLUMNS, k.pepper_id, rate_limit_count(key_id))
    return _changing(stmt, select(*returned).where(k.id == key_id))


# --- rate limits ----------------------------------------------------------------------


async def applicable_rate_limits(db: Database, key: KeyRef) -> Sequence[AnyRow]:
    """The rate limits that apply to the key, in id order (to explain a refusal)."""
    async with db.autocommit() as conn:
        return (await conn.execute(_rate_limits_of(), _key_params(key))).all()


@lru_cache(maxsize=1)
def _rate_limits_of() -> Any:
    return select(rate_limits).where(_applies_to_key(rate_limits)).order_by(rate_limits.c.id)


def rate_units(row: AnyRow, amounts: Mapping[str, int]) -> int:
    """What one call consumes of this limit: one call, or the call's cost on its meter."""
    return 1 if row.meter is None else amounts.get(row.meter, 0)


async def consume_rates(
    conn: AsyncConnection, key: KeyRef, amounts: Mapping[str, int], now_ms: int, count: int
) -> list[AnyRow] | None:
    """Consume every rate limit that applies to the key (its own, its project's,
    its organization's) in one UPDATE: the sliding-window inequality of
    ``keycap.ratelimit.admits``, decided per row in its WHERE. Returns the rows
    after it, in id order; or None when fewer than ``count`` (the number of
    limits counted by the key's UPDATE, earlier in this transaction) were
    admitted: refused, and the caller rolls back.

    A call consumes one unit of a plain limit, and its cost on the meter of a
    metered one (none, if it has no cost on that meter: such a row always
    passes). The window arithmetic of ``keycap.ratelimit.view`` is done in SQL
    from the row's own ``window_ms`` and the client's clock, in integers, so
    it gives exactly the numbers the Python side computes; which counters the
    weight applies to depends on the stored ``window_start``, chosen by the
    CASEs, so the decision uses the row as it is under the lock.
    """
    if not count:
        return []
    params: dict[str, Any] = {**_key_params(key), "m_now_ms": now_ms}
    for i, (meter, amount) in enumerate(amounts.items()):
        params[f"m_rate_meter_{i}"] = meter
        params[f"m_rate_units_{i}"] = amount
    return await _changed_rows(conn, _consume_rates(len(amounts)), params, count)


@lru_cache(maxsize=16)
def _consume_rates(meter_count: int) -> Changing:
    c = rate_limits.c
    now_ms, win, r = _int("m_now_ms"), c.window_ms, big(ratelimit.RESOLUTION)
    into = now_ms % win  # how far into its current window the clock is
    at = now_ms - into
    weight = ((win - into) * r + win - big(1)) // win  # ceil, as ratelimit.view
    meters = [bindparam(f"m_rate_meter_{i}", type_=c.meter.type) for i in range(meter_count)]
    cost = case(
        (c.meter.is_(None), big(1)),
        *((c.meter == meters[i], _int(f"m_rate_units_{i}")) for i in range(meter_count)),
        else_=big(0),
    )
    ahead, same = c.window_start > at, c.window_start == at
    previous = c.window_start == at - win
    weighted_previous = case(
        (ahead, c.previous_units * r),
        (same, c.previous_units * weight),
        (previous, c.current_units * weight),
        else_=big(0),
    )
    current = case((c.window_start >= at, c.current_units), else_=big(0))
    fits = weighted_previous + (current + cost) * r <= c.limit_units * r
    stmt = (
        update(rate_limits)
        .where(_applies_to_key(rate_limits), or_(cost == big(0), fits))
        .ordered_values(  # window_start last: the CASEs above read the stored one
            (
                c.previous_units,
                case(
                    (c.window_start >= at, c.previous_units),
                    (previous, c.current_units),
                    else_=big(0),
                ),
            ),
            (c.current_units, current + cost),
            (c.window_start, case((ahead, c.window_start), else_=at)),
        )
    )
    reread = select(rate_limits).where(_applies_to_key(rate_limits)).order_by(c.id)
    return _changing(stmt, reread)


def rate_limit_count(key_id: Any) -> Any:
    """How many rate limits apply to the key ``key_id`` (a bind parameter): a column
    for the RETURNING of the key's UPDATE, so :func:`consume_rates` can tell a
    refusal (fewer rows changed) from a key with fewer limits.

    SQLite renders RETURNING columns unqualified, even inside a subquery, so each
    innermost SELECT here reads one table only and nothing is ambiguous."""
    counted = keys.alias("counted_key")

    def of_key(column: Any) -> Any:
        return select(column).where(counted.c.id == key_id).scalar_subquery()

    subjects = [key_id, of_key(counted.c.org_id), of_key(counted.c.project_id)]
    return (
        select(func.count())
        .select_from(rate_limits)
        .where(rate_limits.c.subject_id.in_(subjects))
        .scalar_subquery()
        .label("rate_limit_count")
    )


async def _changed_rows(
    conn: AsyncConnection, stmt: Changing, params: Mapping[str, Any], count: int
) -> list[AnyRow] | None:
    """Run a multi-row UPDATE that must change exactly ``count`` rows; the rows after
    it in id order, or None when it changed fewer (one refused: the caller rolls
    back). Without RETURNING (MySQL), the rows are read after it, under the row
    locks it took."""
    if conn.dialect.update_returning:
        changed = sorted((await conn.execute(stmt.returning, params)).all(), key=_by_id)
    elif (await conn.execute(stmt.plain, params)).rowcount == count:
        changed = list((await conn.execute(stmt.reread, params)).all())
    else:
        return None
    return changed if len(changed) == count else None


def _by_id(row: AnyRow) -> str:
    return str(row.id)


# --- budgets --------------------------------------------------------------------------


async def applicable_budgets(
    conn: AsyncConnection, key: KeyRef, meters: Sequence[str]
) -> Sequence[AnyRow]:
    """The budgets of ``meters`` that apply to the key (its own, its project's, its
    organization's), in id order."""
    params = {**_key_params(key), "m_meters": list(meters)}
    return (await conn.execute(_budgets_of(), params)).all()


@lru_cache(maxsize=1)
def _budgets_of() -> Any:
    meters = budgets.c.meter.in_(bindparam("m_meters", expanding=True))
    return select(budgets).where(_applies_to_key(budgets), meters).order_by(budgets.c.id)


async def debit_all(
    conn: AsyncConnection,
    rows: Sequence[AnyRow],
    amounts: Mapping[str, int],
    now: datetime,
    *,
    key_id: str,
    hold: bool = False,
) -> list[AnyRow] | None:
    """Charge (or, with ``hold``, hold) ``amounts[meter]`` on every budget in ``rows``,
    in one UPDATE, each after its own period rollover; the rows after it, in id order.

    Each row's WHERE is its own limit (``used + held + amount <= limit + credit``)
    and the key's liveness, so a budget without room is simply not updated:
    fewer rows changed than given means one refused, and None is returned (the
    caller rolls back, so nothing is written). The period start and amount of
    each row are chosen by a CASE on its id.
    """
    if not rows:
        return []
    params: dict[str, Any] = {"m_key_id": key_id, "m_now": now}
    for i, row in enumerate(rows):
        params[f"m_budget_{i}"] = row.id
        params[f"m_start_{i}"] = _current_start(row, now)
        params[f"m_amount_{i}"] = amounts[row.meter]
    return await _changed_rows(conn, _debit_all(len(rows), hold), params, len(rows))


@lru_cache(maxsize=32)
def _debit_all(count: int, hold: bool) -> Changing:
    b = budgets.c
    ids_ = [bindparam(f"m_budget_{i}", type_=b.id.type) for i in range(count)]
    at = b.period_start.type
    start = case(
        *((b.id == ids_[i], bindparam(f"m_start_{i}", type_=at)) for i in range(count)),
        else_=b.period_start,
    )
    amount = case(*((b.id == ids_[i], _int(f"m_amount_{i}")) for i in range(count)), else_=big(0))
    eff_used, eff_credit, period_start = _rollover(start)
    stmt = (
        update(budgets)
        .where(
            b.id.in_(ids_),
            eff_used + b.held_micros + amount <= b.limit_micros + eff_credit,
            key_is_live(_KEY_ID, _NOW),
        )
        .ordered_values(  # period_start last: the CASEs read the stored one
            (b.used_micros, eff_used if hold else eff_used + amount),
            (b.held_micros, b.held_micros + amount if hold else b.held_micros),
            (b.credit_micros, eff_credit),
            (b.period_start, period_start),
        )
    )
    return _changing(stmt, select(budgets).where(b.id.in_(ids_)).order_by(b.id))


async def debit(
    conn: AsyncConnection,
    row: AnyRow,
    *,
    used: int,
    held: int,
    now: datetime,
    key_id: str | None,
    must_fit: bool = True,
) -> AnyRow | None:
    """Add ``used`` to the budget's use and ``held`` to its holds (either may be
    negative: a release), after rolling its period over if it has passed.

    With ``must_fit``, only if ``used + held + both <= limit + credit`` and the
    key is live; returns the row after the change, or None (nothing written).
    """
    params = {
        "m_budget_id": row.id,
        "m_start": _current_start(row, now),
        "m_used": used,
        "m_held": held,
        "m_both": used + held,
        "m_key_id": key_id,
        "m_now": now,
    }
    return await _changed(conn, _debit(must_fit, must_fit and key_id is not None), params)


@lru_cache(maxsize=4)
def _debit(must_fit: bool, key_live: bool) -> Changing:
    b = budgets.c
    start = bindparam("m_start", type_=b.period_start.type)
    eff_used, eff_credit, period_start = _rollover(start)
    stmt = (
        update(budgets)
        .where(b.id == _BUDGET_ID)
        .ordered_values(  # period_start last: the CASEs read the stored one
            (b.used_micros, eff_used + _int("m_used")),
            (b.held_micros, b.held_micros + _int("m_held")),
            (b.credit_micros, eff_credit),
            (b.period_start, period_start),
        )
    )
    if must_fit:
        both = _int("m_both")
        stmt = stmt.where(eff_used + b.held_micros + both <= b.limit_micros + eff_credit)
    if key_live:
        stmt = stmt.where(key_is_live(_KEY_ID, _NOW))
    return _changing(stmt, select(budgets).where(b.id == _BUDGET_ID))


async def budgets_by_id(conn: AsyncConnection, budget_ids: Sequence[str]) -> Sequence[AnyRow]:
    if not budget_ids:
        return []
    return (await conn.execute(_BUDGETS_BY_ID, {"m_ids": list(budget_ids)})).all()


_BUDGETS_BY_ID = (
    select(budgets)
    .where(budgets.c.id.in_(bindparam("m_ids", expanding=True)))
    .order_by(budgets.c.id)
)


# --- holds ----------------------------------------------------------------------------


async def insert_hold(conn: AsyncConnection, values: Mapping[str, Any]) -> None:
    await conn.execute(_INSERT_HOLD, dict(values))


_INSERT_HOLD = insert(holds)


async def close_hold(
    conn: AsyncConnection, hold_id: str, status: str, now: datetime, **values: Any
) -> bool:
    """Move an open hold to ``status``; only one caller can (the WHERE on status).
    The columns set are the keys of the parameters: status, closed_at, ``values``."""
    params = {"m_hold_id": hold_id, "status": status, "closed_at": now, **values}
    result = await conn.execute(_CLOSE_HOLD, params)
    return bool(result.rowcount == 1)


_CLOSE_HOLD = update(holds).where(holds.c.id == _HOLD_ID, holds.c.status == "open")


async def get_hold(db: Database, hold_id: str) -> AnyRow | None:
    async with db.autocommit() as conn:
        return (await conn.execute(_GET_HOLD, {"m_hold_id": hold_id})).first()


_GET_HOLD = select(holds).where(holds.c.id == _HOLD_ID)


async def expired_hold_ids(
    db: Database, now: datetime, *, budget_id: str | None = None, limit: int = 1000
) -> list[str]:
    h = holds.c
    stmt = select(h.id).where(h.status == "open", h.expires_at <= now).order_by(h.id).limit(limit)
    if budget_id is not None:
        stmt = stmt.where(contains(h.budget_ids, f" {budget_id} ", db.dialect))
    async with db.autocommit() as conn:
        return list((await conn.execute(stmt)).scalars())


async def open_hold_ids(db: Database, column: str, value: str) -> list[str]:
    """Open holds of the keys whose ``column`` (id, project_id, product_id) is ``value``."""
    h = holds.c
    stmt = (
        select(h.id)
        .join(keys, keys.c.id == h.key_id)
        .where(keys.c[column] == value, h.status == "open")
        .order_by(h.id)
    )
    async with db.autocommit() as conn:
        return list((await conn.execute(stmt)).scalars())


# --- idempotency ----------------------------------------------------------------------


async def claim_operation(
    conn: AsyncConnection,
    *,
    org_id: str,
    scope: str,
    kind: str,
    idempotency_key: str,
    now: datetime,
) -> str:
    """Insert the operation's row first thing in its transaction. A duplicate waits on
    the unique index until the first commits or rolls back, then fails (Conflict) or
    goes ahead: never both."""
    op_id = ids.new_id("op")
    values = {
        "id": op_id,
        "org_id": org_id,
        "scope": scope,
        "kind": kind,
        "idempotency_key": idempotency_key,
        "result": None,
        "created_at": now,
    }
    await conn.execute(_INSERT_OPERATION, values)
    return op_id


_INSERT_OPERATION = insert(operations)


async def store_result(conn: AsyncConnection, op_id: str, result: dict[str, Any]) -> None:
    await conn.execute(_STORE_RESULT, {"m_op_id": op_id, "result": result})


_STORE_RESULT = update(operations).where(
    operations.c.id == bindparam("m_op_id", type_=operations.c.id.type)
)


async def stored_result(
    db: Database, *, scope: str, kind: str, idempotency_key: str
) -> dict[str, Any] | None:
    params = {"m_scope": scope, "m_kind": kind, "m_idempotency_key": idempotency_key}
    async with db.autocommit() as conn:
        row = (await conn.execute(_STORED_RESULT, params)).first()
    return None if row is None else row.result


_STORED_RESULT = select(operations.c.result).where(
    operations.c.scope == bindparam("m_scope", type_=operations.c.scope.type),
    operations.c.kind == bindparam("m_kind", type_=operations.c.kind.type),
    operations.c.idempotency_key
    == bindparam("m_idempotency_key", type_=operations.c.idempotency_key.type),
)


async def insert_ledger(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(_INSERT_LEDGER, rows)


_INSERT_LEDGER = insert(ledger)


# --- reporting ------------------------------------------------------------------------


async def usage(
    db: Database,
    *,
    key_id: str | None,
    project_id: str | None,
    org_id: str | None,
    since: datetime,
    until: datetime,
    monthly: bool,
) -> Sequence[AnyRow]:
    """Totals of what was charged, per day or month and meter, from primary ledger rows."""
    lg = ledger.c
    width = 7 if monthly else 10
    if db.dialect == "postgresql":
        bucket: Any = func.to_char(
            func.timezone("UTC", lg.created_at), "YYYY-MM" if monthly else "YYYY-MM-DD"
        )
    else:  # naive UTC stored as text (SQLite) or DATETIME (MySQL): the first characters
        bucket = func.substr(cast(lg.created_at, String(32)), 1, width)
    bucket = bucket.label("bucket")
    stmt = (
        select(
            bucket,
            lg.meter,
            func.sum(lg.amount_micros).label("micros"),
            func.count().label("charges"),
        )
        .where(
            lg.is_primary.is_(True),
            lg.kind.in_(("charge", "settle")),
            lg.created_at >= since,
            lg.created_at < until,
        )
        .group_by(bucket, lg.meter)
        .order_by(bucket, lg.meter)
    )
    for column, value in ((lg.key_id, key_id), (lg.project_id, project_id), (lg.org_id, org_id)):
        if value is not None:
            stmt = stmt.where(column == value)
    async with db.autocommit() as conn:
        return (await conn.execute(stmt)).all()
