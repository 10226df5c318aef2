"""Key administration: create, read, list, update, revoke, disable, delete."""

from datetime import UTC, datetime, timedelta

import pytest

from keycap import (
    APIKey,
    APIKeyClient,
    ExpiredKeyError,
    InvalidArgumentError,
    KeyStatus,
    NotFoundError,
)
from tests.conftest import FakeClock


async def _org(client: APIKeyClient) -> str:
    return (await client.create_organization("Acme")).id


def _assert_aware(key: object) -> None:
    for field in (
        "created_at",
        "updated_at",
        "expires_at",
        "revoked_at",
        "disabled_at",
        "last_used_at",
    ):
        value = getattr(key, field)
        if value is not None:
            assert isinstance(value, datetime)
            assert value.tzinfo is UTC, f"{field} came back {value!r}"


async def test_create_key_returns_the_plaintext_once(
    client: APIKeyClient, clock: FakeClock
) -> None:
    org = await _org(client)
    issued = await client.create_key(
        org,
        name="research-agent",
        scopes=["chat:write", "chat:write"],
        expires_in="7d",
        metadata={"user_id": "u_1", "nested": {"n": [1, 2.5, None, True]}},
        delegated_by="user_456",
    )
    key = issued.key
    assert issued.plaintext.startswith("sk_live_")
    assert key.id == "key_" + issued.plaintext[8:20]
    assert key.start == issued.plaintext[:16]
    assert key.scopes == ("chat:write",)
    assert key.expires_at == clock.now + timedelta(days=7)
    assert key.use_count == 0 and key.last_used_at is None
    assert key.status_at(clock.now) is KeyStatus.ACTIVE
    stored = await client.get_key(key.id)
    assert stored == key
    _assert_aware(stored)
    assert not hasattr(stored, "plaintext")


async def test_datetimes_come_back_aware_utc_with_microseconds(
    client: APIKeyClient, clock: FakeClock
) -> None:
    clock.now = datetime(2026, 3, 1, 8, 30, 15, 123456, tzinfo=UTC)
    org = await _org(client)
    issued = await client.create_key(
        org, expires_at=datetime(2027, 1, 1, 0, 0, 0, 654321, tzinfo=UTC)
    )
    await client.validate_key(issued.plaintext)
    await client.disable_key(issued.id)
    await client.revoke_key(issued.id)
    for key in [await client.get_key(issued.id), *(await client.list_keys())]:
        _assert_aware(key)
        assert key.created_at == clock.now
        assert key.expires_at == datetime(2027, 1, 1, 0, 0, 0, 654321, tzinfo=UTC)
        assert key.last_used_at == clock.now


async def test_list_keys_filters_in_sql_and_paginates(
    client: APIKeyClient, clock: FakeClock
) -> None:
    org = await _org(client)
    other = (await client.create_organization("Other")).id
    project = (await client.create_project(org, "p")).id
    product = (await client.create_product(org, "x")).id

    async def create(org_id: str, name: str, **kw: object) -> APIKey:
        clock.advance(seconds=1)  # list order is creation time
        return (await client.create_key(org_id, name=name, **kw)).key  # type: ignore[arg-type]

    active = await create(org, "active")
    scoped = await create(org, "project", project_id=project)
    narrowed = await create(org, "product", product_id=product)
    expiring = await create(org, "expiring", expires_in="1h")
    revoked = await create(org, "revoked")
    disabled = await create(org, "disabled")
    await create(other, "elsewhere")
    await client.revoke_key(revoked.id)
    await client.disable_key(disabled.id)
    clock.advance(hours=2)

    async def names(**kw: object) -> list[str]:
        return [k.name for k in await client.list_keys(**kw)]  # type: ignore[arg-type]

    assert await names(org_id=org, status="active") == ["active", "project", "product"]
    assert await names(org_id=org, status=KeyStatus.EXPIRED) == ["expiring"]
    assert await names(org_id=org, status="revoked") == ["revoked"]
    assert await names(org_id=org, status="disabled") == ["disabled"]
    assert await names(project_id=project) == ["project"]
    assert await names(product_id=product) == ["product"]
    assert len(await client.list_keys()) == 7
    assert await names(org_id=org, limit=2, offset=1) == ["project", "product"]
    assert {active.id, scoped.id, narrowed.id, expiring.id} <= {
        k.id for k in await client.list_keys(org_id=org)
    }
    for key in await client.list_keys(org_id=org):
        assert (await client.get_key(key.id)).status_at(clock.now) == {
            "active": KeyStatus.ACTIVE,
            "project": KeyStatus.ACTIVE,
            "product": KeyStatus.ACTIVE,
            "expiring": KeyStatus.EXPIRED,
            "revoked": KeyStatus.REVOKED,
            "disabled": KeyStatus.DISABLED,
        }[key.name]
    with pytest.raises(InvalidArgumentError):
        await client.list_keys(status="bogus")


