"""An identity metered without a key: the validation of an identity your app has
authenticated itself, with the same hard limits as a key's.

``charge`` and ``reserve`` take an identity id in place of a key id (see
``keycap._ops.units.live_key``); this is the third call, the validation: the
identity is live, and every rate limit of the identity and its organization
admits the call, and (with a cost) every budget takes it, all in one
transaction under the identity's row lock, or nothing is consumed.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from keycap._db import rate_limits, rows, tenancy
from keycap._db.build import KeyRef
from keycap._db.engine import Database
from keycap._errors import DatabaseError
from keycap._models import Identity
from keycap._ops.charges import charge_in
from keycap._ops.refusals import REFUSED_ATTEMPTS, refused_error
from keycap._ops.results import AlertHandler, deliver, epoch_ms, tightest_rate
from keycap._ops.units import KeyRefused, RateRefused, Refused, retrying


async def validate(
    db: Database,
    identity_id: str,
    amounts: Mapping[str, int],
    now: datetime,
    on_alert: AlertHandler | None,
) -> Identity:
    """The identity, with its tightest rate limit and its charge after the call.

    Raises: NotFoundError, DisabledKeyError (``identity=True``), RateLimitedError,
    BudgetExceededError."""

    async def unit() -> Identity:
        async with db.begin() as conn:
            row = await tenancy.lock_identity_row(conn, identity_id)
            if row is None:
                raise KeyRefused()
            key = KeyRef.of_identity(identity_id, row.org_id)
            count = len(await rate_limits.applicable_rate_limits(conn, key))
            limits = await rate_limits.consume_rates(conn, key, amounts, epoch_ms(now), count)
            if limits is None:
                raise RateRefused(key=key)
            charged = await charge_in(conn, key, amounts, now) if amounts else None
            return rows.to_identity(row).model_copy(
                update={"rate_limit": tightest_rate(limits, now), "charge": charged}
            )

    for _ in range(REFUSED_ATTEMPTS):
        try:
            found = await retrying(db, unit)
        except Refused as refused:
            error = await refused_error(db, refused, amounts, now, identity_id)
            if error is not None:
                raise error from None
            continue
        if found.charge is not None:
            await deliver(found.charge.alerts, on_alert)
        return found
    raise DatabaseError("the identity's limits kept changing during validation; try again")
