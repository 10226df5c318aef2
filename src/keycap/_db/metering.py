"""PostgreSQL: a metered validation, a charge or a reserve as one statement, run
in autocommit (one round trip); closing a hold likewise (:func:`closing_statement`).

The statement is a chain of common table expressions:

1. ``hot_key``: the key's row, locked ``FOR NO KEY UPDATE``, if live (a
   validation: if the whole grant rule and the usage cap hold);
2. ``hot_limits`` (a validation): every rate limit that applies to the key,
   locked in id order after the key (each joins the key's row); ``hot_rates``:
   each one's sliding-window step, from the locked values;
3. ``hot_budgets``: every budget of the call's meters that applies to the key,
   locked in id order (a validation: only if the rate limits admit the call,
   which also makes them wait for the rate limits' locks); ``hot_room``: each
   one's rollover, amount, and whether it fits;
4. ``hot_ok``: the decision: the key, every limit and every budget say yes;
5. the writes, each only if ``hot_ok``: the key's use, the rate limits, the
   budgets (``used``, or ``held`` for a reserve), the hold's row, and the
   ledger's entries (``keycap._rules.movements.charges`` and ``holds`` as SQL);
6. ``hot_refused``: the first budget that did not fit, as locked: a refusal
   names it without reading it again.

The lock pass is what makes one statement exact. A statement keeps the
snapshot it started with, and waiting for a row lock does not refresh it; a
row read ``FOR NO KEY UPDATE`` is read again at its newest committed version
once the lock is granted. Without it, a call that waited on the key for
another to commit would decide on the rate limits and budgets as they were
before that call, and spend them again (``tests/test_one_statement.py`` keeps
that version as a negative control and shows the tests catch it).

The lock order, key, then rate limits, then budgets, each in id order, is the
one the transactions of ``keycap._ops`` take, so mixed traffic on the same rows
cannot deadlock on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    DateTime,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    exists,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by
from sqlalchemy.sql.expression import Grouping

from keycap._db import operations
from keycap._db.budgets import rollover
from keycap._db.build import (
    HOLD_ID,
    HOT_CACHE,
    KEY_ID,
    NOW,
    AnyRow,
    Cost,
    Execute,
    KeyRef,
    big,
    grant_params,
    hot_binds,
    int_param,
)
from keycap._db.grant import applies_to_row, grant_predicate, key_is_live_now
from keycap._db.holds import has_expired_holds
from keycap._db.hot import HotRow
from keycap._db.keys import KEY_COLUMNS, metered_use, usage_cap_open
from keycap._db.ledger import ENTRY_COLUMNS
from keycap._db.rate_limits import call_cost, window_step
from keycap._db.schema import ANCESTORS, budgets, holds, keys, ledger, rate_limits
from keycap._db.schema import operations as operations_table
from keycap._db.types import JSONText, UTCDateTime
from keycap._rules import ips, periods
from keycap._rules.policy import Requirement


def charge_params(
    key_id: str,
    amounts: Mapping[str, int],
    metadata: Mapping[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    """The values of :func:`charge_statement`'s bind parameters."""
    params: dict[str, Any] = {
        "m_key_id": key_id,
        "m_metadata": dict(metadata) if metadata else None,
        **_clock_params(now),
    }
    for i, (meter, amount) in enumerate(amounts.items()):
        params[f"m_meter_{i}"] = meter
        params[f"m_amount_{i}"] = amount
    return params


async def run(execute: Execute, stmt: Any, params: Mapping[str, Any]) -> Sequence[AnyRow]:
    """A charge's or reserve's statement: one row per budget debited (its row after,
    in id order) or a single row without budget columns; each row has ``ok``
    (done) and the key's ``key_org_id`` and ``key_project_id`` (NULL: the key
    was not live)."""
    rows = await execute(stmt, params)
    return sorted(rows, key=lambda row: row.id or "")


