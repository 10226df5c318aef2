"""roll_key: a new secret for the same key, the old one good for a grace period."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from keycap import (
    APIKeyClient,
    Budget,
    InvalidArgumentError,
    InvalidKeyError,
    NotFoundError,
    RevokedKeyError,
    RolledKeyError,
)
from tests.conftest import SECRET, FakeClock


async def test_a_rolled_key_keeps_everything_and_its_old_secret_works_until_the_grace_ends(
    client: APIKeyClient, clock: FakeClock
) -> None:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, scopes=["a"], budgets=[Budget(D(5))], max_uses=100)
    await client.validate_key(issued.plaintext)
    rolled = await client.roll_key(issued.id, grace="1h")
    assert (rolled.id, rolled.key.start) == (issued.id, issued.key.start)
    assert rolled.plaintext != issued.plaintext and rolled.plaintext not in repr(rolled)
    assert (await client.validate_key(rolled.plaintext, required_scopes=["a"])).use_count == 2
    # The old secret, within its grace, on every path: tracked, read, metered.
    assert (await client.validate_key(issued.plaintext)).use_count == 3
    await client.validate_key(issued.plaintext, track_usage=False)
    await client.validate_key(issued.plaintext, cost=D("0.10"))
    clock.advance(hours=1, seconds=1)
    for path in ({}, {"track_usage": False}, {"cost": D("0.10")}):
        with pytest.raises(RolledKeyError) as info:
            await client.validate_key(issued.plaintext, **path)  # type: ignore[arg-type]
        assert (info.value.code, info.value.key_id) == ("rolled_key", issued.id)
        assert isinstance(info.value, InvalidKeyError)  # a 401, like any wrong secret
    key = await client.validate_key(rolled.plaintext)
    [budget] = await client.get_budgets(issued.id)
    assert (key.use_count, key.max_uses, budget.used) == (6, 100, D("0.10"))  # capped: all count


async def test_a_grace_of_zero_cuts_the_old_secret_at_once(client: APIKeyClient) -> None:
    issued = await client.create_key((await client.create_organization("A")).id)
    rolled = await client.roll_key(issued.id, grace="0s")
    with pytest.raises(RolledKeyError):
        await client.validate_key(issued.plaintext)
    await client.validate_key(rolled.plaintext)


async def test_rolling_again_retires_the_secret_before_the_last(client: APIKeyClient) -> None:
    issued = await client.create_key((await client.create_organization("A")).id)
    first = await client.roll_key(issued.id, grace="1h")
    second = await client.roll_key(issued.id, grace="1h")
    with pytest.raises(InvalidKeyError) as info:
        await client.validate_key(issued.plaintext)
    assert not isinstance(info.value, RolledKeyError)  # two rolls ago: unknown now
    await client.validate_key(first.plaintext)  # the previous one, in its grace
    await client.validate_key(second.plaintext)


@pytest.mark.parametrize(
    ("grace", "error"),
    [("31d", InvalidArgumentError), ("soon", InvalidArgumentError), (-5, InvalidArgumentError)],
    ids=["over-30-days", "not-a-duration", "negative"],
)
async def test_a_bad_grace_is_refused(
    client: APIKeyClient, grace: object, error: type[Exception]
) -> None:
    issued = await client.create_key((await client.create_organization("A")).id)
    with pytest.raises(error):
        await client.roll_key(issued.id, grace=grace)  # type: ignore[arg-type]
    await client.validate_key(issued.plaintext)  # nothing changed


async def test_a_revoked_or_unknown_key_cannot_be_rolled(client: APIKeyClient) -> None:
    issued = await client.create_key((await client.create_organization("A")).id)
    await client.revoke_key(issued.id)
    with pytest.raises(RevokedKeyError):
        await client.roll_key(issued.id)
    with pytest.raises(NotFoundError):
        await client.roll_key("key_AAAAAAAAAAAA")


async def test_the_old_secret_in_its_grace_never_replaces_the_new_digest(
    db_url: str, clock: FakeClock, client: APIKeyClient
) -> None:
    issued = await client.create_key((await client.create_organization("A")).id)
    rolled = await client.roll_key(issued.id, grace="1h")
    # The signing secret is rotated after the roll: a validation with an old-pepper
    # digest re-digests the key under the new pepper, but only for the current secret.
    newer = "rotated-secret-" + "r" * 32
    async with APIKeyClient(db_url, signing_secret=[newer, SECRET], clock=clock) as rotated:
        await rotated.validate_key(issued.plaintext)  # the previous secret: no upgrade
        await rotated.validate_key(rolled.plaintext)  # the current one: upgraded
        await rotated.validate_key(issued.plaintext)  # still in its grace
        assert (await rotated.get_key(issued.id)).id == issued.id
        stored = await rotated.validate_key(rolled.plaintext)
        assert stored.id == issued.id
