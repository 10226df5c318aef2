"""Metered operations: each one transaction, all-or-nothing, retried on transient conflicts.

The statements and why they are safe live in ``keycap.db.metering``; this
module strings them into units of work, turns a refusal into the error that
says which limit refused, builds results, and reports alerts after commit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

from keycap import budgets as budget_rules
from keycap import ids, periods, policy, ratelimit
from keycap.db import metering as m
from keycap.db import queries, rows
from keycap.db.engine import Conflict, Database
from keycap.db.queries import AnyRow
from keycap.db.schema import budgets
from keycap.errors import (
    BudgetExceededError,
    DatabaseError,
    HoldClosedError,
    KeycapError,
    NotFoundError,
    RateLimitedError,
    UsageExhaustedError,
)
from keycap.models import (
    BudgetAlert,
    BudgetStatus,
    Charge,
    Hold,
    RateLimitStatus,
    Settlement,
)
from keycap.money import from_micros
from keycap.policy import Requirement

log = logging.getLogger("keycap")

AlertHandler = Callable[[BudgetAlert], Awaitable[None]]


class _Refused(Exception):
    # An internal signal, never escapes this module.
    """Raised inside a transaction to roll it back; says which row refused (a rate
    limit), or for which key (a budget: which one is found after the rollback)."""

    def __init__(self, what: str, row: AnyRow | None = None, key: m.KeyRef | None = None) -> None:
        self.what = what
        self.row = row
        self.key = key


# --- results --------------------------------------------------------------------------


def budget_status(row: AnyRow, now: datetime) -> BudgetStatus:
    state = budget_rules.state_at(row, now)
    return BudgetStatus.model_construct(
        id=row.id,
        scope=m.scope_of(row.subject_id),
        subject_id=row.subject_id,
        meter=row.meter,
        period=row.period,
        anchor_day=row.anchor_day,
        limit=from_micros(state.limit),
        credit=from_micros(state.credit),
        used=from_micros(state.used),
        held=from_micros(state.held),
        remaining=from_micros(state.remaining),
        period_start=state.period_start,
        reset_at=state.reset_at,
        alert_thresholds=budget_rules.decode_thresholds(row.thresholds),
    )


def rate_limit_status(row: AnyRow, now: datetime) -> RateLimitStatus:
    now_ms = _ms(now)
    v = ratelimit.view(
        row.window_ms, now_ms, row.window_start, row.current_units, row.previous_units
    )
    remaining = ratelimit.remaining(row.limit_units, v)
    reset = now + timedelta(milliseconds=ratelimit.reset_ms(row.window_ms, now_ms, v))
    as_amount = row.meter is not None
    return RateLimitStatus.model_construct(
        id=row.id,
        scope=m.scope_of(row.subject_id),
        subject_id=row.subject_id,
        name=row.name,
        meter=row.meter,
        limit=from_micros(row.limit_units) if as_amount else row.limit_units,
        window_seconds=from_micros(row.window_ms * 1000),
        remaining=from_micros(remaining) if as_amount else remaining,
        reset_at=reset,
    )


def _ms(when: datetime) -> int:
    return int((when - periods.EPOCH) // timedelta(milliseconds=1))


def _tightest(statuses: Sequence[BudgetStatus]) -> tuple[BudgetStatus, ...]:
    return tuple(sorted(statuses, key=lambda s: (s.remaining, s.id)))


def _alerts(
    debited: Sequence[tuple[AnyRow, int]], now: datetime, key_id: str | None
) -> tuple[BudgetAlert, ...]:
    out = []
    for after, amount in debited:
        state = budget_rules.state_at(after, now)
        for threshold in budget_rules.crossed(
            budget_rules.decode_thresholds(after.thresholds),
            state.limit,
            state.used - amount,
            state.used,
        ):
            out.append(
                BudgetAlert.model_construct(
                    budget_id=after.id,
                    scope=m.scope_of(after.subject_id),
                    subject_id=after.subject_id,
                    meter=after.meter,
                    threshold=threshold,
                    limit=from_micros(state.limit),
                    used=from_micros(state.used),
                    period_start=state.period_start,
                    key_id=key_id,
                )
            )
    return tuple(out)


async def deliver(alerts: Sequence[BudgetAlert], handler: AlertHandler | None) -> None:
    """Await the handler once per alert, after commit. A failing handler is logged:
    the charge it reports has happened and must not look as if it failed."""
    if handler is None:
        return
    for alert in alerts:
        try:
            await handler(alert)
        except Exception:
            log.exception(
                "keycap: on_budget_alert failed for budget %s at %s%%",
                alert.budget_id,
                alert.threshold,
            )


def budget_exceeded(
    row: AnyRow, requested: int, now: datetime, key_id: str | None
) -> BudgetExceededError:
    state = budget_rules.state_at(row, now)
    return BudgetExceededError(
        budget_id=row.id,
        scope=m.scope_of(row.subject_id),
        subject_id=row.subject_id,
        meter=row.meter,
        period=row.period,
        limit=from_micros(state.limit + state.credit),
        used=from_micros(state.used),
        held=from_micros(state.held),
        remaining=from_micros(state.remaining),
        requested=from_micros(requested),
        reset_at=state.reset_at,
        key_id=key_id,
    )


async def _refusal(
    db: Database, key: m.KeyRef, amounts: Mapping[str, int], now: datetime, key_id: str | None
) -> Exception | None:
    """The error naming the budget that refused a debit of ``amounts`` (the first in
    id order without room), or None if there is room after all: expired holds were
    freed, or a release or rollover happened meanwhile (the caller tries again)."""
    async with db.autocommit() as conn:
        applicable = await m.applicable_budgets(conn, key, list(amounts))
    for row in applicable:
        requested = amounts[row.meter]
        if budget_rules.state_at(row, now).remaining >= requested:
            continue
        if await sweep(db, now, budget_id=row.id):
            return None
        (row,) = await m.select_where(db, budgets, budgets.c.id == row.id) or (row,)
        if budget_rules.state_at(row, now).remaining >= requested:
            return None
        return budget_exceeded(row, requested, now, key_id)
    return None


async def _key_refusal(db: Database, key_id: str, now: datetime) -> Exception | None:
    """Why a key could not be charged: not found, or the state the policy names.
    None: it is live after all (enabled meanwhile), so the caller tries again."""
    row = await queries.get_key(db, key_id)
    if row is None:
        return NotFoundError("key", key_id)
    try:
        policy.check(rows.to_facts(row, digest_ok=True), Requirement(), now)
    except KeycapError as error:
        return error
    return None


# --- idempotency and the key, shared by every operation -------------------------------


async def _replay(
    db: Database, model: Any, scope: str, kind: str, idempotency_key: str | None
) -> Any | None:
    """The stored result of an earlier call with this idempotency key, marked replayed."""
    if idempotency_key is None:
        return None
    stored = await m.stored_result(db, scope=scope, kind=kind, idempotency_key=idempotency_key)
    return None if stored is None else model.model_validate({**stored, "replayed": True})


async def _claim(
    conn: Any, org_id: str, scope: str, kind: str, idempotency_key: str | None, now: datetime
) -> str | None:
    if idempotency_key is None:
        return None
    return await m.claim_operation(
        conn, org_id=org_id, scope=scope, kind=kind, idempotency_key=idempotency_key, now=now
    )


async def _live_key(conn: Any, key_id: str, now: datetime) -> m.KeyRef:
    key = await m.lock_live_key(conn, key_id, now)
    if key is None:
        raise _Refused("key")
    return key


# --- charge ---------------------------------------------------------------------------


async def charge(
    db: Database,
    *,
    key_id: str,
    amounts: Mapping[str, int],
    idempotency_key: str | None,
    metadata: Mapping[str, Any] | None,
    now: datetime,
    on_alert: AlertHandler | None,
) -> Charge:
    """Debit every budget of each meter on the key, its project and its org, or none."""
    if (replay := await _replay(db, Charge, key_id, "charge", idempotency_key)) is not None:
        return replay  # type: ignore[no-any-return]

    async def unit() -> tuple[Charge, tuple[BudgetAlert, ...]]:
        async with db.begin() as conn:
            key = await _live_key(conn, key_id, now)
            op_id = await _claim(conn, key.org_id, key_id, "charge", idempotency_key, now)
            result = await _charge_in(conn, key, amounts, now, idempotency_key, metadata)
            if op_id is not None:
                await m.store_result(conn, op_id, result.model_dump(mode="json"))
            return result, result.alerts

    result, alerts = await _run(
        db,
        unit,
        key_id=key_id,
        amounts=amounts,
        now=now,
        idempotency=("charge", key_id, idempotency_key),
        model=Charge,
    )
    await deliver(alerts, on_alert)
    return result  # type: ignore[no-any-return]


async def _charge_in(
    conn: Any,
    key: m.KeyRef,
    amounts: Mapping[str, int],
    now: datetime,
    idempotency_key: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Charge:
    """Inside a transaction: debit every applicable budget, write the ledger, and
    say which alert thresholds were crossed (delivered by the caller after commit)."""
    debited = await _debit_all(conn, key, amounts, now)
    await m.insert_ledger(
        conn, _charge_ledger(key, debited, amounts, now, idempotency_key, metadata)
    )
    return Charge.model_construct(
        key_id=key.id,
        amounts={meter: from_micros(a) for meter, a in amounts.items()},
        budgets=_tightest([budget_status(after, now) for after, _ in debited]),
        alerts=_alerts(debited, now, key.id),
        replayed=False,
    )


async def _debit_all(
    conn: Any, key: m.KeyRef, amounts: Mapping[str, int], now: datetime
) -> list[tuple[AnyRow, int]]:
    applicable = await m.applicable_budgets(conn, key, list(amounts))
    afters = await m.debit_all(conn, applicable, amounts, now, key_id=key.id)
    if afters is None:
        raise _Refused("budget", key=key)
    return [(after, amounts[after.meter]) for after in afters]


def _charge_ledger(
    key: m.KeyRef,
    debited: Sequence[tuple[AnyRow, int]],
    amounts: Mapping[str, int],
    now: datetime,
    idempotency_key: str | None,
    metadata: Mapping[str, Any] | None,
    kind: str = "charge",
) -> list[dict[str, Any]]:
    """One row per budget debited, plus a budget-less row for a meter with no budget;
    the first row of each meter is the primary one."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    common: dict[str, Any] = {
        "key_id": key.id,
        "project_id": key.project_id,
        "idempotency_key": idempotency_key,
        "metadata": metadata,
    }
    for after, amount in debited:
        out.append(
            m.ledger_row(after, kind, amount, amount, 0, after.meter not in seen, now, **common)
        )
        seen.add(after.meter)
    for meter, amount in amounts.items():
        if meter not in seen:
            out.append(
                m.ledger_row(
                    None,
                    kind,
                    amount,
                    amount,
                    0,
                    True,
                    now,
                    meter=meter,
                    org_id=key.org_id,
                    **common,
                )
            )
    return out