def found(rows: Sequence[AnyRow]) -> operations.Prior | None:
    """What an idempotent call's statement found instead of running (its
    ``op_...`` columns); None: it ran, or is not idempotent."""
    first = rows[0] if rows else None
    if first is None or not first._mapping.get("op_prior"):
        return None
    return operations.Prior(first.op_result, first.op_request_hash)


def _replay_columns(prior: Any) -> list[Any]:
    """The ``op_...`` columns :func:`found` reads, from the ``prior`` CTE."""
    return [
        exists(select(prior.c.result)).label("op_prior"),
        select(prior.c.result).scalar_subquery().label("op_result"),
        select(prior.c.request_hash).scalar_subquery().label("op_request_hash"),
    ]


#: How old a key's ``last_used_at`` must be for a one-statement charge or reserve
#: to move it. Each move is a new version of the key's row, written while its
#: lock is held: under 64 concurrent charges of one key, writing it on every
#: charge cost 15-25% of the throughput (docs/performance.md).
LAST_USED_STEP = timedelta(seconds=1)


def _clock_params(now: datetime) -> dict[str, Any]:
    """``m_now`` and every period start a budget can have now (:func:`_current_start`)."""
    day, week, months = period_starts(now.astimezone(UTC).date())
    return {
        "m_now": now,
        "m_used_before": now - LAST_USED_STEP,
        "m_day": day,
        "m_week": week,
        "m_months": months,
    }


@lru_cache(maxsize=HOT_CACHE)
def period_starts(today: date) -> tuple[datetime, datetime, list[datetime]]:
    """The start of today's day and week, and of the month for each anchor day 1-31
    (index ``anchor - 1``): every period start a budget can have today."""
    now = datetime(today.year, today.month, today.day, tzinfo=UTC)
    months = [periods.start(periods.Period.MONTH, now, anchor) for anchor in range(1, 32)]
    return (
        periods.start(periods.Period.DAY, now),
        periods.start(periods.Period.WEEK, now),
        months,
    )


def _current_start() -> Any:
    """The start of each budget's current period, from the binds of :func:`charge_params`:
    ``keycap._rules.periods.start`` for the row's period and anchor day."""
    b = budgets.c
    months = bindparam("m_months", type_=ARRAY(DateTime(timezone=True)))
    return case(
        (b.period == "lifetime", literal(periods.EPOCH, UTCDateTime())),
        (b.period == "day", bindparam("m_day", type_=UTCDateTime())),
        (b.period == "week", bindparam("m_week", type_=UTCDateTime())),
        else_=Grouping(months)[func.coalesce(b.anchor_day, 1)],
    )


@lru_cache(maxsize=64)
def charge_statement(meter_count: int, lock_pass: bool = True, idempotent: bool = False) -> Any:
    """The charge of ``meter_count`` meters as one statement (``idempotent``: see
    :func:`_spend`). ``lock_pass=False`` leaves the budgets unlocked until their
    UPDATE: the over-spending version, kept for the tests' negative control only."""
    return _spend(meter_count, hold=False, lock_pass=lock_pass, idempotent=idempotent)


@lru_cache(maxsize=2)
def reserve_statement(idempotent: bool = False) -> Any:
    """A hold of one meter's amount as one statement: the charge's lock pass and
    decision, the budgets' ``held`` raised, the hold's row, its ledger entries."""
    return _spend(1, hold=True, lock_pass=True, idempotent=idempotent)


def reserve_params(
    key_id: str,
    hold_id: str,
    meter: str,
    amount: int,
    now: datetime,
    expires_at: datetime,
    on_expiry: str | None = None,
) -> dict[str, Any]:
    """The values of :func:`reserve_statement`'s bind parameters."""
    params = charge_params(key_id, {meter: amount}, None, now)
    params["m_hold_id"] = hold_id
    params["m_expires_at"] = expires_at
    params["m_on_expiry"] = on_expiry
    return params


