"""MariaDB: a metered validation or a charge as one compound statement
(``BEGIN NOT ATOMIC ... END``), sent as one query: one round trip.

The block is the transaction ``keycap._ops.validation`` and ``charges`` run
statement by statement elsewhere, with its decisions taken on the server:

1. ``START TRANSACTION``; the key's ``UPDATE`` (a validation: the whole grant
   rule and the usage cap in its ``WHERE``; a charge: the key is live), which
   takes the key's row lock. No row: the key refused (``step`` 0).
2. The key's ids into local variables (``k_org_id`` ...), which every later
   statement's "applies to the key" reads (``keycap._db.grant.applies_to_row``).
3. A validation: every rate limit that applies, consumed in one ``UPDATE``
   (each row's sliding-window inequality in its ``WHERE``), as
   ``keycap._db.rate_limits.consume_rates`` does; fewer rows than apply: the
   rate limits refused (``step`` 1).
4. Every budget of the call's meters that applies, one ``UPDATE`` each by
   primary key in id order (the order every transaction locks budgets in),
   after its own period rollover; one without room refuses (``step`` 2) and is
   named (``v_bad``), read as it is under the lock.
5. The ledger's entries (``keycap._rules.movements.charges`` as SQL), from the
   budgets' rows after.
6. ``step`` 3: the result sets (the key, the rate limits, the budgets after)
   and ``COMMIT``; else the refusal's result sets and ``ROLLBACK``.

Every row the decision reads is read by an ``UPDATE`` (InnoDB's locking read:
the newest committed version, under the row's lock), so the block is exact the
way the transactions are. A statement that fails inside the block (a deadlock,
a lock wait timeout) ends it; the pool's reset rolls back what the server says
is still open, and the unit runs again (``keycap._ops.units.retrying``).

Compound statements outside stored programs, ``FOR`` over a cursor and
``TYPE OF`` are MariaDB's (10.3 and later); MySQL runs the transactions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal,
    literal_column,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.engine import Dialect

from keycap._db import metering, operations
from keycap._db.build import (
    HOLD_ID,
    KEY_ID,
    NOW,
    Cost,
    KeyRef,
    big,
    hot_binds,
    int_param,
)
from keycap._db.grant import applies_to_row, grant_predicate, key_is_live_now
from keycap._db.holds import has_expired_holds
from keycap._db.hot import Compiled, HotRow, compiled
from keycap._db.keys import KEY_COLUMNS, metered_use, usage_cap_open
from keycap._db.ledger import ENTRY_COLUMNS
from keycap._db.rate_limits import call_cost, window_step
from keycap._db.schema import ANCESTORS, budgets, holds, keys, ledger, rate_limits
from keycap._db.schema import operations as operations_table
from keycap._db.types import JSONText, UTCDateTime
from keycap._rules import ips, periods
from keycap._rules.policy import Requirement

#: What a block's first result set says: how far the decision got (``REPLAYED``:
#: an idempotent call's key has a committed operation; nothing was done).
KEY_REFUSED, RATE_REFUSED, BUDGET_REFUSED, DONE, REPLAYED = 0, 1, 2, 3, 4


class _KeyVariables:
    """The key's ids as the block's local variables, read as a row's columns are
    (``keycap._db.grant.applies_to_row`` takes it as the key)."""

    names = ("id", "org_id", "project_id", "identity_id", *ANCESTORS)

    def __init__(self) -> None:
        self.id: Any = literal_column("k_id")
        self.org_id: Any = literal_column("k_org_id")
        self.project_id: Any = literal_column("k_project_id")
        self.identity_id: Any = literal_column("k_identity_id")

    def __getitem__(self, name: str) -> Any:
        return literal_column(f"k_{name}")


K = _KeyVariables()
#: The budget the loop is at (its cursor's row), and the period start it applies.
BUDGET: Any = literal_column("r.id")
START: Any = literal_column("v_start")
#: The ids of the budgets debited so far, " bud_a bud_b ".
DEBITED: Any = literal_column("v_ids")


@dataclass(frozen=True, slots=True)
class Block:
    """A compound statement: its text, and the compiled statements whose binds fill
    its placeholders, in the order they appear; ``sets`` reads each result set."""

    sql: str
    parts: tuple[Compiled, ...]
    #: The result sets after the first (the step), by name, in the order sent.
    sets: tuple[tuple[str, Compiled], ...]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        out: list[Any] = []
        for part in self.parts:
            out += part.args(params)
        return out


class _Writer:
    """A block's text, written line by line; each Core statement compiled for the
    dialect, its binds remembered in order."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.lines: list[str] = []
        self.parts: list[Compiled] = []
        self.sets: list[tuple[str, Compiled]] = []

    def stmt(self, stmt: Any, suffix: str = "", prefix: str = "", into: str = "") -> None:
        """``stmt`` as the block's next statement (``into``: a SELECT's ``INTO``
        variables, written before its ``FROM``)."""
        c = compiled(stmt, self.dialect)
        self.parts.append(c)
        sql = c.sql
        if into:
            head, sep, tail = sql.partition("\nFROM ")
            if not sep:
                raise ValueError("a SELECT ... INTO of a block needs a FROM")
            sql = f"{head} INTO {into}\nFROM {tail}"
        self.lines.append(prefix + sql + suffix + ";")

    def result(self, name: str, stmt: Any) -> None:
        """A statement whose rows the client reads, as the next result set."""
        self.stmt(stmt)
        self.sets.append((name, compiled(stmt, self.dialect)))

    def text(self, line: str) -> None:
        if "%" in line:
            raise ValueError("a block's own text may not hold a % (the driver's placeholder)")
        self.lines.append(line)

    def block(self) -> Block:
        return Block("\n".join(self.lines), tuple(self.parts), tuple(self.sets))


