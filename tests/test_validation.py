"""validate_key against real databases: the grant rule, writes, round trips, peppers."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import event, select

from keycap import (
    APIKeyClient,
    DisabledKeyError,
    ExpiredKeyError,
    ForbiddenError,
    InsufficientScopeError,
    InvalidArgumentError,
    InvalidKeyError,
    KeyRejectedError,
    RateLimit,
    RevokedKeyError,
)
from keycap._db.schema import keys
from tests.conftest import SECRET, FakeClock


@dataclass
class World:
    """Two organizations; org A has a project with a linked product, and a loose product."""

    org: str
    other_org: str
    project: str
    other_project: str
    linked: str
    unlinked: str
    foreign_product: str
    foreign_project: str


async def build_world(client: APIKeyClient) -> World:
    org = (await client.create_organization("A")).id
    other = (await client.create_organization("B")).id
    project = (await client.create_project(org, "agents")).id
    other_project = (await client.create_project(org, "batch")).id
    linked = (await client.create_product(org, "chat")).id
    unlinked = (await client.create_product(org, "images")).id
    await client.add_product_to_project(linked, project)
    return World(
        org=org,
        other_org=other,
        project=project,
        other_project=other_project,
        linked=linked,
        unlinked=unlinked,
        foreign_product=(await client.create_product(other, "chat")).id,
        foreign_project=(await client.create_project(other, "agents")).id,
    )


@contextmanager
def count_statements(client: APIKeyClient) -> Iterator[list[str]]:
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    engine = client.engine.sync_engine
    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


async def row_of(client: APIKeyClient, key_id: str) -> Any:
    async with client.engine.begin() as conn:
        return (await conn.execute(select(keys).where(keys.c.id == key_id))).one()


async def test_every_step_of_the_grant_rule(client: APIKeyClient, clock: FakeClock) -> None:
    w = await build_world(client)
    issued = await client.create_key(w.org, scopes=["chat:write"], expires_in="1h")
    ok = issued.plaintext
    assert (await client.validate_key(ok, required_scopes=["chat:write"])).id == issued.id

    # 1. format and checksum; 2. existence; 3. digest
    with pytest.raises(InvalidKeyError):
        await client.validate_key(ok[:-1])
    unknown = (await client.create_key(w.org)).plaintext
    await client.delete_key("key_" + unknown[8:20])
    with pytest.raises(InvalidKeyError):
        await client.validate_key(unknown)
    other_secret = APIKeyClient(client.engine, signing_secret="z" * 40, clock=clock)
    with pytest.raises(InvalidKeyError) as wrong_secret:
        await other_secret.validate_key(ok)
    assert wrong_secret.value.key_id is None  # unknown and wrong secret look the same
    # 7. organization; 10. scopes
    with pytest.raises(ForbiddenError):
        await client.validate_key(ok, org_id=w.other_org)
    with pytest.raises(InsufficientScopeError) as missing:
        await client.validate_key(ok, required_scopes=["chat:write", "chat:admin"])
    assert missing.value.missing_scopes == ("chat:admin",)
    # 6. expiry
    clock.advance(hours=1)
    with pytest.raises(ExpiredKeyError):
        await client.validate_key(ok)
    await client.update_key(issued.id, expires_at=None)
    # 5. disabled, 4. revoked (revoked wins over disabled)
    await client.disable_key(issued.id)
    with pytest.raises(DisabledKeyError):
        await client.validate_key(ok)
    await client.revoke_key(issued.id)
    with pytest.raises(RevokedKeyError):
        await client.validate_key(ok)


CASES = [
    # (key's project, key's product, asked org, asked project, asked product, granted?)
    ("none", "none", "org", None, None, True),
    ("none", "none", "other_org", None, None, False),
    ("none", "none", None, None, "linked", True),
    ("none", "none", None, None, "unlinked", True),
    # Org A's org-wide key asked for org B's product must fail.
    ("none", "none", None, None, "foreign_product", False),
    ("none", "none", None, None, "missing_product", False),
    ("none", "none", None, "project", None, True),
    ("none", "none", None, "foreign_project", None, False),
    ("project", "none", None, "project", None, True),
    ("project", "none", None, "other_project", None, False),
    ("project", "none", None, None, "linked", True),
    # A project key asked for a product not linked to its project must fail.
    ("project", "none", None, None, "unlinked", False),
    ("project", "none", None, None, "foreign_product", False),
    ("none", "unlinked", None, None, "unlinked", True),
    ("none", "unlinked", None, None, "linked", False),
    ("project", "linked", None, "project", "linked", True),
    ("project", "linked", "org", "project", "linked", True),
    ("project", "linked", "org", "project", "unlinked", False),
    ("none", "none", None, None, "garbage", False),
    ("none", "none", "garbage", None, None, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
async def test_tenancy_rules_agree_in_sql_and_in_python(
    client: APIKeyClient, case: tuple[Any, ...]
) -> None:
    """Each case is checked twice: through the one-statement path (the rule in SQL,
    where the database has RETURNING) and through the read path (the rule in Python)."""
    w = await build_world(client)
    names = {
        **vars(w),
        "none": None,
        "missing_product": "prod_AAAAAAAAAAAAAAAA",
        "garbage": "not-an-id\x00\ud800",
    }
    key_project, key_product, org, project, product, granted = case
    issued = await client.create_key(
        w.org, project_id=names[key_project], product_id=names[key_product]
    )
    asked = {
        "org_id": names.get(org),
        "project_id": names.get(project),
        "product_id": names.get(product),
    }
    for track in (True, False):
        if granted:
            key = await client.validate_key(issued.plaintext, track_usage=track, **asked)
            assert key.id == issued.id
        else:
            with pytest.raises(ForbiddenError):
                await client.validate_key(issued.plaintext, track_usage=track, **asked)
    assert (await client.get_key(issued.id)).use_count == (1 if granted else 0)


async def test_product_asked_by_name_is_looked_up_in_the_keys_organization(
    client: APIKeyClient,
) -> None:
    """Org A and org B both have a product named "chat"; only A has "images"."""
    w = await build_world(client)
    a_key = await client.create_key(w.org)
    b_key = await client.create_key(w.other_org)
    chat_key = await client.create_key(w.org, product_id=w.linked)
    project_key = await client.create_key(w.org, project_id=w.project)
    metered = await client.create_key(w.org, rate_limits=[RateLimit(100, "minute")])
    cases = [
        (a_key, "chat", True),
        (a_key, "images", True),
        (a_key, "video", False),
        (b_key, "chat", True),
        (b_key, "images", False),
        (chat_key, "chat", True),
        (chat_key, "images", False),
        (project_key, "chat", True),
        (project_key, "images", False),  # not linked to the key's project
        (metered, "chat", True),
        (metered, "video", False),
    ]
    for issued, name, granted in cases:
        for track in (True, False):  # the rule in SQL, then in Python
            if granted:
                key = await client.validate_key(
                    issued.plaintext, product_name=name, track_usage=track
                )
                assert key.id == issued.id
            else:
                with pytest.raises(ForbiddenError) as refused:
                    await client.validate_key(
                        issued.plaintext, product_name=name, track_usage=track
                    )
                assert refused.value.reason == "product"
    with pytest.raises(InvalidArgumentError):
        await client.validate_key(a_key.plaintext, product_name="chat", product_id=w.linked)
    with pytest.raises(InvalidArgumentError):
        await client.validate_key(a_key.plaintext, product_name="")


@pytest.mark.parametrize("track", [True, False], ids=["in-sql", "in-python"])
@pytest.mark.parametrize(
    ("required", "ok"),
    [
        pytest.param(["chat:write"], True, id="wildcard-covers"),
        pytest.param(["chat:admin:read", "billing:read"], True, id="deeper-and-exact"),
        pytest.param(["x_y.z-w:a"], True, id="punctuation-exact"),
        pytest.param(["xayazbw:a"], False, id="underscore-and-dot-are-not-wildcards"),
        pytest.param(["billing:*"], False, id="wildcard-asked-not-granted"),
        pytest.param(["billing"], False, id="parent-of-a-grant"),
        pytest.param(["chat"], False, id="parent-of-a-wildcard"),
        pytest.param(["Chat:write"], False, id="case-sensitive"),
        pytest.param(["*"], False, id="star-asked"),
    ],
)
async def test_scope_rules_agree_in_sql_and_in_python(
    client: APIKeyClient, required: list[str], ok: bool, track: bool
) -> None:
    # Tracked validations decide in SQL (grant_predicate), untracked ones in Python.
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, scopes=["chat:*", "billing:read", "x_y.z-w:a"])
    if ok:
        await client.validate_key(issued.plaintext, required_scopes=required, track_usage=track)
    else:
        with pytest.raises(InsufficientScopeError):
            await client.validate_key(issued.plaintext, required_scopes=required, track_usage=track)


async def test_a_rejected_call_writes_nothing(client: APIKeyClient, clock: FakeClock) -> None:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, scopes=["a"], expires_in="1h")
    await client.validate_key(issued.plaintext)
    before = await row_of(client, issued.id)
    clock.advance(minutes=1)
    for kwargs in (
        {"required_scopes": ["b"]},
        {"org_id": "org_AAAAAAAAAAAAAAAA"},
        {"product_id": "prod_AAAAAAAAAAAAAAAA"},
    ):
        with pytest.raises(KeyRejectedError):
            await client.validate_key(issued.plaintext, **kwargs)  # type: ignore[arg-type]
    clock.advance(hours=1)
    with pytest.raises(ExpiredKeyError):
        await client.validate_key(issued.plaintext)
    assert await row_of(client, issued.id) == before


async def test_an_accepted_validation_counts_a_use_and_its_time(
    client: APIKeyClient, clock: FakeClock
) -> None:
    issued = await client.create_key((await client.create_organization("A")).id)
    for n in range(1, 6):
        clock.advance(seconds=1)
        key = await client.validate_key(issued.plaintext)
        assert (key.use_count, key.last_used_at) == (n, clock.now)
    stored = await client.get_key(issued.id)
    assert (stored.use_count, stored.last_used_at) == (5, clock.now)


async def test_usage_tracking_can_be_switched_off_per_call_and_per_client(
    client: APIKeyClient, clock: FakeClock
) -> None:
    issued = await client.create_key((await client.create_organization("A")).id)
    await client.validate_key(issued.plaintext, track_usage=False)
    quiet = APIKeyClient(client.engine, signing_secret=SECRET, clock=clock, track_usage=False)
    await quiet.validate_key(issued.plaintext)
    stored = await client.get_key(issued.id)
    assert (stored.use_count, stored.last_used_at) == (0, None)
    await quiet.validate_key(issued.plaintext, track_usage=True)
    assert (await client.get_key(issued.id)).use_count == 1


async def test_a_validation_costs_its_pinned_number_of_statements(
    client: APIKeyClient, backend: str
) -> None:
    issued = await client.create_key((await client.create_organization("A")).id, scopes=["a"])
    with count_statements(client) as seen:
        await client.validate_key(issued.plaintext, required_scopes=["a"])
    # PostgreSQL and SQLite: the UPDATE ... RETURNING both decides and records.
    # MariaDB has no UPDATE ... RETURNING: a SELECT, then the conditional UPDATE.
    assert len(seen) == (2 if backend == "mariadb" else 1), seen
    with count_statements(client) as seen:
        await client.validate_key(issued.plaintext, required_scopes=["a"], track_usage=False)
    assert len(seen) == 1 and seen[0].lstrip().upper().startswith("SELECT")
    product = await client.create_product(issued.key.org_id, "chat")
    with count_statements(client) as seen:
        await client.validate_key(issued.plaintext, product_name=product.name)
    assert len(seen) == (2 if backend == "mariadb" else 1), seen  # the name costs no trip
    with count_statements(client) as seen, pytest.raises(InvalidKeyError):
        await client.validate_key(
            issued.plaintext[:-1] + ("y" if issued.plaintext[-1] == "x" else "x")
        )
    assert seen == []  # refused on format/checksum, no I/O
    with count_statements(client) as seen, pytest.raises(InsufficientScopeError):
        await client.validate_key(issued.plaintext, required_scopes=["b"])
    assert len(seen) <= 2


async def test_a_rotated_secret_still_verifies_and_upgrades_the_digest(
    client: APIKeyClient, clock: FakeClock
) -> None:
    old, new = "old-secret-" + "o" * 32, "new-secret-" + "n" * 32
    engine = client.engine
    before = APIKeyClient(engine, signing_secret=old, clock=clock)
    org = (await before.create_organization("A")).id
    issued = await before.create_key(org)
    old_pepper = (await row_of(client, issued.id)).pepper_id

    rotated = APIKeyClient(engine, signing_secret=[new, old], clock=clock)
    fresh = await rotated.create_key(org)
    assert (await row_of(client, fresh.id)).pepper_id == rotated.pepper_id
    # The old key still validates and is re-digested under the newest secret.
    await rotated.validate_key(issued.plaintext, track_usage=False)
    row = await row_of(client, issued.id)
    assert row.pepper_id == rotated.pepper_id != old_pepper
    # So once every key has been used, the old secret can be retired.
    only_new = APIKeyClient(engine, signing_secret=new, clock=clock)
    await only_new.validate_key(issued.plaintext)
    with pytest.raises(InvalidKeyError):
        await before.validate_key(fresh.plaintext)


async def test_a_key_of_another_prefix_or_environment_is_invalid(
    client: APIKeyClient, clock: FakeClock
) -> None:
    org = (await client.create_organization("A")).id
    test_env = APIKeyClient(client.engine, signing_secret=SECRET, environment="test", clock=clock)
    issued = await test_env.create_key(org)
    assert issued.plaintext.startswith("sk_test_")
    await test_env.validate_key(issued.plaintext)
    with pytest.raises(InvalidKeyError):
        await client.validate_key(issued.plaintext)


async def test_a_metered_call_costs_its_pinned_number_of_statements(
    client: APIKeyClient, backend: str
) -> None:
    """Statements per call (BEGIN and COMMIT come on top). PostgreSQL and SQLite
    read each changed row back from its UPDATE (RETURNING); MariaDB has no UPDATE
    ... RETURNING and reads it with a SELECT after each UPDATE, under the row lock."""
    from decimal import Decimal

    from keycap import Budget

    org = (await client.create_organization("A")).id
    await client.set_budget(org, Budget(Decimal(1000), "month"))
    metered = await client.create_key(
        org, rate_limits=[RateLimit(10**6, "minute")], budgets=[Budget(Decimal(1000), "month")]
    )
    charged = await client.create_key(org, budgets=[Budget(Decimal(1000), "month")])
    returning = backend != "mariadb"
    cases = [
        # UPDATE key (the whole rule, the cap, the use, the row lock, how many rate
        # limits apply); UPDATE every rate limit (one statement); SELECT budgets;
        # UPDATE both budgets (one statement); INSERT ledger. No SELECT of the key
        # first: that only runs to explain a refusal.
        # PostgreSQL: each call below is one statement (keycap._db.metering).
        (lambda: client.validate_key(metered.plaintext, cost=Decimal("0.01")), 5, 8, 1),
        # UPDATE key; UPDATE rate limits (the key is known to be rate-limited).
        (lambda: client.validate_key(metered.plaintext), 2, 4, 1),
        # UPDATE key (live, lock); SELECT budgets; UPDATE both; INSERT ledger.
        (lambda: client.charge(charged.id, Decimal("0.01")), 4, 6, 1),
    ]
    for call, with_returning, without, *one_statement in cases:
        await call()  # warm: the rate-limit hint, the statement caches
        with count_statements(client) as seen:
            await call()
        expected = with_returning if returning else without
        if backend in ("postgresql", "pgbouncer") and one_statement:
            expected = one_statement[0]
        assert len(seen) == expected, seen