def _spend(meter_count: int, *, hold: bool, lock_pass: bool, idempotent: bool = False) -> Any:
    """A charge or a reserve. ``idempotent``: unless the call's idempotency key has
    a committed operation (then nothing is locked or written, and its ``op_...``
    columns are returned, to replay it), the operation's row is written with the
    call, its result as ``keycap._db.operations`` stores a statement's. A
    duplicate committed meanwhile fails the statement on the unique index, and
    the caller replays it (``Conflict``)."""
    k = keys.c
    cost = Cost(meter_count)
    key_q = select(
        k.id, k.org_id, k.project_id, k.identity_id, *(k[name] for name in ANCESTORS)
    ).where(k.id == KEY_ID, *key_is_live_now(NOW))
    prior = operations.prior(KEY_ID).cte("hot_prior") if idempotent else None
    if prior is not None:
        key_q = key_q.where(~exists(select(prior.c.result)))
    key = key_q.with_for_update(key_share=True, of=keys).cte("hot_key")
    room = _budget_pass(key, cost, lock_pass)

    ok = and_(exists(select(key.c.id)), ~exists(select(room.c.id).where(~room.c.fits)))
    decision = select(ok.label("ok")).cte("hot_ok")
    decided = select(decision.c.ok).scalar_subquery()

    debited = _debit(room, decided, hold=hold)
    # A charge is a use of the key: last_used_at moves, unless it is under
    # LAST_USED_STEP old (a key charged by many callers at once then gets no new
    # row version per charge; see LAST_USED_STEP).
    stale = or_(
        k.last_used_at.is_(None), k.last_used_at <= bindparam("m_used_before", type_=UTCDateTime())
    )
    used = (
        update(keys)
        .where(k.id == KEY_ID, decided, stale)
        .values(last_used_at=NOW)
        .returning(k.id)
        .cte("hot_used")
    )
    idempotent = prior is not None
    writes = [used, _ledger(key, room, debited, decided, cost, hold=hold, idempotent=idempotent)]
    if hold:
        writes.append(_open_hold(key, room, decided, cost))
    replay: list[Any] = []
    if prior is not None:
        writes.append(_claim(key.c.org_id, KEY_ID, debited, decided=decided))
        replay = _replay_columns(prior)
    refused, refused_columns = _refused(room)
    return (
        select(
            decision.c.ok,
            key.c.org_id.label("key_org_id"),
            key.c.project_id.label("key_project_id"),
            key.c.identity_id.label("key_identity_id"),
            *(key.c[name].label(f"key_{name}") for name in ANCESTORS),
            *(debited.c[c.name] for c in budgets.c),
            *refused_columns,
            *replay,
        )
        .select_from(
            decision.outerjoin(key, true()).outerjoin(debited, true()).outerjoin(refused, true())
        )
        .add_cte(*writes)
    )


def _claim(org_id: Any, scope: Any, after: Any, hold: Any = None, decided: Any = None) -> Any:
    """The call's operation row (only if ``decided``, when given), its result as
    ``keycap._db.operations`` stores a statement's: the head, the rows of
    ``after`` (the budgets after the call, a CTE) and, closing a hold, the row
    of ``hold`` (a CTE) after it."""
    b = after.c
    rows = func.json_agg(
        aggregate_order_by(func.json_build_object(*operations.fields(budgets, b)), b.id)
    )
    text = (
        operations.OP_HEAD
        + select(func.coalesce(cast(rows, Text), literal("[]"))).scalar_subquery()
    )
    if hold is not None:
        closed = func.json_build_object(*operations.fields(holds, hold.c))
        text = text + literal(operations.HOLD_AFTER) + cast(closed, Text)
    claimed = operations.claiming(org_id, scope, text + literal("}"), decided)
    return claimed.returning(operations_table.c.id).cte("hot_claim")


