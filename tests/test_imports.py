"""Keys imported from other systems keep working without being reissued: real
apikeys-platform and djangorestframework-api-key keys, and Unkey-style SHA-256."""

from __future__ import annotations

import base64
import hashlib
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from keycap import (
    APIKeyClient,
    Budget,
    BudgetExceededError,
    ConfigurationError,
    InsufficientScopeError,
    InvalidArgumentError,
    InvalidKeyError,
)
from keycap._db.schema import key_imports, keys
from tests.conftest import SECRET, FakeClock

FOREIGN = "their-signing-secret-of-another-system"


async def _apikeys_platform_keys(tmp_path: Path, count: int) -> list[Any]:
    """Keys made by apikeys-platform itself, in its own SQLite database."""
    from apikeys import APIKeyClient as Theirs
    from apikeys.db.session import create_tables
    from apikeys.models import KeyMetadata

    url = f"sqlite:///{tmp_path / 'apikeys.db'}"
    await create_tables(url)
    theirs = Theirs(url, signing_secret=FOREIGN, environment="live")
    org = await theirs.create_organization("Acme")
    made = [
        await theirs.create_key(str(org.id), metadata=KeyMetadata(name=f"k{i}", scopes=["read"]))
        for i in range(count)
    ]
    await theirs._sessions.kw["bind"].dispose()
    return made


async def apikeys_platform_database(tmp_path: Path) -> tuple[str, list[str], str]:
    """An apikeys-platform database made by apikeys-platform: an organization with a
    project and a product, two live keys and a revoked one. ``(url, the live keys'
    plaintexts, the revoked one's)``."""
    from apikeys import APIKeyClient as Theirs
    from apikeys.db.session import create_tables
    from apikeys.models import KeyMetadata

    url = f"sqlite:///{tmp_path / 'apikeys-whole.db'}"
    await create_tables(url)
    theirs = Theirs(url, signing_secret=FOREIGN, environment="live")
    org = await theirs.create_organization("Globex")
    project = await theirs.create_project(str(org.id), "web")
    product = await theirs.create_product(str(org.id), "chat")
    await theirs.add_product_to_project(str(product.id), str(project.id))
    live = [
        await theirs.create_key(
            str(org.id),
            project_id=str(project.id) if i == 0 else None,
            metadata=KeyMetadata(name=f"k{i}", scopes=["read"], custom={"team": "ml"}),
        )
        for i in range(2)
    ]
    gone = await theirs.create_key(str(org.id), metadata=KeyMetadata(name="old", scopes=["read"]))
    await theirs.revoke_key(str(gone.key.id))
    await theirs._sessions.kw["bind"].dispose()
    return url, [k.plaintext for k in live], gone.plaintext


def _drf_keys() -> list[tuple[str, str, str]]:
    """``(key, prefix, hashed_key)`` by djangorestframework-api-key's KeyGenerator,
    with its own hasher and with Django's PBKDF2 and Argon2 password hashers."""
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            PASSWORD_HASHERS=[
                "django.contrib.auth.hashers.PBKDF2PasswordHasher",
                "django.contrib.auth.hashers.Argon2PasswordHasher",
            ]
        )
        django.setup()
    from django.contrib.auth.hashers import make_password
    from rest_framework_api_key.crypto import KeyGenerator

    made = []
    generator = KeyGenerator()
    key, prefix, hashed = generator.generate()  # sha512$$...
    made.append((key, prefix, hashed))
    for hasher in ("pbkdf2_sha256", "argon2"):
        key, prefix, _ = generator.generate()
        made.append((key, prefix, make_password(key, hasher=hasher)))
    return made


async def _stored(client: APIKeyClient, key_id: str) -> tuple[Any, Any]:
    async with client.engine.connect() as conn:
        key = (await conn.execute(select(keys).where(keys.c.id == key_id))).one()
        imported = (
            await conn.execute(select(key_imports).where(key_imports.c.key_id == key_id))
        ).one()
    return key, imported


