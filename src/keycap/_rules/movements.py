"""How money moves: the split of a settlement, and the ledger entry of each movement.

Every change to a budget's ``used`` or ``held`` is written to the ledger in the
same transaction, one entry per budget it touched, with the deltas it applied:
so the sum of a budget's entries is its balance. One call's entries for one
meter are alike but for the budget; the first is *primary*, and usage reports
count primary entries only, so a charge seen by a key, a project and an
organization budget is reported once. A meter that no budget applies to still
gets one budget-less entry (:func:`unbudgeted`): spending is recorded even
where it is not capped.

An entry is a dict of the ledger table's columns. Nothing here reads a clock
or the database.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

Entry = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Origin:
    """What every entry of one call shares: when, whose, and which call."""

    now: datetime
    org_id: str
    key_id: str | None = None
    project_id: str | None = None
    hold_id: str | None = None
    idempotency_key: str | None = None
    #: The caller's metadata, written on primary entries only.
    metadata: Mapping[str, Any] | None = None


# --- the settlement split ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SettleSplit:
    """Where the ``actual`` cost of a hold of ``held`` goes.

    ``within`` (at most the hold) is charged from the hold and ``returned`` is the
    rest of the hold, given back. The ``excess`` beyond the hold is charged as far
    as it ``fits`` every budget; what does not fit is the ``shortfall``, recorded,
    never dropped.
    """

    held: int
    within: int
    returned: int
    excess: int
    fits: int
    shortfall: int

    @property
    def charged(self) -> int:
        return self.within + self.fits

    def nothing_beyond_the_hold(self) -> SettleSplit:
        """The same settlement when the excess may not be charged at all (the key is
        no longer live): all of it is shortfall."""
        return replace(self, fits=0, shortfall=self.excess)


def split_settlement(held: int, actual: int, room: int | None) -> SettleSplit:
    """Split ``actual`` against a hold of ``held``. ``room`` is the least any of the
    hold's budgets can still take once the hold is returned and ``within`` charged;
    None when no budget applies, so the whole excess fits."""
    within = min(actual, held)
    excess = actual - within
    fits = excess if room is None else max(0, min(excess, room))
    return SettleSplit(
        held=held,
        within=within,
        returned=held - within,
        excess=excess,
        fits=fits,
        shortfall=excess - fits,
    )


# --- the entries ------------------------------------------------------------------------


def charge(origin: Origin, budget: Any, amount: int, *, primary: bool) -> Entry:
    """``amount`` spent from ``budget``."""
    return _entry(origin, budget, "charge", amount, used=amount, held=0, primary=primary)


def hold(origin: Origin, budget: Any, amount: int, *, primary: bool) -> Entry:
    """``amount`` reserved on ``budget``."""
    return _entry(origin, budget, "hold", amount, used=0, held=amount, primary=primary)


def release(
    origin: Origin, budget: Any, amount: int, *, primary: bool, expired: bool = False
) -> Entry:
    """A hold of ``amount`` given back to ``budget`` unused (``expired``: by its ttl)."""
    kind = "expiry" if expired else "release"
    return _entry(origin, budget, kind, amount, used=0, held=-amount, primary=primary)


def settle(origin: Origin, budget: Any, split: SettleSplit, *, primary: bool) -> Entry:
    """A hold taken off ``budget``, ``split.within`` of it spent."""
    within = split.within
    return _entry(origin, budget, "settle", within, used=within, held=-split.held, primary=primary)


def unbudgeted(origin: Origin, kind: str, meter: str, amount: int) -> Entry:
    """``amount`` of ``meter`` spent (a charge or settle) where no budget applies."""
    return _entry(origin, None, kind, amount, used=amount, held=0, primary=True, meter=meter)


def shortfall(origin: Origin, meter: str, amount: int) -> Entry:
    """What a settlement could not charge: recorded, changing no budget, and never
    counted as usage (not primary)."""
    return _entry(origin, None, "shortfall", amount, used=0, held=0, primary=False, meter=meter)


def topup(budget: Any, amount: int, now: datetime) -> Entry:
    """Credit of ``amount`` granted to ``budget`` for its current period."""
    origin = Origin(now=now, org_id=budget.org_id)
    return _entry(origin, budget, "topup", amount, used=0, held=0, primary=True)


# --- one call's entries ---------------------------------------------------------------------


def charges(
    origin: Origin, debited: Iterable[tuple[Any, int]], amounts: Mapping[str, int]
) -> list[Entry]:
    """A charge of ``amounts`` (per meter): an entry per budget debited, and an
    unbudgeted one for each meter no budget took."""
    out: list[Entry] = []
    seen: set[str] = set()
    for budget, amount in debited:
        out.append(charge(origin, budget, amount, primary=budget.meter not in seen))
        seen.add(budget.meter)
    out += [
        unbudgeted(origin, "charge", meter, amount)
        for meter, amount in amounts.items()
        if meter not in seen
    ]
    return out


def holds(origin: Origin, budgets: Sequence[Any], amount: int) -> list[Entry]:
    return [hold(origin, b, amount, primary=i == 0) for i, b in enumerate(budgets)]


def releases(origin: Origin, budgets: Sequence[Any], amount: int, *, expired: bool) -> list[Entry]:
    return [
        release(origin, b, amount, primary=i == 0, expired=expired) for i, b in enumerate(budgets)
    ]


def settlement(
    origin: Origin,
    meter: str,
    split: SettleSplit,
    returned_to: Sequence[Any],
    charged_excess: Sequence[Any],
) -> list[Entry]:
    """A settlement: the hold taken off each budget it was on (``within`` of it
    spent), the excess that fit charged to each budget that took it, and the
    shortfall. Each part is unbudgeted where no budget applies."""
    out = [settle(origin, b, split, primary=i == 0) for i, b in enumerate(returned_to)] or [
        unbudgeted(origin, "settle", meter, split.within)
    ]
    if split.fits:
        out += [
            charge(origin, b, split.fits, primary=i == 0) for i, b in enumerate(charged_excess)
        ] or [unbudgeted(origin, "charge", meter, split.fits)]
    if split.shortfall:
        out.append(shortfall(origin, meter, split.shortfall))
    return out


def _entry(
    origin: Origin,
    budget: Any,
    kind: str,
    amount: int,
    *,
    used: int,
    held: int,
    primary: bool,
    meter: str | None = None,
) -> Entry:
    return {
        "org_id": budget.org_id if budget is not None else origin.org_id,
        "project_id": origin.project_id,
        "key_id": origin.key_id,
        "budget_id": budget.id if budget is not None else None,
        "hold_id": origin.hold_id,
        "meter": budget.meter if budget is not None else meter,
        "kind": kind,
        "amount_micros": amount,
        "delta_used": used,
        "delta_held": held,
        "period_start": budget.period_start if budget is not None else None,
        "is_primary": primary,
        "idempotency_key": origin.idempotency_key,
        "metadata": dict(origin.metadata) if (origin.metadata and primary) else None,
        "created_at": origin.now,
    }