def _open_hold(key: Any, room: Any, decided: Any, cost: Cost) -> Any:
    """The hold's row, if ``decided``: on the budgets of ``room``, " bud_a bud_b "."""
    listed = select(
        func.string_agg(room.c.id, aggregate_order_by(literal(" "), room.c.id))
    ).scalar_subquery()
    row = select(
        HOLD_ID,
        key.c.org_id,
        key.c.project_id,
        KEY_ID,
        cost.meters[0],
        cost.amounts[0],
        literal(" ") + func.coalesce(listed, literal("")) + literal(" "),
        literal("open"),
        NOW,
        bindparam("m_expires_at", type_=UTCDateTime()),
        bindparam("m_on_expiry", type_=holds.c.on_expiry.type),
    ).where(decided)
    columns = [
        "id",
        "org_id",
        "project_id",
        "key_id",
        "meter",
        "amount_micros",
        "budget_ids",
        "status",
        "created_at",
        "expires_at",
        "on_expiry",
    ]
    return insert(holds).from_select(columns, row).returning(holds.c.id).cte("hot_hold")


def closing_params(
    hold_id: str, status: str, now: datetime, actual: int | None = None
) -> dict[str, Any]:
    """The values of :func:`closing_statement`'s bind parameters."""
    params: dict[str, Any] = {"m_hold_id": hold_id, "m_status": status, **_clock_params(now)}
    if actual is not None:
        params["m_actual"] = actual
    else:
        params["m_kind"] = "release" if status == "released" else "expiry"
    return params


async def close_hold(
    execute: Execute,
    hold_id: str,
    status: str,
    now: datetime,
    actual: int | None = None,
    claim: Mapping[str, Any] | None = None,
) -> tuple[TableRow, list[AnyRow]] | operations.Prior | None:
    """Run :func:`closing_statement`: the hold's row after closing and its budgets'
    rows after, in id order; None when it did not close the hold. With
    ``claim`` (``keycap._db.operations.claim_params``) the call is idempotent:
    what the earlier call stored, when there is one."""
    stmt = closing_statement(actual is not None, claim is not None)
    params = closing_params(hold_id, status, now, actual)
    rows = await execute(stmt, {**params, **claim} if claim else params)
    if (prior := found(rows)) is not None:
        return prior
    if not rows or rows[0].hold_id is None:
        return None
    return _distinct(rows[:1], "hold_")[0], sorted(
        (row for row in rows if row.id is not None), key=lambda row: str(row.id)
    )


@lru_cache(maxsize=4)
def closing_statement(settle: bool, idempotent: bool = False) -> Any:
    """A hold closed as one statement: released (``m_status``: ``released`` or
    ``expired``), or with ``settle`` settled for ``m_actual`` within its amount
    (a settlement beyond the hold runs as a transaction: ``keycap._ops.holds``).

    The hold's row is closed first, if open (its UPDATE re-checks ``status`` on
    the newest version, so only one closing wins); then its budgets are locked
    in id order, taken off the hold (``actual`` of it spent), and the ledger
    written (``keycap._rules.movements.releases`` or ``settlement`` as SQL).
    Returns one row per budget after it (or one without budget columns), each
    with the hold's row after closing (``hold_...``); no row: not open (or,
    settling, ``actual`` is above its amount). ``idempotent``: as a charge's
    (:func:`_spend`), keyed by the hold; always a row, whose ``hold_id`` is NULL
    when it did not close the hold."""
    h, b = holds.c, budgets.c
    actual = int_param("m_actual")
    closing = (
        update(holds)
        .where(h.id == HOLD_ID, h.status == "open")
        .values(status=bindparam("m_status", type_=h.status.type), closed_at=NOW)
    )
    if settle:
        closing = closing.where(h.amount_micros >= actual).values(settled_micros=actual)
    prior = operations.prior(HOLD_ID).cte("hot_prior") if idempotent else None
    if prior is not None:
        closing = closing.where(~exists(select(prior.c.result)))
    hold = closing.returning(*holds.c).cte("hot_hold")

    on_hold = b.id == any_(func.string_to_array(func.btrim(hold.c.budget_ids), " "))
    locking = (
        select(
            b.id,
            b.used_micros,
            b.credit_micros,
            b.held_micros,
            b.period_start,
            _current_start().label("current_start"),
        )
        .select_from(budgets.join(hold, on_hold))
        .order_by(b.id)
        .with_for_update(key_share=True, of=budgets)
    )
    r = locking.cte("hot_budgets").c
    eff_used, eff_credit, new_start = rollover(r.current_start, r)
    returned = (
        update(budgets)
        .where(b.id == r.id)
        .values(
            used_micros=eff_used + (actual if settle else big(0)),
            held_micros=r.held_micros - select(hold.c.amount_micros).scalar_subquery(),
            credit_micros=eff_credit,
            period_start=new_start,
        )
        .returning(*budgets.c)
        .cte("hot_returned")
    )
    entries = _closing_entries(hold, returned, settle, idempotent)
    writes = [
        insert(ledger).from_select(ENTRY_COLUMNS, entries).returning(ledger.c.id).cte("hot_ledger")
    ]
    columns = [
        *(hold.c[c.name].label(f"hold_{c.name}") for c in holds.c),
        *(returned.c[c.name] for c in budgets.c),
    ]
    rows: Any = hold.outerjoin(returned, true())
    if prior is not None:
        writes.append(_claim(hold.c.org_id, HOLD_ID, returned, hold=hold))
        looked = select(*_replay_columns(prior)).cte("hot_found")
        columns += list(looked.c)
        rows = looked.outerjoin(hold, true()).outerjoin(returned, true())
    return select(*columns).select_from(rows).add_cte(*writes)


