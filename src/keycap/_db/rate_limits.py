"""The rate_limits table: administration, and every limit that applies to a key
consumed in one UPDATE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, case, delete, false, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.build import (
    AnyRow,
    Changing,
    Execute,
    KeyRef,
    big,
    changed_rows,
    changing,
    int_param,
    key_params,
)
from keycap._db.grant import applies_to_key
from keycap._db.schema import rate_limits
from keycap._db.tenancy import Subject
from keycap._rules import ids
from keycap._rules import rate_limits as ratelimit


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


async def insert_rate_limits(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
    """A second limit of the same name on the same subject is a Conflict."""
    if rows:
        await conn.execute(insert(rate_limits), list(rows))


async def change_rate_limit(conn: AsyncConnection, row: Mapping[str, Any]) -> None:
    """Give the limit named ``row["name"]`` on ``row["subject_id"]`` the meter, limit
    and window of ``row``. Changing the window starts counting afresh."""
    rl = rate_limits.c
    same = rl.window_ms == row["window_ms"]
    await conn.execute(
        update(rate_limits)
        .where(rl.subject_id == row["subject_id"], rl.name == row["name"])
        .ordered_values(  # window_ms last: the CASEs read the old one on MySQL too
            (rl.window_start, case((same, rl.window_start), else_=0)),
            (rl.current_units, case((same, rl.current_units), else_=0)),
            (rl.previous_units, case((same, rl.previous_units), else_=0)),
            (rl.meter, row["meter"]),
            (rl.limit_units, row["limit_units"]),
            (rl.window_ms, row["window_ms"]),
        )
    )


async def get_rate_limit(conn: AsyncConnection, subject_id: str, name: str) -> AnyRow | None:
    rl = rate_limits.c
    stmt = select(rate_limits).where(rl.subject_id == subject_id, rl.name == name)
    return (await conn.execute(stmt)).first()


async def rate_limits_of(conn: AsyncConnection, subject_id: str) -> Sequence[AnyRow]:
    """The limits attached directly to a key, project or organization, in id order."""
    rl = rate_limits.c
    stmt = select(rate_limits).where(rl.subject_id == subject_id).order_by(rl.id)
    return (await conn.execute(stmt)).all()


async def delete_rate_limit(conn: AsyncConnection, subject_id: str, name: str) -> bool:
    rl = rate_limits.c
    result = await conn.execute(
        delete(rate_limits).where(rl.subject_id == subject_id, rl.name == name)
    )
    return bool(result.rowcount)


# --- rate limits ----------------------------------------------------------------------


async def applicable_rate_limits(conn: AsyncConnection, key: KeyRef) -> Sequence[AnyRow]:
    """The rate limits that apply to the key, in id order (to explain a refusal)."""
    return (await conn.execute(_rate_limits_of(), key_params(key))).all()


async def read_applicable(read: Execute, key: KeyRef) -> Sequence[AnyRow]:
    """:func:`applicable_rate_limits` as one statement on its own (``Database.read_rows``:
    one round trip, on MariaDB too)."""
    return await read(_rate_limits_of(), key_params(key))


@lru_cache(maxsize=1)
def _rate_limits_of() -> Any:
    return select(rate_limits).where(applies_to_key(rate_limits)).order_by(rate_limits.c.id)


async def consume_rates(
    conn: AsyncConnection,
    key: KeyRef,
    amounts: Mapping[str, int],
    now_ms: int,
    count: int,
    calls: int = 1,
) -> list[AnyRow] | None:
    """Consume every rate limit that applies to the key (its own, its project's,
    its organization's) in one UPDATE: the sliding-window inequality of
    ``keycap._rules.rate_limits.admits``, decided per row in its WHERE. Returns the rows
    after it, in id order; or None when fewer than ``count`` (the number of
    limits counted by the key's UPDATE, earlier in this transaction) were
    admitted: refused, and the caller rolls back.

    What a call consumes is :func:`call_cost` (a row it costs nothing always
    passes); a lease's slice of ``calls`` calls consumes that many of a plain
    limit, and ``amounts`` are then the whole slice's. The window arithmetic
    is :func:`window_step`, decided on the row as it is under the UPDATE's
    lock.
    """
    if not count:
        return []
    params: dict[str, Any] = {**key_params(key), "m_now_ms": now_ms}
    for i, (meter, amount) in enumerate(amounts.items()):
        params[f"m_rate_meter_{i}"] = meter
        params[f"m_rate_units_{i}"] = amount
    if calls != 1:
        params["m_rate_calls"] = calls
    stmt = _consume_rates(len(amounts), calls != 1)
    return await changed_rows(conn, stmt, params, count)


async def give_back(conn: AsyncConnection, limit: AnyRow, units: int) -> None:
    """Uncount ``units`` a slice consumed of ``limit`` (its row after the slice) and
    never spent: from the window it was counted in, whether that is still the
    current one or has become the previous one; past that it no longer counts."""
    if units <= 0:
        return
    c = rate_limits.c
    start = limit.window_start
    for column, at in ((c.current_units, start), (c.previous_units, start + limit.window_ms)):
        done = await conn.execute(
            update(rate_limits)
            .where(c.id == limit.id, c.window_start == at, column >= units)
            .values({column: column - units})
        )
        if done.rowcount:
            return


@lru_cache(maxsize=16)
def _consume_rates(meter_count: int, sliced: bool = False) -> Changing:
    c = rate_limits.c
    meters = [bindparam(f"m_rate_meter_{i}", type_=c.meter.type) for i in range(meter_count)]
    units = [int_param(f"m_rate_units_{i}") for i in range(meter_count)]
    calls = int_param("m_rate_calls") if sliced else big(1)
    step = window_step(c, call_cost(c, meters, units, calls), int_param("m_now_ms"))
    stmt = (
        update(rate_limits)
        .where(applies_to_key(rate_limits), step.admits)
        .ordered_values(  # window_start last: the CASEs above read the stored one
            (c.previous_units, step.previous_units),
            (c.current_units, step.current_units),
            (c.window_start, step.window_start),
        )
    )
    reread = select(rate_limits).where(applies_to_key(rate_limits)).order_by(c.id)
    return changing(stmt, reread)


def call_cost(c: Any, meters: Sequence[Any], units: Sequence[Any], calls: Any = None) -> Any:
    """What one call consumes of the limit of columns ``c``: one unit of a plain
    limit (``calls`` units for a slice of that many), the call's cost on the
    meter of a metered one (``units[i]`` of ``meters[i]``; none if it has no
    cost on that meter)."""
    return case(
        (c.meter.is_(None), big(1) if calls is None else calls),
        *((c.meter == meter, unit) for meter, unit in zip(meters, units, strict=True)),
        else_=big(0),
    )


@dataclass(frozen=True, slots=True)
class WindowStep:
    """One call's step of a rate limit's sliding window, as SQL over its columns:
    whether it admits the call, and the counters after it."""

    admits: Any
    previous_units: Any
    current_units: Any
    window_start: Any


def window_step(c: Any, cost: Any, now_ms: Any) -> WindowStep:
    """The sliding-window step of ``keycap._rules.rate_limits`` for the limit of
    columns ``c`` (the table's, or a CTE's), a call of ``cost`` at ``now_ms``.

    The window arithmetic of ``keycap._rules.rate_limits.view`` is done from the
    row's own ``window_ms`` and the client's clock, in integers, so it gives
    exactly the numbers the Python side computes; which counters the weight
    applies to depends on the stored ``window_start``, chosen by the CASEs."""
    win, r = c.window_ms, big(ratelimit.RESOLUTION)
    into = now_ms % win  # how far into its current window the clock is
    at = now_ms - into
    weight = ((win - into) * r + win - big(1)) // win  # ceil, as ratelimit.view
    ahead, same = c.window_start > at, c.window_start == at
    previous = c.window_start == at - win
    weighted_previous = case(
        (ahead, c.previous_units * r),
        (same, c.previous_units * weight),
        (previous, c.current_units * weight),
        else_=big(0),
    )
    current = case((c.window_start >= at, c.current_units), else_=big(0))
    # The cheap test first, in a CASE (evaluated in order on every database): past it,
    # current + cost <= limit, so no product below can leave 64 bits
    # (keycap._rules.rate_limits.MAX_LIMIT_UNITS).
    fits = case(
        (current + cost > c.limit_units, false()),
        else_=weighted_previous + (current + cost) * r <= c.limit_units * r,
    )
    return WindowStep(
        admits=or_(cost == big(0), fits),
        previous_units=case(
            (c.window_start >= at, c.previous_units),
            (previous, c.current_units),
            else_=big(0),
        ),
        current_units=current + cost,
        window_start=case((ahead, c.window_start), else_=at),
    )