async def _run(
    db: Database,
    unit: Callable[[], Awaitable[Any]],
    *,
    key_id: str | None,
    amounts: Mapping[str, int],
    now: datetime,
    idempotency: tuple[str, str, str | None],
    model: Any,
) -> Any:
    """Run a unit, turning refusals into errors and a lost idempotency race into a replay."""
    kind, scope, idempotency_key = idempotency
    for _ in range(3):
        try:
            return await m.retrying(unit)
        except Conflict:
            # Lost the race to a duplicate with the same idempotency key: its result.
            if (replay := await _replay(db, model, scope, kind, idempotency_key)) is None:
                raise
            return replay, ()
        except _Refused as refused:
            if refused.what == "key" or refused.key is None:
                error = await _key_refusal(db, key_id or "", now)
            else:
                error = await _refusal(db, refused.key, amounts, now, key_id)
            if error is not None:
                raise error from None
    raise DatabaseError("the key or its budgets kept changing during the operation; try again")


# --- holds ----------------------------------------------------------------------------


def _hold_model(row: Any, statuses: Sequence[BudgetStatus] = (), replayed: bool = False) -> Hold:
    return Hold.model_construct(
        id=row.id,
        key_id=row.key_id,
        meter=row.meter,
        amount=from_micros(row.amount_micros),
        status=row.status,
        created_at=row.created_at,
        expires_at=row.expires_at,
        closed_at=row.closed_at,
        budgets=_tightest(statuses),
        replayed=replayed,
    )


