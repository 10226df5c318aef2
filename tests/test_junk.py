"""Every public method fed generated junk: it raises a KeycapError or it succeeds,
and what it stored reads back exactly as it was given. Nothing else escapes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keycap import APIKeyClient, Budget, KeycapError, RateLimit
from tests.conftest import SECRET

OFFSETS = st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))])

#: Anything a caller might pass by mistake, or on purpose.
JUNK: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.decimals(min_value=0, max_value=10**13, places=8),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=195, max_size=210),
    st.sampled_from(["", " ", "a ", " a", "\x00", "\t", "*", "chat:*", "7d", "0s", "-1d"]),
    st.binary(max_size=16),
    st.lists(st.text(max_size=8), max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), st.integers(), max_size=3),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=OFFSETS),
    st.timedeltas(),
    st.builds(object),
)


@dataclass
class World:
    """What the calls act on: a fresh organization with a key, a budget and a hold."""

    org: str
    key: str
    plaintext: str
    budget: str
    hold: str


async def _world(client: APIKeyClient) -> World:
    org = (await client.create_organization(f"junk-{uuid.uuid4().hex}")).id
    issued = await client.create_key(org, scopes=["a"], budgets=[Budget(10**12)])
    (budget,) = await client.get_budgets(issued.id)
    hold = await client.reserve(issued.id, 1)
    return World(org, issued.id, issued.plaintext, budget.id, hold.id)


Call = Callable[[APIKeyClient, World, Any], Awaitable[Any]]


async def _created_org(c: APIKeyClient, w: World, j: Any) -> None:
    org = await c.create_organization(j)
    assert (await c.get_organization(org.id)).name == j


async def _created_key(c: APIKeyClient, w: World, j: Any, field: str) -> None:
    issued = await c.create_key(w.org, **{field: j})
    stored = await c.get_key(issued.id)
    if field == "name":
        assert stored.name == j
    if field == "metadata":
        assert stored.metadata == ({} if j is None else j)  # None: no metadata
    if field == "max_uses":
        assert stored.max_uses == j


async def _charged(c: APIKeyClient, w: World, j: Any) -> None:
    charge = await c.charge(w.key, j)
    assert charge.amounts["spend"] == Decimal(j)


async def _budget(c: APIKeyClient, w: World, j: Any) -> None:
    status = await c.set_budget(w.org, Budget(j))
    assert status.limit == Decimal(j)


CALLS: dict[str, Call] = {
    "create_organization": _created_org,
    "get_or_create_organization": lambda c, w, j: c.get_or_create_organization(j),
    "get_organization": lambda c, w, j: c.get_organization(j),
    "create_project": lambda c, w, j: c.create_project(w.org, j),
    "create_product": lambda c, w, j: c.create_product(j, "p"),
    "list_organizations": lambda c, w, j: c.list_organizations(limit=j),
    "list_keys(status)": lambda c, w, j: c.list_keys(status=j),
    "list_keys(offset)": lambda c, w, j: c.list_keys(org_id=w.org, offset=j),
    "create_key(name)": lambda c, w, j: _created_key(c, w, j, "name"),
    "create_key(scopes)": lambda c, w, j: _created_key(c, w, j, "scopes"),
    "create_key(expires_in)": lambda c, w, j: _created_key(c, w, j, "expires_in"),
    "create_key(expires_at)": lambda c, w, j: _created_key(c, w, j, "expires_at"),
    "create_key(metadata)": lambda c, w, j: _created_key(c, w, j, "metadata"),
    "create_key(max_uses)": lambda c, w, j: _created_key(c, w, j, "max_uses"),
    "create_key(rate_limits)": lambda c, w, j: _created_key(c, w, j, "rate_limits"),
    "create_key(budgets)": lambda c, w, j: _created_key(c, w, j, "budgets"),
    "create_key(project_id)": lambda c, w, j: _created_key(c, w, j, "project_id"),
    "update_key(name)": lambda c, w, j: c.update_key(w.key, name=j),
    "update_key(expires_at)": lambda c, w, j: c.update_key(w.key, expires_at=j),
    "revoke_key": lambda c, w, j: c.revoke_key(j),
    "validate_key": lambda c, w, j: c.validate_key(j),
    "validate_key(required_scopes)": lambda c, w, j: c.validate_key(w.plaintext, required_scopes=j),
    "validate_key(cost)": lambda c, w, j: c.validate_key(w.plaintext, cost=j),
    "validate_key(product_name)": lambda c, w, j: c.validate_key(w.plaintext, product_name=j),
    "validate_key(org_id)": lambda c, w, j: c.validate_key(w.plaintext, org_id=j),
    "validate_key(track_usage)": lambda c, w, j: c.validate_key(w.plaintext, track_usage=j),
    "charge": _charged,
    "charge(idempotency_key)": lambda c, w, j: c.charge(w.key, 1, idempotency_key=j),
    "charge(metadata)": lambda c, w, j: c.charge(w.key, 1, metadata=j),
    "reserve": lambda c, w, j: c.reserve(w.key, j),
    "reserve(ttl)": lambda c, w, j: c.reserve(w.key, 1, ttl=j),
    "reserve(meter)": lambda c, w, j: c.reserve(w.key, 1, meter=j),
    "settle": lambda c, w, j: c.settle(w.hold, j),
    "settle(hold_id)": lambda c, w, j: c.settle(j, 1),
    "release": lambda c, w, j: c.release(j),
    "set_budget": _budget,
    "Budget(period)": lambda c, w, j: c.set_budget(w.org, Budget(1, j)),
    "Budget(anchor_day)": lambda c, w, j: c.set_budget(w.org, Budget(1, anchor_day=j)),
    "Budget(alert_thresholds)": lambda c, w, j: c.set_budget(
        w.org, Budget(1, "day", alert_thresholds=j)
    ),
    "set_rate_limit": lambda c, w, j: c.set_rate_limit(w.org, RateLimit(j)),
    "RateLimit(window)": lambda c, w, j: c.set_rate_limit(w.org, RateLimit(1, j)),
    "RateLimit(name)": lambda c, w, j: c.set_rate_limit(w.org, RateLimit(1, name=j)),
    "grant_credit": lambda c, w, j: c.grant_credit(w.budget, j),
    "grant_credit(budget_id)": lambda c, w, j: c.grant_credit(j, 1),
    "remove_rate_limit": lambda c, w, j: c.remove_rate_limit(w.org, j),
    "usage(since)": lambda c, w, j: c.usage(org_id=w.org, since=j),
    "usage(per)": lambda c, w, j: c.usage(org_id=w.org, per=j),
    "get_hold": lambda c, w, j: c.get_hold(j),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_junk_raises_a_keycap_error_or_round_trips_exactly(db_url: str, name: str) -> None:
    call = CALLS[name]
    with asyncio.Runner() as runner:
        client = APIKeyClient(db_url, signing_secret=SECRET)
        try:
            world = runner.run(_world(client))

            @settings(
                max_examples=40,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            )
            @given(junk=JUNK)
            def feed(junk: Any) -> None:
                with contextlib.suppress(KeycapError):
                    runner.run(call(client, world, junk))

            feed()
        finally:
            runner.run(client.aclose())