def _declarations(w: _Writer) -> None:
    w.text("BEGIN NOT ATOMIC")
    for name in K.names:
        w.text(f"DECLARE k_{name} TYPE OF {keys.name}.{'id' if name == 'id' else name};")
    w.text("DECLARE v_step INT DEFAULT 0;")
    w.text("DECLARE v_n INT DEFAULT 0;")
    w.text(f"DECLARE v_bad TYPE OF {budgets.name}.id DEFAULT NULL;")
    w.text("DECLARE v_ids VARCHAR(8000) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT ' ';")
    w.text("DECLARE v_start DATETIME(6);")
    w.text("START TRANSACTION;")
    w.text("decide: BEGIN")


def _key_variables(w: _Writer, key_id: Any) -> None:
    k = keys.c
    names = ", ".join(f"k_{name}" for name in K.names)
    w.stmt(select(*(k[name] for name in K.names)).where(k.id == key_id), into=names)


def _rate_limits(w: _Writer, meter_count: int) -> None:
    """Every rate limit that applies consumed in one UPDATE; fewer than apply: leave."""
    c = rate_limits.c
    meters = [bindparam(f"m_meter_{i}", type_=c.meter.type) for i in range(meter_count)]
    units = [int_param(f"m_amount_{i}") for i in range(meter_count)]
    step = window_step(c, call_cost(c, meters, units), int_param("m_now_ms"))
    w.text("SET v_step = 1;")
    w.stmt(
        select(func.count()).select_from(rate_limits).where(applies_to_row(rate_limits, K)),
        into="v_n",
    )
    w.stmt(
        update(rate_limits)
        .where(applies_to_row(rate_limits, K), step.admits)
        .ordered_values(  # window_start last: the CASEs above read the stored one
            (c.previous_units, step.previous_units),
            (c.current_units, step.current_units),
            (c.window_start, step.window_start),
        )
    )
    w.text("IF ROW_COUNT() < v_n THEN LEAVE decide; END IF;")


def _current_start(period: Any, anchor: Any) -> Any:
    """The start of a budget's current period, from its ``period`` and ``anchor``
    day and the binds of :func:`clock_params` (``keycap._rules.periods.start``)."""
    at = UTCDateTime()
    months = case(
        {day: bindparam(f"m_month_{day}", type_=at) for day in range(2, 32)},
        value=anchor,
        else_=bindparam("m_month_1", type_=at),
    )
    return case(
        (period == "lifetime", literal(periods.EPOCH, at)),
        (period == "day", bindparam("m_day", type_=at)),
        (period == "week", bindparam("m_week", type_=at)),
        else_=months,
    )