def _closing_entries(hold: Any, returned: Any, settle: bool, idempotent: bool) -> Any:
    """The ledger's entries of a hold's release, expiry or settlement within it:
    one per budget (the first primary), and a settlement on no budget gets a
    budget-less one (``idempotent``: each with the call's idempotency key)."""
    none = null()
    idem = operations.OP_KEY if idempotent else none
    first = func.row_number().over(order_by=returned.c.id) == 1
    kind = literal("settle") if settle else bindparam("m_kind", type_=ledger.c.kind.type)
    amount = int_param("m_actual") if settle else hold.c.amount_micros
    budgeted = select(
        returned.c.org_id,
        hold.c.project_id,
        hold.c.key_id,
        returned.c.id,
        hold.c.id,
        hold.c.meter,
        kind,
        amount,
        amount if settle else big(0),
        -hold.c.amount_micros,
        returned.c.period_start,
        first,
        idem,
        none,
        NOW,
    ).select_from(returned.join(hold, true()))
    if not settle:
        return budgeted
    unbudgeted = select(
        hold.c.org_id,
        hold.c.project_id,
        hold.c.key_id,
        none,
        hold.c.id,
        hold.c.meter,
        kind,
        amount,
        amount,
        big(0),
        none,
        true(),
        idem,
        none,
        NOW,
    ).where(~exists(select(returned.c.id)))
    return union_all(budgeted, unbudgeted)


def validation_params(
    key_id: str,
    digests: Mapping[str, str],
    amounts: Mapping[str, int],
    now: datetime,
    now_ms: int,
    client: ips.Address | None = None,
) -> dict[str, Any]:
    """The values of :func:`validation_statement`'s bind parameters."""
    params = charge_params(key_id, amounts, None, now)
    params["m_now_ms"] = now_ms
    params.update(grant_params(digests, client))
    return params


async def validate_at_once(
    execute: Execute,
    key_id: str,
    digests: Mapping[str, str],
    req: Requirement,
    amounts: Mapping[str, int],
    track: bool,
    now: datetime,
    now_ms: int,
    client: ips.Address | None = None,
) -> Metered:
    """Run :func:`validation_statement`; what it decided and wrote."""
    stmt = validation_statement(req, tuple(digests), len(amounts), track)
    params = validation_params(key_id, digests, amounts, now, now_ms, client)
    return Metered.of(key_id, await execute(stmt, params))