async def reserve(
    db: Database,
    *,
    key_id: str,
    meter: str,
    amount: int,
    ttl: timedelta,
    idempotency_key: str | None,
    now: datetime,
) -> Hold:
    """Hold ``amount`` on every budget of the meter (key, project, org), or none."""
    if (replay := await _replay(db, Hold, key_id, "reserve", idempotency_key)) is not None:
        return replay  # type: ignore[no-any-return]

    async def unit() -> tuple[Hold, tuple[()]]:
        async with db.begin() as conn:
            key = await _live_key(conn, key_id, now)
            op_id = await _claim(conn, key.org_id, key_id, "reserve", idempotency_key, now)
            hold_id = ids.new_id("hold")
            applicable = await m.applicable_budgets(conn, key, [meter])
            held = await m.debit_all(
                conn, applicable, {meter: amount}, now, key_id=key_id, hold=True
            )
            if held is None:
                raise _Refused("budget", key=key)
            values = {
                "id": hold_id,
                "org_id": key.org_id,
                "project_id": key.project_id,
                "key_id": key_id,
                "meter": meter,
                "amount_micros": amount,
                "budget_ids": " " + " ".join(r.id for r in held) + " ",
                "status": "open",
                "settled_micros": None,
                "shortfall_micros": None,
                "created_at": now,
                "expires_at": now + ttl,
                "closed_at": None,
            }
            await m.insert_hold(conn, values)
            await m.insert_ledger(
                conn,
                [
                    m.ledger_row(
                        after,
                        "hold",
                        amount,
                        0,
                        amount,
                        i == 0,
                        now,
                        key_id=key_id,
                        project_id=key.project_id,
                        hold_id=hold_id,
                        idempotency_key=idempotency_key,
                    )
                    for i, after in enumerate(held)
                ],
            )
            result = _hold_model(SimpleNamespace(**values), [budget_status(r, now) for r in held])
            if op_id is not None:
                await m.store_result(conn, op_id, result.model_dump(mode="json"))
            return result, ()

    result, _ = await _run(
        db,
        unit,
        key_id=key_id,
        amounts={meter: amount},
        now=now,
        idempotency=("reserve", key_id, idempotency_key),
        model=Hold,
    )
    return result  # type: ignore[no-any-return]