async def test_update_key_changes_only_what_is_given(
    client: APIKeyClient, clock: FakeClock
) -> None:
    org = await _org(client)
    issued = await client.create_key(
        org, name="a", scopes=["x"], expires_in="1h", metadata={"a": 1}
    )
    clock.advance(minutes=1)
    updated = await client.update_key(issued.id, name="b", scopes=["y", "x"], metadata={"b": 2})
    assert (updated.name, updated.scopes, updated.metadata) == ("b", ("x", "y"), {"b": 2})
    assert updated.expires_at == issued.key.expires_at  # untouched
    assert updated.updated_at == clock.now
    updated = await client.update_key(issued.id, expires_in="2d")
    assert updated.expires_at == clock.now + timedelta(days=2)
    updated = await client.update_key(issued.id, expires_at=None)
    assert updated.expires_at is None
    with pytest.raises(InvalidArgumentError):
        await client.update_key(issued.id, expires_at=datetime(2030, 1, 1))  # naive
    with pytest.raises(NotFoundError):
        await client.update_key("key_AAAAAAAAAAAA", name="x")


async def test_revoke_is_idempotent_and_keeps_the_first_time(
    client: APIKeyClient, clock: FakeClock
) -> None:
    issued = await client.create_key(await _org(client))
    first = await client.revoke_key(issued.id)
    clock.advance(minutes=5)
    second = await client.revoke_key(issued.id)
    assert first.revoked_at == second.revoked_at != clock.now
    assert (await client.enable_key(issued.id)).revoked_at == first.revoked_at  # still revoked


async def test_a_disabled_key_is_refused_until_enabled(
    client: APIKeyClient, clock: FakeClock
) -> None:
    issued = await client.create_key(await _org(client))
    disabled = await client.disable_key(issued.id)
    clock.advance(minutes=1)
    assert (await client.disable_key(issued.id)).disabled_at == disabled.disabled_at
    enabled = await client.enable_key(issued.id)
    assert enabled.disabled_at is None
    assert (await client.validate_key(issued.plaintext)).id == issued.id


async def test_a_deleted_key_is_gone(client: APIKeyClient) -> None:
    issued = await client.create_key(await _org(client))
    await client.validate_key(issued.plaintext)
    await client.delete_key(issued.id)
    with pytest.raises(NotFoundError):
        await client.get_key(issued.id)
    with pytest.raises(NotFoundError):
        await client.delete_key(issued.id)


async def test_key_needs_its_project_and_product_in_its_own_org(client: APIKeyClient) -> None:
    org = await _org(client)
    other = (await client.create_organization("Other")).id
    foreign_project = (await client.create_project(other, "p")).id
    foreign_product = (await client.create_product(other, "x")).id
    with pytest.raises(NotFoundError):
        await client.create_key(org, project_id=foreign_project)
    with pytest.raises(NotFoundError):
        await client.create_key(org, product_id=foreign_product)
    with pytest.raises(NotFoundError):
        await client.create_key("org_AAAAAAAAAAAAAAAA")
    project = (await client.create_project(org, "p")).id
    product = (await client.create_product(org, "x")).id
    with pytest.raises(InvalidArgumentError, match="linked"):
        await client.create_key(org, project_id=project, product_id=product)
    await client.add_product_to_project(product, project)
    await client.create_key(org, project_id=project, product_id=product)


async def test_expiry_is_enforced_from_the_injected_clock(
    client: APIKeyClient, clock: FakeClock
) -> None:
    issued = await client.create_key(await _org(client), expires_in="30s")
    clock.advance(seconds=29)
    await client.validate_key(issued.plaintext)
    clock.advance(seconds=1)
    with pytest.raises(ExpiredKeyError) as info:
        await client.validate_key(issued.plaintext)
    assert info.value.expired_at == issued.key.expires_at