@dataclass(frozen=True, slots=True)
class Metered:
    """What a metered validation's statement returned: the decision (``ok``; else
    which part refused), the key's row after it, and every rate limit and budget
    after it, in id order (empty unless ``ok``)."""

    ok: bool
    key_found: bool
    rates_ok: bool
    #: The key's ids (None: the key itself was refused).
    ref: KeyRef | None
    key: AnyRow | None
    rate_limits: list[TableRow]
    budgets: list[TableRow]
    #: The budget that refused, as it was locked (None unless a budget refused).
    refused_budget: TableRow | None
    #: The rate limit that refused, as it was locked (None unless one refused).
    refused_rate: TableRow | None

    @classmethod
    def of(cls, key_id: str, rows: Sequence[AnyRow]) -> Metered:
        first = rows[0]
        found = first.key_org_id is not None
        return cls(
            ok=bool(first.ok),
            key_found=found,
            rates_ok=bool(first.rates_ok),
            ref=KeyRef.of(key_id, first, "key_") if found else None,
            key=first if first.ok else None,
            rate_limits=_distinct(rows, "r_"),
            budgets=_distinct(rows, "b_"),
            refused_budget=refused_budget(rows),
            refused_rate=next(iter(_distinct(rows[:1], "y_")), None),
        )


#: One table's columns out of a wider result row, read as a row is.
TableRow = HotRow


def _distinct(rows: Sequence[AnyRow], prefix: str) -> list[TableRow]:
    """The rows of one table in a cross join's result, once each, in id order."""
    if not rows:
        return []
    names = _prefixed(tuple(rows[0]._mapping), prefix)
    seen: dict[str, TableRow] = {}
    for row in rows:
        mapping = row._mapping
        if (row_id := mapping[prefix + "id"]) is not None and row_id not in seen:
            seen[row_id] = TableRow({short: mapping[name] for name, short in names})
    return [seen[i] for i in sorted(seen)]


@lru_cache(maxsize=HOT_CACHE)
def _prefixed(names: tuple[str, ...], prefix: str) -> tuple[tuple[str, str], ...]:
    """The columns of a result whose names start with ``prefix``, each with its
    name without it: worked out once per statement's columns (a metered
    validation's row has about a hundred, read four times a call)."""
    width = len(prefix)
    return tuple((name, name[width:]) for name in names if name.startswith(prefix))