async def _open_hold(db: Database, hold_id: str) -> AnyRow:
    row = await m.get_hold(db, hold_id)
    if row is None:
        raise NotFoundError("hold", hold_id)
    if row.status != "open":
        raise HoldClosedError(hold_id, row.status)
    return row


async def settle(
    db: Database,
    *,
    hold_id: str,
    actual: int,
    idempotency_key: str | None,
    now: datetime,
    on_alert: AlertHandler | None,
) -> Settlement:
    """Charge ``actual`` against a hold and return the rest.

    Up to the held amount this always succeeds (the money was reserved). Above
    it, the excess is charged as far as every budget allows (and only while the
    key is live); what does not fit is written to the ledger as a shortfall
    and reported, never dropped.
    """
    if (replay := await _replay(db, Settlement, hold_id, "settle", idempotency_key)) is not None:
        return replay  # type: ignore[no-any-return]
    hold = await _open_hold(db, hold_id)

    async def unit() -> tuple[Settlement, tuple[BudgetAlert, ...]]:
        async with db.begin() as conn:
            await_op = await _claim(conn, hold.org_id, hold_id, "settle", idempotency_key, now)
            if not await m.close_hold(conn, hold_id, "settled", now, settled_micros=actual):
                raise _Refused("hold")
            within = min(actual, hold.amount_micros)
            excess = actual - within
            afters = []
            for row in await _hold_budgets(conn, hold):
                after = await m.debit(
                    conn,
                    row,
                    used=within,
                    held=-hold.amount_micros,
                    now=now,
                    key_id=None,
                    must_fit=False,
                )
                assert after is not None
                afters.append(after)
            fit = excess
            if excess and afters:
                fit = min(excess, *(budget_rules.state_at(a, now).remaining for a in afters))
            elif excess and not await m.is_live(conn, hold.key_id, now):
                fit = 0  # no budget limits the excess, but a dead key is charged nothing more
            charged_excess: list[AnyRow] = []
            if fit:
                for after in afters:
                    again = await m.debit(
                        conn, after, used=fit, held=0, now=now, key_id=hold.key_id
                    )
                    if again is None:  # the key is no longer live: nothing beyond the hold
                        if charged_excess:
                            raise DatabaseError("inconsistent budgets during settle")
                        fit = 0
                        break
                    charged_excess.append(again)
            shortfall = excess - fit
            final = charged_excess or afters
            common: dict[str, Any] = {
                "key_id": hold.key_id,
                "project_id": hold.project_id,
                "hold_id": hold_id,
                "idempotency_key": idempotency_key,
            }
            ledger_rows = [
                m.ledger_row(
                    a, "settle", within, within, -hold.amount_micros, i == 0, now, **common
                )
                for i, a in enumerate(afters)
            ] or [
                m.ledger_row(
                    None,
                    "settle",
                    within,
                    within,
                    0,
                    True,
                    now,
                    meter=hold.meter,
                    org_id=hold.org_id,
                    **common,
                )
            ]
            if fit:
                ledger_rows += [
                    m.ledger_row(a, "charge", fit, fit, 0, i == 0, now, **common)
                    for i, a in enumerate(charged_excess)
                ] or [
                    m.ledger_row(
                        None,
                        "charge",
                        fit,
                        fit,
                        0,
                        True,
                        now,
                        meter=hold.meter,
                        org_id=hold.org_id,
                        **common,
                    )
                ]
            if shortfall:
                ledger_rows.append(
                    m.ledger_row(
                        None,
                        "shortfall",
                        shortfall,
                        0,
                        0,
                        False,
                        now,
                        meter=hold.meter,
                        org_id=hold.org_id,
                        **common,
                    )
                )
            await m.insert_ledger(conn, ledger_rows)
            debited = [(a, within + fit) for a in final]
            alerts = _alerts(debited, now, hold.key_id)
            result = Settlement.model_construct(
                hold_id=hold_id,
                key_id=hold.key_id,
                meter=hold.meter,
                held=from_micros(hold.amount_micros),
                actual=from_micros(actual),
                charged=from_micros(within + fit),
                returned=from_micros(hold.amount_micros - within),
                shortfall=from_micros(shortfall),
                budgets=_tightest([budget_status(a, now) for a in final]),
                alerts=alerts,
                replayed=False,
            )
            if await_op is not None:
                await m.store_result(conn, await_op, result.model_dump(mode="json"))
            return result, alerts

    result, alerts = await _run_hold(db, unit, hold_id, ("settle", idempotency_key), Settlement)
    await deliver(alerts, on_alert)
    return result  # type: ignore[no-any-return]