def _budgets(w: _Writer, cost: Cost, *, hold: bool = False) -> None:
    """Each budget of the call's meters that applies, debited (``hold``: its
    ``held`` raised) by primary key in id order after its rollover; one without
    room: named in ``v_bad``, leave."""
    b = budgets.c
    w.text("SET v_step = 2;")
    cursor = (
        select(b.id, b.period, b.anchor_day)
        .where(applies_to_row(budgets, K), b.meter.in_(cost.meters))
        .order_by(b.id)
    )
    c = compiled(cursor, w.dialect)
    w.parts.append(c)
    w.lines.append(f"FOR r IN ({c.sql}) DO")
    period: Any = literal_column("r.period")
    anchor: Any = literal_column("r.anchor_day")
    w.stmt(select(_current_start(period, anchor)), ")", prefix="SET v_start = (")
    new_period = b.period_start < START
    eff_used = case((new_period, big(0)), else_=b.used_micros)
    eff_credit = case((new_period, big(0)), else_=b.credit_micros)
    amount = cost.on(b.meter)
    w.stmt(
        update(budgets)
        .where(b.id == BUDGET, eff_used + b.held_micros + amount <= b.limit_micros + eff_credit)
        .ordered_values(  # period_start last: the CASEs read the stored one
            (b.used_micros, eff_used if hold else eff_used + amount),
            (b.held_micros, b.held_micros + amount if hold else b.held_micros),
            (b.credit_micros, eff_credit),
            (b.period_start, case((new_period, START), else_=b.period_start)),
        )
    )
    w.text("IF ROW_COUNT() <> 1 THEN SET v_bad = r.id; LEAVE decide; END IF;")
    w.text("SET v_ids = CONCAT(v_ids, r.id, ' ');")
    w.text("END FOR;")


def _debited(cost: Cost) -> Any:
    b = budgets.c
    return and_(
        applies_to_row(budgets, K),
        b.meter.in_(cost.meters),
        func.instr(DEBITED, func.concat(" ", b.id, " ")) > 0,
    )


def _ledger(w: _Writer, cost: Cost, *, hold: bool = False, idempotent: bool = False) -> None:
    """``keycap._rules.movements.charges`` (``hold``: ``holds``) as one INSERT: an
    entry per budget debited (primary: the first of its meter), and for a charge
    one for each meter no budget took (a hold on no budget holds nothing);
    ``idempotent``: each with the call's idempotency key."""
    b = budgets.c
    metadata = bindparam("m_metadata", type_=JSONText())
    none = null()
    idem = operations.OP_KEY if idempotent else none
    first = func.row_number().over(partition_by=b.meter, order_by=b.id) == 1
    amount = cost.on(b.meter)
    budgeted = select(
        b.org_id,
        K.project_id,
        K.id,
        b.id,
        HOLD_ID if hold else none,
        b.meter,
        literal("hold" if hold else "charge"),
        amount,
        big(0) if hold else amount,
        amount if hold else big(0),
        b.period_start,
        first,
        idem,
        case((first, metadata), else_=null()),
        NOW,
    ).where(_debited(cost))
    if hold:
        w.stmt(insert(ledger).from_select(ENTRY_COLUMNS, budgeted))
        return
    unbudgeted = [
        select(
            K.org_id,
            K.project_id,
            K.id,
            none,
            none,
            meter,
            literal("charge"),
            amount,
            amount,
            big(0),
            none,
            true(),
            idem,
            metadata,
            NOW,
        ).where(~exists(select(b.id).where(_debited(cost), b.meter == meter)))
        for meter, amount in zip(cost.meters, cost.amounts, strict=True)
    ]
    w.stmt(insert(ledger).from_select(ENTRY_COLUMNS, union_all(budgeted, *unbudgeted)))


def _unless_replayed(w: _Writer, scope: Any) -> None:
    """An idempotent call: leave at once when its idempotency key (scoped to
    ``scope``) has a committed operation (:data:`REPLAYED`); it is read in the
    ending."""
    w.text(f"SET v_step = {REPLAYED};")
    w.stmt(select(func.count()).select_from(operations.prior(scope).subquery()), into="v_n")
    w.text("IF v_n > 0 THEN LEAVE decide; END IF;")
    w.text(f"SET v_step = {KEY_REFUSED};")