@lru_cache(maxsize=HOT_CACHE)
def validation_statement(
    req: Requirement,
    peppers: tuple[str, ...],
    meter_count: int,
    track: bool,
    lock_pass: bool = True,
) -> Any:
    """A metered validation as one statement: the key (the whole grant rule and
    the usage cap), every rate limit and budget that applies, the use, the
    debits and the ledger. ``lock_pass=False``: the negative control."""
    k, rl = keys.c, rate_limits.c
    _, digests, _ = hot_binds(peppers)
    cost = Cost(meter_count)
    key_q = select(*KEY_COLUMNS, k.pepper_id).where(
        k.id == KEY_ID, grant_predicate(digests, req, NOW, "postgresql"), usage_cap_open()
    )
    key = key_q.with_for_update(key_share=True, of=keys).cte("hot_key")

    # Rate limits after the key, in id order; then what the call does to each.
    limits_q = (
        select(*rate_limits.c)
        .select_from(rate_limits.join(key, applies_to_row(rate_limits, key.c)))
        .order_by(rl.id)
    )
    limits = _locked(limits_q, rate_limits, lock_pass).cte("hot_limits")
    step = window_step(limits.c, call_cost(limits.c, cost.meters, cost.amounts), NOW_MS)
    rates = select(
        limits.c.id,
        step.admits.label("admits"),
        step.previous_units.label("previous_units"),
        step.current_units.label("current_units"),
        step.window_start.label("window_start"),
    ).cte("hot_rates")
    rates_ok = ~exists(select(rates.c.id).where(~rates.c.admits))
    # The first rate limit that refused, as it was locked: what the refusal names.
    rate_refused = (
        select(*limits.c)
        .join(rates, rates.c.id == limits.c.id)
        .where(~rates.c.admits)
        .order_by(limits.c.id)
        .limit(1)
        .cte("hot_rate_refused")
    )

    # Budgets after the rate limits (their lock pass waits for the rate limits'
    # decision), only when the rate limits admit the call.
    conds = [exists(select(key.c.id)), rates_ok]
    room = None
    if meter_count:
        room = _budget_pass(key, cost, lock_pass, after=rates_ok)
        conds.append(~exists(select(room.c.id).where(~room.c.fits)))
    decision = select(and_(*conds).label("ok"), rates_ok.label("rates_ok")).cte("hot_ok")
    decided = select(decision.c.ok).scalar_subquery()

    used = (
        update(keys)
        .where(k.id == KEY_ID, decided)
        .ordered_values(*metered_use(track, NOW))
        .returning(*KEY_COLUMNS, k.pepper_id)
        .cte("hot_used")
    )
    counted = (
        update(rate_limits)
        .where(rl.id == rates.c.id, decided)
        .ordered_values(
            (rl.previous_units, rates.c.previous_units),
            (rl.current_units, rates.c.current_units),
            (rl.window_start, rates.c.window_start),
        )
        .returning(*rate_limits.c)
        .cte("hot_counted")
    )
    columns = [
        decision.c.ok,
        decision.c.rates_ok,
        key.c.org_id.label("key_org_id"),
        key.c.project_id.label("key_project_id"),
        key.c.identity_id.label("key_identity_id"),
        *(key.c[name].label(f"key_{name}") for name in ANCESTORS),
        *used.c,
        *(counted.c[c.name].label(f"r_{c.name}") for c in rate_limits.c),
        *(rate_refused.c[c.name].label(f"y_{c.name}") for c in rate_limits.c),
    ]
    joined = (
        decision.outerjoin(key, true())
        .outerjoin(used, true())
        .outerjoin(counted, true())
        .outerjoin(rate_refused, true())
    )
    extra: list[Any] = []
    if room is not None:
        debited = _debit(room, decided)
        refused, refused_columns = _refused(room)
        columns += [debited.c[c.name].label(f"b_{c.name}") for c in budgets.c]
        columns += refused_columns
        joined = joined.outerjoin(debited, true()).outerjoin(refused, true())
        extra.append(_ledger(key, room, debited, decided, cost))
    else:
        columns += [null().label(f"b_{c.name}") for c in budgets.c]
        columns += [null().label(f"x_{c.name}") for c in budgets.c]
    stmt = select(*columns).select_from(joined)
    return stmt.add_cte(*extra) if extra else stmt


def _locked(query: Any, table: Any, lock_pass: bool) -> Any:
    """``query`` reading ``table``'s rows ``FOR NO KEY UPDATE`` (the lock pass)."""
    return query.with_for_update(key_share=True, of=table) if lock_pass else query


NOW_MS = int_param("m_now_ms")


def _budget_pass(key: Any, cost: Cost, lock_pass: bool, after: Any = None) -> Any:
    """The lock pass over every budget of the call's meters that applies to ``key``
    (a CTE of one key's row), in id order; then what the call does to each,
    decided from the locked rows' values only: ``amount``, the rolled-over
    ``eff_used`` and ``eff_credit``, ``new_start``, and whether it ``fits``."""
    b = budgets.c
    locking = (
        select(*budgets.c, _current_start().label("current_start"))
        .select_from(budgets.join(key, applies_to_row(budgets, key.c)))
        .where(b.meter.in_(cost.meters))
        .order_by(b.id)
    )
    if after is not None:
        locking = locking.where(after)
    r = _locked(locking, budgets, lock_pass).cte("hot_budgets").c
    eff_used, eff_credit, new_start = rollover(r.current_start, r)
    amount = cost.on(r.meter)
    return select(
        *(r[c.name] for c in budgets.c),
        amount.label("amount"),
        eff_used.label("eff_used"),
        eff_credit.label("eff_credit"),
        new_start.label("new_start"),
        (eff_used + r.held_micros + amount <= r.limit_micros + eff_credit).label("fits"),
    ).cte("hot_room")