async def _hold_budgets(conn: Any, hold: Any) -> Sequence[AnyRow]:
    """The budgets the hold reserved on that still exist, in id order."""
    return await m.budgets_by_id(conn, hold.budget_ids.split())


async def _run_hold(
    db: Database,
    unit: Callable[[], Awaitable[Any]],
    hold_id: str,
    idempotency: tuple[str, str | None],
    model: Any,
) -> Any:
    kind, idempotency_key = idempotency
    try:
        return await m.retrying(unit)
    except Conflict:
        if (replay := await _replay(db, model, hold_id, kind, idempotency_key)) is None:
            raise
        return replay, ()
    except _Refused:
        row = await m.get_hold(db, hold_id)
        raise HoldClosedError(hold_id, row.status if row is not None else "gone") from None


async def release(
    db: Database,
    *,
    hold_id: str,
    idempotency_key: str | None,
    now: datetime,
    status: str = "released",
) -> Hold:
    """Return a hold to its budgets (``status="expired"``: the same, by expiry)."""
    kind = "release" if status == "released" else "expiry"
    if (replay := await _replay(db, Hold, hold_id, "release", idempotency_key)) is not None:
        return replay  # type: ignore[no-any-return]
    hold = await _open_hold(db, hold_id)

    async def unit() -> tuple[Hold, tuple[()]]:
        async with db.begin() as conn:
            op_id = await _claim(conn, hold.org_id, hold_id, "release", idempotency_key, now)
            if not await m.close_hold(conn, hold_id, status, now):
                raise _Refused("hold")
            afters = []
            for row in await _hold_budgets(conn, hold):
                after = await m.debit(
                    conn,
                    row,
                    used=0,
                    held=-hold.amount_micros,
                    now=now,
                    key_id=None,
                    must_fit=False,
                )
                assert after is not None
                afters.append(after)
            await m.insert_ledger(
                conn,
                [
                    m.ledger_row(
                        a,
                        kind,
                        hold.amount_micros,
                        0,
                        -hold.amount_micros,
                        i == 0,
                        now,
                        key_id=hold.key_id,
                        project_id=hold.project_id,
                        hold_id=hold_id,
                        idempotency_key=idempotency_key,
                    )
                    for i, a in enumerate(afters)
                ],
            )
            closed = SimpleNamespace(**{**hold._mapping, "status": status, "closed_at": now})
            result = _hold_model(closed, [budget_status(a, now) for a in afters])
            if op_id is not None:
                await m.store_result(conn, op_id, result.model_dump(mode="json"))
            return result, ()

    result, _ = await _run_hold(db, unit, hold_id, ("release", idempotency_key), Hold)
    return result  # type: ignore[no-any-return]