def _claim(w: _Writer, org_id: Any, scope: Any, where: Any = None) -> None:
    """The call's operation row (scoped to ``scope``, the key's or the hold's id),
    after the row's lock: a duplicate committed since :func:`_unless_replayed`
    (or in flight, then committed) fails the block on the unique index, and the
    caller replays it (``Conflict``)."""
    w.stmt(operations.claiming(org_id, scope, null(), where))


def _store_result(w: _Writer, moved: Any, *, closing: bool = False) -> None:
    """The operation's result, as ``keycap._db.operations`` stores a statement's:
    its head, the rows after of the budgets ``moved`` selects, and (``closing``)
    the hold's row after."""
    b, h, o = budgets.c, holds.c, operations_table.c
    after = func.json_object(*operations.fields(budgets, b))
    rows = select(func.concat("[", func.coalesce(func.group_concat(after), ""), "]"))
    parts = [operations.OP_HEAD, rows.where(moved).scalar_subquery()]
    if closing:
        hold = select(func.json_object(*operations.fields(holds, h))).where(h.id == HOLD_ID)
        parts += [literal(operations.HOLD_AFTER), hold.scalar_subquery()]
    text = func.concat(*parts, "}")
    w.stmt(update(operations_table).where(o.id == operations.OP_ID).values({o.result: text}))


def _ending(
    w: _Writer, *, key: Any, cost: Cost, with_rates: bool, idempotent: bool = False
) -> None:
    """``step`` 3: the key, its rate limits and budgets after, and COMMIT; else the
    refused budget (if a budget refused) and ROLLBACK. The first result set is
    always the step."""
    k, b = keys.c, budgets.c
    w.text("SET v_step = 3;")
    w.text("END decide;")
    w.result(
        "step",
        select(literal_column("v_step").label("step"), *(K[name].label(name) for name in K.names)),
    )
    w.text("IF v_step = 3 THEN")
    w.result("key", select(*KEY_COLUMNS, k.pepper_id).where(k.id == key))
    if with_rates:
        w.result(
            "rate_limits",
            select(rate_limits).where(applies_to_row(rate_limits, K)).order_by(rate_limits.c.id),
        )
    if cost.meters:
        w.result("budgets", select(budgets).where(_debited(cost)).order_by(b.id))
    w.text("COMMIT;")
    w.text("ELSE")
    if idempotent:
        w.text(f"IF v_step = {REPLAYED} THEN")
        w.result("prior", operations.prior(KEY_ID))
        w.text("END IF;")
    if cost.meters:
        expired = has_expired_holds(b.id, w.dialect.name)
        w.text("IF v_bad IS NOT NULL THEN")
        w.result(
            "refused",
            select(budgets, expired.label("expired_holds"))
            .where(b.id == literal_column("v_bad"))
            .with_for_update(),
        )
        w.text("END IF;")
    w.text("ROLLBACK;")
    w.text("END IF;")
    w.text("END")


@lru_cache(maxsize=512)
def validation_block(
    dialect: Dialect, req: Requirement, peppers: tuple[str, ...], meter_count: int, track: bool
) -> Block:
    """A metered validation (or a rate-limited one, ``meter_count`` 0) as one block."""
    k = keys.c
    _, digests, _ = hot_binds(peppers)
    cost = Cost(meter_count)
    w = _Writer(dialect)
    _declarations(w)
    w.stmt(
        update(keys)
        .where(k.id == KEY_ID, grant_predicate(digests, req, NOW, dialect.name), usage_cap_open())
        .ordered_values(*metered_use(track, NOW))
    )
    w.text("IF ROW_COUNT() <> 1 THEN LEAVE decide; END IF;")
    _key_variables(w, KEY_ID)
    _rate_limits(w, meter_count)
    if meter_count:
        _budgets(w, cost)
        _ledger(w, cost)
    _ending(w, key=KEY_ID, cost=cost, with_rates=True)
    return w.block()


@lru_cache(maxsize=64)
def charge_block(dialect: Dialect, meter_count: int, idempotent: bool = False) -> Block:
    """A charge of ``meter_count`` meters as one block: the key live (its row
    locked; ``last_used_at`` moved when over ``LAST_USED_STEP`` old), every budget
    debited, the ledger; ``idempotent``: its operation's row, or the earlier
    call's found instead (:data:`REPLAYED`)."""
    cost = Cost(meter_count)
    w = _Writer(dialect)
    _declarations(w)
    if idempotent:
        _unless_replayed(w, KEY_ID)
    _live_key(w)
    if idempotent:
        _claim(w, K.org_id, KEY_ID)
    _budgets(w, cost)
    _ledger(w, cost, idempotent=idempotent)
    if idempotent:
        _store_result(w, _debited(cost))
    _ending(w, key=KEY_ID, cost=cost, with_rates=False, idempotent=idempotent)
    return w.block()