def _refused(room: Any) -> tuple[Any, list[Any]]:
    """The first budget of ``room`` without room for the call, as it was locked
    (a CTE), and its columns labelled ``x_...``: what the refusal names; with
    ``x_expired_holds``, whether open holds past their expiry still hold part of
    it (only then does the refusal need another round trip, to free them)."""
    expired = has_expired_holds(room.c.id, "postgresql")
    first = (
        select(*(room.c[c.name] for c in budgets.c), expired.label("expired_holds"))
        .where(~room.c.fits)
        .order_by(room.c.id)
        .limit(1)
        .cte("hot_refused")
    )
    return first, [
        first.c[c.name].label(f"x_{c.name}") for c in (*budgets.c, first.c.expired_holds)
    ]


def refused_budget(rows: Sequence[AnyRow]) -> TableRow | None:
    """The budget that refused (see :func:`_refused`), from a refused call's rows."""
    found = _distinct(rows[:1], "x_")
    return found[0] if found else None


def _debit(room: Any, decided: Any, *, hold: bool = False) -> Any:
    """Every budget of ``room`` debited (with ``hold``: its ``held`` raised), if
    ``decided``; the rows after it."""
    amount = room.c.amount
    return (
        update(budgets)
        .where(budgets.c.id == room.c.id, decided)
        .values(
            used_micros=room.c.eff_used if hold else room.c.eff_used + amount,
            held_micros=room.c.held_micros + amount if hold else room.c.held_micros,
            credit_micros=room.c.eff_credit,
            period_start=room.c.new_start,
        )
        .returning(*budgets.c)
        .cte("hot_debited")
    )


def _ledger(
    key: Any,
    room: Any,
    debited: Any,
    decided: Any,
    cost: Cost,
    *,
    hold: bool = False,
    idempotent: bool = False,
) -> Any:
    entries = insert(ledger).from_select(
        ENTRY_COLUMNS, _entries(key, room, debited, decided, cost, hold, idempotent)
    )
    return entries.returning(ledger.c.id).cte("hot_ledger")


def _entries(
    key: Any, room: Any, debited: Any, decided: Any, cost: Cost, hold: bool, idempotent: bool
) -> Any:
    """``keycap._rules.movements.charges`` (with ``hold``: ``movements.holds``) as a
    SELECT: the ledger's entries of the charge or hold (``idempotent``: each with
    the call's idempotency key)."""
    metadata = bindparam("m_metadata", type_=JSONText())
    none = null()
    idem = operations.OP_KEY if idempotent else none
    first = func.row_number().over(partition_by=debited.c.meter, order_by=debited.c.id) == 1
    amount = cost.on(debited.c.meter)
    budgeted = select(
        debited.c.org_id,
        key.c.project_id,
        KEY_ID,
        debited.c.id,
        HOLD_ID if hold else none,
        debited.c.meter,
        literal("hold" if hold else "charge"),
        amount,
        big(0) if hold else amount,
        amount if hold else big(0),
        debited.c.period_start,
        first,
        idem,
        case((first, metadata), else_=null()),
        NOW,
    ).select_from(debited.join(key, true()))
    if hold:  # a hold on no budget holds nothing, and writes no entry
        return budgeted
    unbudgeted = [
        select(
            key.c.org_id,
            key.c.project_id,
            KEY_ID,
            none,
            none,
            meter,
            literal("charge"),
            amount,
            amount,
            big(0),
            null(),
            true(),
            idem,
            metadata,
            NOW,
        ).where(decided, ~exists(select(room.c.id).where(room.c.meter == meter)))
        for meter, amount in zip(cost.meters, cost.amounts, strict=True)
    ]
    return union_all(budgeted, *unbudgeted)