async def test_apikeys_platform_keys_work_unchanged_and_are_redigested_on_first_use(
    client: APIKeyClient, db_url: str, clock: FakeClock, tmp_path: Path
) -> None:
    made = await _apikeys_platform_keys(tmp_path, 3)
    org = (await client.create_organization("Acme")).id
    ours = []
    for theirs in made:
        ours.append(
            await client.import_key(
                org,
                scheme="apikeys-platform",
                hash=_their_hash(theirs.plaintext),
                prefix=theirs.key.key_prefix,
                start=theirs.plaintext[:16],
                name=theirs.key.metadata.name,
                scopes=list(theirs.key.metadata.scopes),
                budgets=[Budget(D("1.00"))],
            )
        )
    with pytest.raises(InvalidKeyError):  # a client not told to accept imported keys
        await client.validate_key(made[0].plaintext)
    async with APIKeyClient(
        db_url,
        signing_secret=SECRET,
        clock=clock,
        imported_keys=True,
        foreign_secrets={"apikeys-platform": FOREIGN},
    ) as kc:
        first = await kc.validate_key(made[0].plaintext, required_scopes=["read"], cost=D("0.40"))
        assert (first.id, first.name) == (ours[0].id, "k0")
        key, imported = await _stored(kc, ours[0].id)
        assert key.digest == kc._ring.digest(made[0].plaintext)  # keycap's HMAC now
        assert (imported.foreign_hash, imported.upgraded_at) == (None, clock.now)
        again = await kc.validate_key(made[0].plaintext)  # by keycap's digest
        assert again.id == ours[0].id
        with pytest.raises(BudgetExceededError):
            await kc.validate_key(made[0].plaintext, cost=D("0.61"))
        with pytest.raises(InsufficientScopeError):
            await kc.validate_key(made[1].plaintext, required_scopes=["write"])
        for wrong in (made[0].plaintext[:-1] + "x", "sk_live_" + "A" * 43, "garbage"):
            with pytest.raises(InvalidKeyError):
                await kc.validate_key(wrong)
        # keycap's own keys are unaffected
        own = await kc.create_key(org)
        await kc.validate_key(own.plaintext)
    async with APIKeyClient(db_url, signing_secret=SECRET, imported_keys=True) as no_secret:
        with pytest.raises(ConfigurationError):  # not yet re-digested, and no secret to verify
            await no_secret.validate_key(made[2].plaintext)
    async with APIKeyClient(db_url, signing_secret=SECRET, imported_keys=True) as later:
        await later.validate_key(made[0].plaintext)  # re-digested: no foreign secret needed
    logged = await client.audit_log(org, subject_id=ours[0].id)
    assert [e.action for e in logged] == ["key.imported"]


def _their_hash(plaintext: str) -> str:
    import hmac

    return hmac.new(FOREIGN.encode(), plaintext.encode(), hashlib.sha256).hexdigest()


async def test_django_rest_framework_api_keys_with_every_hasher(
    client: APIKeyClient, db_url: str, clock: FakeClock
) -> None:
    org = (await client.create_organization("Acme")).id
    made = _drf_keys()
    imported = [
        await client.import_key(org, scheme="drf", hash=hashed, prefix=prefix, start=prefix)
        for _, prefix, hashed in made
    ]
    async with APIKeyClient(db_url, signing_secret=SECRET, clock=clock, imported_keys=True) as kc:
        for (key, prefix, _), ours in zip(made, imported, strict=True):
            with pytest.raises(InvalidKeyError):
                await kc.validate_key(f"{prefix}.wrong")
            assert (await kc.validate_key(key)).id == ours.id
            assert (await kc.validate_key(key)).id == ours.id  # by keycap's digest now
            _, row = await _stored(kc, ours.id)
            assert row.foreign_hash is None


async def test_unkey_style_sha256_keys_in_hex_or_base64(client: APIKeyClient, db_url: str) -> None:
    org = (await client.create_organization("Acme")).id
    plain = ["uk_3ZbKcjwS4cZQ4P4h9X1yV2", "uk_9ZbKcjwS4cZQ4P4h9X1yV7"]
    digest = [hashlib.sha256(p.encode()).digest() for p in plain]
    hexed = await client.import_key(org, scheme="sha256", hash=digest[0].hex())
    b64 = await client.import_key(org, scheme="sha256", hash=base64.b64encode(digest[1]).decode())
    async with APIKeyClient(db_url, signing_secret=SECRET, imported_keys=True) as kc:
        assert (await kc.validate_key(plain[0])).id == hexed.id
        assert (await kc.validate_key(plain[1])).id == b64.id
        with pytest.raises(InvalidKeyError):
            await kc.validate_key("uk_not-imported")


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"scheme": "md5", "hash": "x"}, "scheme"),
        ({"scheme": "sha256", "hash": "not-a-hash"}, "hash"),
        ({"scheme": "apikeys-platform", "hash": "a" * 64}, "prefix"),
        ({"scheme": "apikeys-platform", "hash": "zz", "prefix": "abcdefgh"}, "hash"),
        ({"scheme": "drf", "hash": "bcrypt$x", "prefix": "abc"}, "hash"),
        ({"scheme": "drf", "hash": "sha512$$ab", "prefix": "a.b"}, "prefix"),
    ],
)
async def test_an_import_names_what_is_wrong(
    client: APIKeyClient, given: dict[str, Any], field: str
) -> None:
    org = (await client.create_organization("Acme")).id
    with pytest.raises(InvalidArgumentError) as refused:
        await client.import_key(org, **given)
    assert refused.value.field == field


def test_bad_foreign_secrets_are_a_configuration_error(db_url: str) -> None:
    for bad in ({"other": "x"}, {"apikeys-platform": ""}, ["apikeys-platform"]):
        with pytest.raises(ConfigurationError):
            APIKeyClient(db_url, signing_secret=SECRET, foreign_secrets=bad)  # type: ignore[arg-type]