@lru_cache(maxsize=2)
def reserve_block(dialect: Dialect, idempotent: bool = False) -> Block:
    """A hold of one meter's amount as one block: the charge's key and budget steps
    with ``held`` raised instead of ``used``, the hold's row, its ledger entries
    (``idempotent``: as :func:`charge_block`)."""
    cost = Cost(1)
    w = _Writer(dialect)
    _declarations(w)
    if idempotent:
        _unless_replayed(w, KEY_ID)
    _live_key(w)
    if idempotent:
        _claim(w, K.org_id, KEY_ID)
    _budgets(w, cost, hold=True)
    h = holds.c
    listed = case((DEBITED == " ", literal("  ")), else_=DEBITED)
    w.stmt(
        insert(holds).values(
            {
                h.id: HOLD_ID,
                h.org_id: K.org_id,
                h.project_id: K.project_id,
                h.key_id: KEY_ID,
                h.meter: cost.meters[0],
                h.amount_micros: cost.amounts[0],
                h.budget_ids: listed,
                h.status: "open",
                h.created_at: NOW,
                h.expires_at: bindparam("m_expires_at", type_=UTCDateTime()),
                h.on_expiry: bindparam("m_on_expiry", type_=h.on_expiry.type),
            }
        )
    )
    _ledger(w, cost, hold=True, idempotent=idempotent)
    if idempotent:
        _store_result(w, _debited(cost))
    _ending(w, key=KEY_ID, cost=cost, with_rates=False, idempotent=idempotent)
    return w.block()


