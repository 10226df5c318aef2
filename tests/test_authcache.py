"""The optional in-process authentication cache."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from keycap import (
    APIKeyClient,
    Budget,
    ConfigurationError,
    ExpiredKeyError,
    InsufficientScopeError,
    InvalidKeyError,
    RateLimit,
    RateLimitedError,
    RevokedKeyError,
)
from keycap._ops.authcache import AuthCache
from keycap._rules.policy import Requirement
from tests.conftest import SECRET, FakeClock
from tests.test_validation import count_statements


@pytest.fixture
def cached(client: APIKeyClient, clock: FakeClock) -> APIKeyClient:
    return APIKeyClient(
        client.engine, signing_secret=SECRET, clock=clock, track_usage=False, auth_cache_ttl=30
    )


async def trips(client: APIKeyClient, plaintext: str, **kwargs: object) -> int:
    with count_statements(client) as seen:
        await client.validate_key(plaintext, **kwargs)  # type: ignore[arg-type]
    return len(seen)


async def test_off_by_default(client: APIKeyClient) -> None:
    issued = await client.create_key((await client.create_organization("A")).id)
    assert [await trips(client, issued.plaintext, track_usage=False) for _ in range(3)] == [1, 1, 1]


async def test_a_repeat_needs_no_round_trip_and_still_checks(cached: APIKeyClient) -> None:
    org = (await cached.create_organization("A")).id
    issued = await cached.create_key(org, scopes=["chat:write"])
    ask = {"required_scopes": ["chat:write"]}
    assert [await trips(cached, issued.plaintext, **ask) for _ in range(3)] == [1, 0, 0]
    # The secret is verified on every hit: a wrong one goes to the database and fails.
    forged = issued.plaintext[:20] + ("A" if issued.plaintext[20] != "A" else "B")
    forged += issued.plaintext[21:]
    with pytest.raises(InvalidKeyError):
        await cached.validate_key(forged, **ask)  # type: ignore[arg-type]
    # Another requirement is its own entry, and the rule runs on hits too.
    with pytest.raises(InsufficientScopeError):
        await cached.validate_key(issued.plaintext, required_scopes=["admin"])
    assert await trips(cached, issued.plaintext, **ask) == 0


async def test_changes_through_the_client_clear_it(cached: APIKeyClient) -> None:
    org = (await cached.create_organization("A")).id
    issued = await cached.create_key(org)
    await cached.validate_key(issued.plaintext)
    await cached.revoke_key(issued.id)
    with pytest.raises(RevokedKeyError):
        await cached.validate_key(issued.plaintext)
    other = await cached.create_key(org)
    await cached.validate_key(other.plaintext)
    await cached.set_rate_limit(other.id, RateLimit(1, "minute"))
    await cached.validate_key(other.plaintext)  # now metered: the one call allowed
    with pytest.raises(RateLimitedError):
        await cached.validate_key(other.plaintext)


async def test_another_process_is_seen_within_the_ttl(
    client: APIKeyClient, cached: APIKeyClient, clock: FakeClock
) -> None:
    issued = await cached.create_key((await cached.create_organization("A")).id)
    await cached.validate_key(issued.plaintext)
    await client.revoke_key(issued.id)  # "another process": a client with its own cache
    clock.advance(seconds=29)
    await cached.validate_key(issued.plaintext)  # stale, within the documented bound
    clock.advance(seconds=1)
    with pytest.raises(RevokedKeyError):
        await cached.validate_key(issued.plaintext)


async def test_expiry_is_decided_on_hits(cached: APIKeyClient, clock: FakeClock) -> None:
    issued = await cached.create_key((await cached.create_organization("A")).id, expires_in="10s")
    await cached.validate_key(issued.plaintext)
    clock.advance(seconds=10)
    with count_statements(cached) as seen, pytest.raises(ExpiredKeyError):
        await cached.validate_key(issued.plaintext)
    assert seen == []


async def test_what_is_never_served_from_it(cached: APIKeyClient) -> None:
    org = (await cached.create_organization("A")).id
    plain = await cached.create_key(org, budgets=[Budget(Decimal(1), "month")])
    limited = await cached.create_key(org, rate_limits=[RateLimit(100, "minute")])
    capped = await cached.create_key(org, max_uses=100)
    for _ in range(2):
        assert await trips(cached, plain.plaintext, track_usage=True) >= 1
        assert await trips(cached, plain.plaintext, cost=Decimal("0.01")) >= 1
        assert await trips(cached, limited.plaintext) >= 1
        assert await trips(cached, capped.plaintext) >= 1
    assert (await cached.get_key(capped.id)).use_count == 2  # a capped key is always counted


def test_a_put_from_before_a_clear_is_dropped() -> None:
    cache = AuthCache(timedelta(seconds=5), max_entries=2)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    req = Requirement()
    generation = cache.generation
    cache.clear()  # a revoke committed while that validation was reading
    cache.put("key_a", req, "row", now, generation)
    assert cache.get("key_a", req, now) is None
    for name in ("key_a", "key_b", "key_c"):
        cache.put(name, req, name, now, cache.generation)
    assert len(cache) == 2 and cache.get("key_a", req, now) is None  # oldest evicted
    assert cache.get("key_c", req, now + timedelta(seconds=5)) is None  # expired


@pytest.mark.parametrize("ttl", [0, -1, 3601, "30", True])
def test_bad_ttl(ttl: object) -> None:
    with pytest.raises(ConfigurationError):
        APIKeyClient("sqlite://", signing_secret=SECRET, auth_cache_ttl=ttl)  # type: ignore[arg-type]
