"""Argon2id as keycap's own key hasher (``APIKeyClient(key_hasher="argon2id")``)."""

from __future__ import annotations

from decimal import Decimal as D
from typing import Any

import pytest
from sqlalchemy import select

from keycap import APIKeyClient, Budget, ConfigurationError, InvalidKeyError
from keycap._db.schema import keys
from keycap._rules import hashing
from keycap._rules.hashing import PepperRing
from tests.conftest import SECRET, FakeClock

KEY = "sk_live_" + "A" * 40


def test_an_argon2id_ring_digests_new_keys_slowly_once_and_keeps_verifying_hmac(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slow = PepperRing(SECRET, hasher="argon2id")
    fast = PepperRing(SECRET)
    assert slow.current_id.startswith("a2") and len(slow.current_id) == 12
    assert fast.current_id in slow.ids  # HMAC digests still verify
    digest = slow.digest(KEY)
    assert len(digest) == 64 and digest != fast.digest(KEY)
    assert slow.verify(KEY, fast.current_id, fast.digest(KEY))
    assert slow.needs_upgrade(fast.current_id) and not slow.needs_upgrade(slow.current_id)
    made: list[Any] = []
    real = hashing._argon2

    def counting() -> Any:
        inner = real()
        return lambda **kw: made.append(1) or inner(**kw)

    monkeypatch.setattr(hashing, "_argon2", counting)
    fresh = PepperRing(SECRET, hasher="argon2id")
    assert not fresh.cheap(KEY)
    assert fresh.digest(KEY) == digest  # deterministic: comparable in SQL
    assert fresh.cheap(KEY) and fresh.digest(KEY) == digest and len(made) == 1
    assert fresh.verify(KEY, fresh.current_id, digest) and len(made) == 1
    assert not fresh.verify(KEY[:-1] + "B", fresh.current_id, digest) and len(made) == 2
    assert fast.cheap(KEY)
    with pytest.raises(ConfigurationError):
        PepperRing(SECRET, hasher="bcrypt")
    assert SECRET not in repr(fresh)


async def _pepper(client: APIKeyClient, key_id: str) -> str:
    async with client.engine.connect() as conn:
        return str(
            (await conn.execute(select(keys.c.pepper_id).where(keys.c.id == key_id))).scalar()
        )


@pytest.mark.parametrize("path", ["read", "tracked", "metered", "cached"])
async def test_argon2id_keys_validate_on_every_path_and_hmac_keys_move_to_it(
    client: APIKeyClient, db_url: str, clock: FakeClock, path: str
) -> None:
    org = (await client.create_organization("Acme")).id
    old = await client.create_key(org, budgets=[Budget(D("1"))])  # HMAC, by the default client
    options: dict[str, Any] = {
        "read": {},
        "tracked": {"track_usage": True},
        "metered": {"cost": D("0.01")},
        "cached": {},
    }[path]
    async with APIKeyClient(
        db_url,
        signing_secret=SECRET,
        clock=clock,
        key_hasher="argon2id",
        auth_cache_ttl=60 if path == "cached" else None,
    ) as slow:
        new = await slow.create_key(org, budgets=[Budget(D("1"))])
        assert (await _pepper(slow, new.id)).startswith("a2")
        for _ in range(2):
            assert (await slow.validate_key(new.plaintext, **options)).id == new.id
        with pytest.raises(InvalidKeyError):
            await slow.validate_key(new.plaintext[:-6] + old.plaintext[-6:], **options)
        await slow.validate_key(old.plaintext, **options)
        if path == "read":  # a successful read re-digests it under the newest entry
            assert (await _pepper(slow, old.id)).startswith("a2")
        await slow.validate_key(old.plaintext, **options)