@lru_cache(maxsize=8)
def closing_block(dialect: Dialect, settle: bool, idempotent: bool = False) -> Block:
    """A hold closed as one block: released (``m_status``: ``released`` or
    ``expired``), or with ``settle`` settled for ``m_actual`` within its amount
    (``keycap._db.metering.closing_statement``'s twin).

    The hold's row is closed first, if open (and, settling, if ``m_actual`` is
    within it): its UPDATE reads the newest version under the row's lock, so
    only one closing wins; nothing after it can refuse. Then each budget of its
    ``budget_ids`` (in id order, as the reserve wrote them) is taken off the hold
    by primary key, ``m_actual`` of it spent, after its rollover, with its ledger
    entry (the first primary); a settlement on no budget gets a budget-less one.
    Result sets: the step, then (closed) the hold's row after and one set per
    budget after it. ``idempotent``: as :func:`charge_block`, keyed by the hold
    (:data:`REPLAYED`: the step, then the earlier call's operation)."""
    h, b = holds.c, budgets.c
    actual = int_param("m_actual")
    w = _Writer(dialect)
    w.text("BEGIN NOT ATOMIC")
    w.text(f"DECLARE v_rest TYPE OF {holds.name}.budget_ids;")
    w.text(f"DECLARE v_id TYPE OF {budgets.name}.id;")
    w.text("DECLARE v_step INT DEFAULT 0;")
    w.text("DECLARE v_first INT DEFAULT 1;")
    w.text("DECLARE v_start DATETIME(6);")
    w.text("DECLARE v_n INT DEFAULT 0;")
    w.text("START TRANSACTION;")
    w.text("decide: BEGIN")
    if idempotent:
        _unless_replayed(w, HOLD_ID)
    closing = (
        update(holds)
        .where(h.id == HOLD_ID, h.status == "open")
        .values(status=bindparam("m_status", type_=h.status.type), closed_at=NOW)
    )
    if settle:
        closing = closing.where(h.amount_micros >= actual).values(settled_micros=actual)
    w.stmt(closing)
    w.text("IF ROW_COUNT() <> 1 THEN LEAVE decide; END IF;")
    if idempotent:
        _claim(w, h.org_id, HOLD_ID, h.id == HOLD_ID)
    w.text(f"SET v_step = {DONE};")
    w.result("step", select(literal_column("v_step").label("step")))
    w.result("hold", select(holds).where(h.id == HOLD_ID))
    w.stmt(select(h.budget_ids).where(h.id == HOLD_ID), into="v_rest")
    w.text("SET v_rest = TRIM(v_rest);")
    w.text("WHILE v_rest <> '' DO")
    w.text("SET v_id = SUBSTRING_INDEX(v_rest, ' ', 1);")
    w.text("SET v_rest = TRIM(SUBSTRING(v_rest, CHAR_LENGTH(v_id) + 1));")
    at: Any = literal_column("v_id")
    w.stmt(select(_current_start(b.period, b.anchor_day)).where(b.id == at), into="v_start")
    new_period = b.period_start < START
    held = select(h.amount_micros).where(h.id == HOLD_ID).scalar_subquery()
    w.stmt(
        update(budgets)
        .where(b.id == at)
        .ordered_values(  # period_start last: the CASEs read the stored one
            (
                b.used_micros,
                case((new_period, big(0)), else_=b.used_micros) + (actual if settle else big(0)),
            ),
            (b.held_micros, b.held_micros - held),
            (b.credit_micros, case((new_period, big(0)), else_=b.credit_micros)),
            (b.period_start, case((new_period, START), else_=b.period_start)),
        )
    )
    w.text("IF ROW_COUNT() = 1 THEN")  # a budget deleted since the reserve: skipped
    kind = literal("settle") if settle else bindparam("m_kind", type_=ledger.c.kind.type)
    amount = actual if settle else h.amount_micros
    idem = operations.OP_KEY if idempotent else null()
    entry = select(
        b.org_id,
        h.project_id,
        h.key_id,
        b.id,
        h.id,
        h.meter,
        kind,
        amount,
        actual if settle else big(0),
        -h.amount_micros,
        b.period_start,
        literal_column("v_first") == 1,
        idem,
        null(),
        NOW,
    ).where(b.id == at, h.id == HOLD_ID)
    w.stmt(insert(ledger).from_select(ENTRY_COLUMNS, entry))
    w.text("SET v_first = 0;")
    w.result("budget", select(budgets).where(b.id == at))
    w.text("END IF;")
    w.text("END WHILE;")
    if settle:
        unbudgeted = select(
            h.org_id,
            h.project_id,
            h.key_id,
            null(),
            h.id,
            h.meter,
            literal("settle"),
            actual,
            actual,
            big(0),
            null(),
            true(),
            idem,
            null(),
            NOW,
        ).where(h.id == HOLD_ID, literal_column("v_first") == 1)
        w.stmt(insert(ledger).from_select(ENTRY_COLUMNS, unbudgeted))
    if idempotent:
        listed = select(h.budget_ids).where(h.id == HOLD_ID).scalar_subquery()
        _store_result(w, func.instr(listed, func.concat(" ", b.id, " ")) > 0, closing=True)
    w.text("END decide;")
    w.text(f"IF v_step = {DONE} THEN COMMIT; ELSE")
    w.text("SELECT v_step AS step;")
    if idempotent:
        w.text(f"IF v_step = {REPLAYED} THEN")
        w.result("prior", operations.prior(HOLD_ID))
        w.text("END IF;")
    w.text("ROLLBACK; END IF;")
    w.text("END")
    return w.block()


async def close_hold(
    run: RunBlock,
    dialect: Dialect,
    hold_id: str,
    status: str,
    now: datetime,
    actual: int | None = None,
    claim: Mapping[str, Any] | None = None,
) -> tuple[HotRow, list[HotRow]] | operations.Prior | None:
    """Run :func:`closing_block`: the hold's row after closing and its budgets' rows
    after, in id order; None when it did not close the hold (not open, or,
    settling, ``actual`` is above its amount). With ``claim``
    (``keycap._db.operations.claim_params``) the call is idempotent: what the
    earlier call stored, when there is one."""
    block = closing_block(dialect, actual is not None, claim is not None)
    params = metering.closing_params(hold_id, status, now, actual)
    sets = await run(block.sql, block.args(flat({**params, **(claim or {})})))
    readers = dict(block.sets)
    step = int(sets[0][0][0]) if sets[0] else None
    if step == REPLAYED:
        return _prior(readers, sets)
    if step != DONE:
        return None
    hold = readers["hold"].row(sets[1][0])
    after = [readers["budget"].row(rows[0]) for rows in sets[2:] if rows]
    return hold, sorted(after, key=lambda row: str(row.id))