async def sweep(db: Database, now: datetime, *, budget_id: str | None = None) -> int:
    """Expire open holds past their ttl, returning their amounts. Returns how many."""
    count = 0
    for hold_id in await m.expired_hold_ids(db, now, budget_id=budget_id):
        try:
            await release(db, hold_id=hold_id, idempotency_key=None, now=now, status="expired")
            count += 1
        except HoldClosedError:
            pass  # settled, released or expired by someone else meanwhile
    return count


# --- metered validation ---------------------------------------------------------------


async def validate(
    db: Database,
    *,
    key_id: str,
    digests: Mapping[str, str],
    req: Requirement,
    amounts: Mapping[str, int],
    track: bool,
    now: datetime,
    on_alert: AlertHandler | None,
) -> tuple[AnyRow, RateLimitStatus | None, Charge | None] | None:
    """Validation, every rate limit, the usage cap and every budget, in one transaction.

    Returns None when the key itself was refused (the caller diagnoses it);
    raises RateLimitedError or BudgetExceededError naming what refused.
    """

    async def unit() -> tuple[
        AnyRow, RateLimitStatus | None, Charge | None, tuple[BudgetAlert, ...]
    ]:
        async with db.begin() as conn:
            key_row = await m.record_metered_use(
                conn, key_id, digests, req, now, db.dialect, track=track
            )
            if key_row is None:
                raise _Refused("key")
            key = m.KeyRef(key_id, key_row.org_id, key_row.project_id)
            limits = await m.consume_rates(conn, key, amounts, _ms(now), key_row.rate_limit_count)
            if limits is None:
                raise _Refused("rate", key=key)
            statuses = [rate_limit_status(row, now) for row in limits]
            charge_result = await _charge_in(conn, key, amounts, now) if amounts else None
            tightest = min(statuses, key=_rate_order) if statuses else None
            alerts = charge_result.alerts if charge_result is not None else ()
            return key_row, tightest, charge_result, alerts

    for _ in range(3):
        try:
            key_row, tightest, charge_result, alerts = await m.retrying(unit)
        except _Refused as refused:
            if refused.what == "key":
                return None
            assert refused.key is not None
            error: Exception | None
            if refused.what == "rate":
                error = await _rate_refusal(db, refused.key, amounts, now, key_id)
            else:
                error = await _refusal(db, refused.key, amounts, now, key_id)
            if error is not None:
                raise error from None
            continue
        await deliver(alerts, on_alert)
        return key_row, tightest, charge_result
    raise DatabaseError("the budgets kept changing during validation; try again")


def _rate_order(status: RateLimitStatus) -> tuple[Any, ...]:
    fraction = status.remaining / status.limit if status.limit else 0
    return (fraction, status.reset_at)


async def _rate_refusal(
    db: Database, key: m.KeyRef, amounts: Mapping[str, int], now: datetime, key_id: str
) -> RateLimitedError | None:
    """The error naming the rate limit that refused (the first in id order that does
    not admit the call now), or None if all admit it now (the caller tries again)."""
    now_ms = _ms(now)
    for current in await m.applicable_rate_limits(db, key):
        units = m.rate_units(current, amounts)
        v = ratelimit.view(
            current.window_ms,
            now_ms,
            current.window_start,
            current.current_units,
            current.previous_units,
        )
        if units and not ratelimit.admits(current.limit_units, v, units):
            return _rate_limited(current, units, v, now, key_id)
    return None


def _rate_limited(
    current: AnyRow, units: int, v: ratelimit.WindowView, now: datetime, key_id: str
) -> RateLimitedError:
    now_ms = _ms(now)
    wait = ratelimit.retry_after_ms(current.limit_units, current.window_ms, now_ms, v, units)
    status = rate_limit_status(current, now)
    return RateLimitedError(
        name=current.name,
        scope=m.scope_of(current.subject_id),
        limit=status.limit,
        remaining=status.remaining,
        retry_after=None if wait is None else wait / 1000,
        reset_at=status.reset_at,
        key_id=key_id,
    )


def usage_cap_error(row: AnyRow) -> UsageExhaustedError | None:
    m_ = row._mapping
    if m_["max_uses"] is not None and m_["use_count"] >= m_["max_uses"]:
        return UsageExhaustedError(m_["max_uses"], key_id=m_["id"])
    return None
