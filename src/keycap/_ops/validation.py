"""Metered validation: the key, every rate limit, the usage cap and every
budget, in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from keycap._db import blocks, keys, metering, rate_limits
from keycap._db.build import AnyRow, KeyRef
from keycap._db.engine import Database
from keycap._errors import DatabaseError
from keycap._models import BudgetAlert, Charge, RateLimitStatus
from keycap._ops.charges import charge_in, charged
from keycap._ops.refusals import REFUSED_ATTEMPTS, refused_error
from keycap._ops.results import AlertHandler, deliver, epoch_ms, tightest_rate
from keycap._ops.units import (
    BudgetRefused,
    KeyRefused,
    RateRefused,
    Refused,
    retrying,
    together,
)
from keycap._rules import ips
from keycap._rules.policy import Requirement


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
    client: ips.Address | None = None,
) -> tuple[AnyRow, RateLimitStatus | None, Charge | None] | None:
    """Validation, every rate limit, the usage cap and every budget, in one transaction.

    Returns None when the key itself was refused (the caller diagnoses it);
    raises RateLimitedError or BudgetExceededError naming what refused.
    """

    async def at_once() -> Done:
        done = await metering.validate_at_once(
            db.statement, key_id, digests, req, amounts, track, now, epoch_ms(now), client
        )
        if not done.ok:
            if not done.key_found:
                raise KeyRefused()
            key = done.ref
            if done.rates_ok:
                raise BudgetRefused(row=done.refused_budget, key=key)
            raise RateRefused(row=done.refused_rate, key=key)
        assert done.key is not None
        tightest = tightest_rate(done.rate_limits, now)
        charge_result = None
        if amounts:
            debited = [(row, amounts[row.meter]) for row in done.budgets]
            charge_result = charged(key_id, amounts, debited, now)
        alerts = charge_result.alerts if charge_result is not None else ()
        return done.key, tightest, charge_result, alerts

    async def in_block() -> Done:
        done = await blocks.validate_in_block(
            db.block,
            db.engine.dialect,
            key_id,
            digests,
            req,
            amounts,
            track,
            now,
            epoch_ms(now),
            client,
        )
        if done.step == blocks.KEY_REFUSED:
            raise KeyRefused()
        if done.step == blocks.RATE_REFUSED:
            raise RateRefused(key=done.ref)
        if done.step != blocks.DONE:
            raise BudgetRefused(row=done.refused_budget, key=done.ref)
        assert done.key is not None
        charge_result = None
        if amounts:
            debited = [(row, amounts[row.meter]) for row in done.budgets]
            charge_result = charged(key_id, amounts, debited, now)
        alerts = charge_result.alerts if charge_result is not None else ()
        return done.key, tightest_rate(done.rate_limits, now), charge_result, alerts  # type: ignore[return-value]

    async def unit() -> Done:
        async with db.begin() as conn:
            key_row = await keys.record_metered_use(
                conn, key_id, digests, req, now, track=track, client=client
            )
            if key_row is None:
                raise KeyRefused()
            key = KeyRef.of(key_id, key_row)
            limits = await rate_limits.consume_rates(
                conn, key, amounts, epoch_ms(now), key_row.rate_limit_count
            )
            if limits is None:
                raise RateRefused(key=key)
            charge_result = await charge_in(conn, key, amounts, now) if amounts else None
            tightest = tightest_rate(limits, now)
            alerts = charge_result.alerts if charge_result is not None else ()
            return key_row, tightest, charge_result, alerts

    path = at_once if db.one_statement else in_block if db.one_block else unit

    async def attempt() -> tuple[Done | None, Exception | None]:
        """The call, or why it was refused (None and None: the key itself, which
        the explain stage says; or room after all, and it goes again)."""
        try:
            return await retrying(db, path), None
        except KeyRefused:
            return None, _KEY_REFUSED
        except Refused as refused:
            return None, await refused_error(db, refused, amounts, now, key_id)

    for _ in range(REFUSED_ATTEMPTS):
        done, error = await together(db, attempt)  # on SQLite, with its refusal: one hop
        if error is _KEY_REFUSED:
            return None  # the explain stage says why
        if error is not None:
            raise error
        if done is None:
            continue
        key_row, tightest, charge_result, alerts = done
        await deliver(alerts, on_alert)
        return key_row, tightest, charge_result
    raise DatabaseError("the budgets kept changing during validation; try again")


#: A validation's result inside it: the key's row, its tightest rate limit, its
#: charge, and the alerts to deliver once it is committed.
Done = tuple[AnyRow, RateLimitStatus | None, Charge | None, tuple[BudgetAlert, ...]]
#: The key itself refused the call.
_KEY_REFUSED = KeyRefused()