def _live_key(w: _Writer) -> None:
    """The key of ``m_key_id``, if live, locked (``last_used_at`` moved when over
    ``LAST_USED_STEP`` old), and its ids in the block's variables; else leave."""
    k = keys.c
    stale = or_(
        k.last_used_at.is_(None), k.last_used_at <= bindparam("m_used_before", type_=UTCDateTime())
    )
    w.stmt(
        update(keys)
        .where(k.id == KEY_ID, *key_is_live_now(NOW))
        .values(last_used_at=case((stale, NOW), else_=k.last_used_at))
    )
    w.text("IF ROW_COUNT() <> 1 THEN LEAVE decide; END IF;")
    _key_variables(w, KEY_ID)


def flat(params: dict[str, Any]) -> dict[str, Any]:
    """``keycap._db.metering``'s parameters for a block: its array of month starts
    (``m_months``, a PostgreSQL ARRAY) as one bind per anchor day, ``m_month_1``
    to ``m_month_31`` (:func:`_current_start`)."""
    months = params.pop("m_months")
    params.update({f"m_month_{day}": start for day, start in enumerate(months, start=1)})
    return params


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a block decided (``step``: :data:`DONE`, or how far it got) and its rows:
    the key after, its rate limits and budgets after (in id order), or the
    budget that refused as it was locked (with ``expired_holds``)."""

    step: int
    #: The key's ids (None: the key itself was refused).
    ref: KeyRef | None = None
    key: HotRow | None = None
    rate_limits: Sequence[HotRow] = ()
    budgets: Sequence[HotRow] = ()
    refused_budget: HotRow | None = None
    #: :data:`REPLAYED`: what the earlier call stored.
    prior: operations.Prior | None = None

    @classmethod
    def of(cls, block: Block, sets: Sequence[Sequence[Any]]) -> Outcome:
        readers = dict(block.sets)
        first = readers["step"].row(sets[0][0])
        step = int(first.step)
        if step == REPLAYED:
            return cls(step, prior=_prior(readers, sets))
        ref = KeyRef.of(first.id, first) if step != KEY_REFUSED else None
        if step == DONE:
            read = {
                name: [c.row(record) for record in records]
                for (name, c), records in zip(block.sets[1:], sets[1:], strict=False)
                if name != "refused"
            }
            return cls(
                step,
                ref=ref,
                key=read["key"][0],
                rate_limits=read.get("rate_limits", []),
                budgets=read.get("budgets", []),
            )
        if step == BUDGET_REFUSED and len(sets) > 1 and sets[1]:
            return cls(step, ref=ref, refused_budget=readers["refused"].row(sets[1][0]))
        return cls(step, ref=ref)


def _prior(readers: Mapping[str, Compiled], sets: Sequence[Sequence[Any]]) -> operations.Prior:
    """A :data:`REPLAYED` block's second result set: the earlier call's operation."""
    found = readers["prior"].row(sets[1][0])
    return operations.Prior(found.result, found.request_hash)


#: How a block is run: ``Database.block``, one round trip, its result sets.
RunBlock = Callable[[str, list[Any]], Awaitable[list[list[Any]]]]


async def validate_in_block(
    run: RunBlock,
    dialect: Dialect,
    key_id: str,
    digests: Mapping[str, str],
    req: Requirement,
    amounts: Mapping[str, int],
    track: bool,
    now: datetime,
    now_ms: int,
    client: ips.Address | None,
) -> Outcome:
    """A metered (or rate-limited) validation in one round trip."""
    block = validation_block(dialect, req, tuple(digests), len(amounts), track)
    params = flat(metering.validation_params(key_id, digests, amounts, now, now_ms, client))
    return Outcome.of(block, await run(block.sql, block.args(params)))


async def spend(run: RunBlock, block: Block, params: dict[str, Any]) -> Outcome:
    """A charge's or reserve's block (:func:`charge_block`, :func:`reserve_block`)
    in one round trip; ``params``: ``keycap._db.metering.charge_params`` or
    ``reserve_params``, and ``keycap._db.operations.claim_params`` when it is
    idempotent."""
    return Outcome.of(block, await run(block.sql, block.args(flat(params))))
