"""IP allow-lists: a key limited to CIDR ranges is refused from anywhere else."""

from __future__ import annotations

import ipaddress
from decimal import Decimal as D
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st

from keycap import (
    APIKey,
    APIKeyClient,
    Budget,
    ForbiddenError,
    InsufficientScopeError,
    InvalidArgumentError,
    RateLimit,
)
from keycap._rules import ips
from keycap.integrations.fastapi import KeycapMiddleware, require_scope

# --- the rule, without a database ---------------------------------------------------


def test_ranges_are_normalized_and_checked() -> None:
    found = ips.ranges(
        ["2001:db8::/32", "10.0.0.0/8", "203.0.113.7", "10.0.0.0/8", "::ffff:192.0.2.0/120"]
    )
    assert found == ("10.0.0.0/8", "192.0.2.0/24", "203.0.113.7/32", "2001:db8::/32")
    assert ips.decode(ips.encode(found)) == found


@pytest.mark.parametrize(
    "bad",
    ["10.0.0.0/8", [], ["10.0.0.1/8"], ["10.0.0.0/33"], ["nope"], [10], ["1.2.3.4"] * 65 + ["x"]],
)
def test_bad_ranges_are_refused(bad: Any) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        ips.ranges(bad)
    assert refused.value.field == "allowed_ips"


def test_an_address_is_in_a_range_exactly_when_one_of_its_networks_is_listed() -> None:
    allowed = ("10.0.0.0/8", "2001:db8::/32", "203.0.113.7/32")
    for text, ok in [
        ("10.200.3.4", True),
        ("11.0.0.1", False),
        ("203.0.113.7", True),
        ("203.0.113.8", False),
        ("2001:db8:ffff::1", True),
        ("2001:db9::1", False),
        ("::ffff:10.1.2.3", True),  # IPv4 written as IPv6
    ]:
        client = ips.address(text)
        assert ips.allows(allowed, client) is ok, text
        listed = any(net.strip() in allowed for net in ips.networks(client))
        assert listed is ok, text  # what the SQL decides
    assert len(ips.networks(ips.address("1.2.3.4"))) == 33
    assert len(ips.networks(ips.address("::1"))) == 129
    assert ips.networks(ipaddress.ip_address("10.1.2.3"))[8] == " 10.0.0.0/8 "


@pytest.mark.parametrize("bad", ["", "10.0.0", "10.0.0.0/8", "x" * 100, None])
def test_a_bad_client_address_is_refused(bad: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        ips.address(bad)


# --- validation, on every database and every path -----------------------------------

PATHS: dict[str, dict[str, Any]] = {
    "read": {},
    "tracked": {"track_usage": True},
    "metered": {"cost": D("0.01")},
}


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_a_key_with_ranges_is_admitted_only_from_inside_them(
    client: APIKeyClient, path: str
) -> None:
    org = (await client.create_organization("Acme")).id
    limited = await client.create_key(
        org,
        scopes=["chat:write"],
        allowed_ips=["10.0.0.0/8", "2001:db8::/32"],
        budgets=[Budget(D("1"))],
    )
    anywhere = await client.create_key(org, budgets=[Budget(D("1"))])
    options = PATHS[path]
    for inside in ("10.1.2.3", "2001:db8::42", "::ffff:10.9.9.9"):
        key = await client.validate_key(limited.plaintext, client_ip=inside, **options)
        assert key.allowed_ips == ("10.0.0.0/8", "2001:db8::/32")
    for outside in ("192.0.2.1", "2001:db9::1", None):
        with pytest.raises(ForbiddenError) as refused:
            await client.validate_key(limited.plaintext, client_ip=outside, **options)
        assert refused.value.reason == "ip" and refused.value.code == "forbidden"
    for anywhere_ip in ("192.0.2.1", "::1", None):
        await client.validate_key(anywhere.plaintext, client_ip=anywhere_ip, **options)
    if path == "metered":  # three admitted calls were charged, no refused one
        assert [b.used for b in await client.get_budgets(limited.id)] == [D("0.03")]
    with pytest.raises(InsufficientScopeError):  # the address passes; the scope decides
        await client.validate_key(
            limited.plaintext, client_ip="10.0.0.1", required_scopes=["admin"], **options
        )


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_an_identitys_ranges_bind_every_key_on_top_of_the_keys_own(
    client: APIKeyClient, path: str
) -> None:
    org = (await client.create_organization("Acme")).id
    office, _ = await client.get_or_create_identity(
        org, "office-bot", allowed_ips=["10.0.0.0/8", "2001:db8::/32"]
    )
    assert office.allowed_ips == ("10.0.0.0/8", "2001:db8::/32")
    free = await client.create_key(org, identity_id=office.id, budgets=[Budget(D("1"))])
    narrow = await client.create_key(org, identity_id=office.id, allowed_ips=["10.1.0.0/16"])
    child = await client.delegate(free.id)
    options = PATHS[path]
    for key in (free, child):
        await client.validate_key(key.plaintext, client_ip="10.9.9.9", **options)
        await client.validate_key(key.plaintext, client_ip="2001:db8::1", **options)
        for outside in ("192.0.2.1", None):
            with pytest.raises(ForbiddenError) as refused:
                await client.validate_key(key.plaintext, client_ip=outside, **options)
            assert refused.value.reason == "ip"
    await client.validate_key(narrow.plaintext, client_ip="10.1.2.3", **options)
    with pytest.raises(ForbiddenError):  # inside the identity's, outside the key's own
        await client.validate_key(narrow.plaintext, client_ip="10.9.9.9", **options)
    with client.acting_as("admin"):
        moved = await client.update_identity(office.id, allowed_ips=["192.0.2.0/24"])
    assert moved.allowed_ips == ("192.0.2.0/24",)
    await client.validate_key(free.plaintext, client_ip="192.0.2.1", **options)
    with pytest.raises(ForbiddenError):
        await client.validate_key(free.plaintext, client_ip="10.9.9.9", **options)
    with pytest.raises(ForbiddenError):  # no address the key and its identity share
        await client.validate_key(narrow.plaintext, client_ip="192.0.2.1", **options)
    await client.update_identity(office.id, allowed_ips=None)
    await client.validate_key(free.plaintext, client_ip=None, **options)
    (entry, *_) = await client.audit_log(org, subject_id=office.id, action="identity.updated")
    assert entry.after is not None and entry.after["allowed_ips"] is None


async def test_a_rate_limited_and_a_cached_validation_check_the_address_too(
    db_url: str, clock: Any, client: APIKeyClient
) -> None:
    from tests.conftest import SECRET

    org = (await client.create_organization("Acme")).id
    limited = await client.create_key(
        org, allowed_ips=["192.0.2.0/24"], rate_limits=[RateLimit(2, "minute")]
    )
    await client.validate_key(limited.plaintext, client_ip="192.0.2.9")
    with pytest.raises(ForbiddenError):
        await client.validate_key(limited.plaintext, client_ip="198.51.100.1")
    assert (await client.get_rate_limits(limited.id))[0].remaining == 1  # refused: not counted
    cached_key = await client.create_key(org, allowed_ips=["192.0.2.0/24"])
    async with APIKeyClient(
        db_url, signing_secret=SECRET, clock=clock, auth_cache_ttl=30
    ) as cached:
        for _ in range(2):  # the second from the cache
            await cached.validate_key(cached_key.plaintext, client_ip="192.0.2.200")
            with pytest.raises(ForbiddenError):
                await cached.validate_key(cached_key.plaintext, client_ip="192.0.3.1")


async def test_ranges_change_with_update_key_and_do_not_bind_charges(client: APIKeyClient) -> None:
    org = (await client.create_organization("Acme")).id
    issued = await client.create_key(org, budgets=[Budget(D("1"))])
    updated = await client.update_key(issued.id, allowed_ips=["198.51.100.0/24"])
    assert updated.allowed_ips == ("198.51.100.0/24",)
    with pytest.raises(ForbiddenError):
        await client.validate_key(issued.plaintext, client_ip="192.0.2.1")
    charge = await client.charge(issued.id, D("0.5"))  # server-side, by key id: no address
    assert charge.amounts == {"spend": D("0.5")}
    hold = await client.reserve(issued.id, D("0.25"))
    await client.settle(hold.id, D("0.25"))
    await client.update_key(issued.id, allowed_ips=None)
    assert (await client.validate_key(issued.plaintext)).allowed_ips is None
    with pytest.raises(InvalidArgumentError):
        await client.update_key(issued.id, allowed_ips=["10.0.0.1/8"])
    with pytest.raises(InvalidArgumentError):
        await client.validate_key(issued.plaintext, client_ip="not an address")


# --- over HTTP: the client's address, and X-Forwarded-For only from trusted proxies ---


def test_the_client_address_is_the_peer_unless_the_peer_is_a_trusted_proxy() -> None:
    from keycap.integrations._http import HTTPOptions

    plain = HTTPOptions()
    proxied = HTTPOptions(trusted_proxies=("10.0.0.0/8", "::1/128"))
    xff = {"x-forwarded-for": "203.0.113.9, 198.51.100.7"}
    assert plain.client_ip("192.0.2.1", xff) == "192.0.2.1"  # not trusted: headers ignored
    assert proxied.client_ip("192.0.2.1", xff) == "192.0.2.1"  # the peer is no proxy of ours
    assert proxied.client_ip("10.0.0.2", xff) == "198.51.100.7"  # rightmost untrusted hop
    assert proxied.client_ip("10.0.0.2", {"x-forwarded-for": "198.51.100.7, 10.9.9.9"}) == (
        "198.51.100.7"  # through two of our proxies
    )
    assert proxied.client_ip("10.0.0.2", {}) == "10.0.0.2"  # the proxy's own request
    assert proxied.client_ip("10.0.0.2", {"x-forwarded-for": "junk"}) is None
    assert proxied.client_ip("::1", {"x-forwarded-for": "::ffff:203.0.113.5"}) == "203.0.113.5"
    assert plain.client_ip(None, xff) is None


def test_bad_trusted_proxies_are_a_configuration_error() -> None:
    from keycap import ConfigurationError
    from keycap.integrations._http import HTTPOptions

    for bad in ("10.0.0.0/8", ("10.0.0.1/8",), ("nope",)):
        with pytest.raises(ConfigurationError):
            HTTPOptions(trusted_proxies=bad)  # type: ignore[arg-type]


async def test_require_scope_passes_the_client_address(client: APIKeyClient) -> None:
    def app(**options: Any) -> FastAPI:
        made = FastAPI()
        made.add_middleware(KeycapMiddleware, client=client, close_client=False, **options)

        @made.get("/chat")
        async def chat(key: Annotated[APIKey, Depends(require_scope())]) -> str:
            return key.id

        return made

    org = (await client.create_organization("Acme")).id
    office = await client.create_key(org, allowed_ips=["198.51.100.0/24"])
    local = await client.create_key(org, allowed_ips=["127.0.0.0/8"])

    async def get(made: FastAPI, key: str, forwarded: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        if forwarded is not None:
            headers["X-Forwarded-For"] = forwarded
        transport = httpx.ASGITransport(app=made, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            return await http.get("/chat", headers=headers)

    direct = app()
    assert (await get(direct, local.plaintext)).status_code == 200
    refused = await get(direct, office.plaintext, forwarded="198.51.100.7")  # not trusted
    assert refused.status_code == 403
    assert (refused.json()["code"], refused.json()["reason"]) == ("forbidden", "ip")
    behind = app(trusted_proxies=["127.0.0.1/32"])
    assert (await get(behind, office.plaintext, forwarded="198.51.100.7")).status_code == 200
    spoofed = await get(behind, office.plaintext, forwarded="198.51.100.7, 203.0.113.66")
    assert spoofed.status_code == 403  # the client prepended an office address: no use


@settings(max_examples=300, deadline=None)
@given(
    network=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).flatmap(
        lambda a: st.tuples(st.just(a), st.integers(0, a.max_prefixlen))
    ),
    client=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
)
def test_the_sql_form_of_the_check_agrees_with_ipaddress(
    network: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int],
    client: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    address, prefix = network
    allowed = ips.ranges([str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))])
    plain = ips.address(str(client))
    in_sql_form = any(f" {r} " in ips.networks(plain) for r in allowed)
    assert in_sql_form == ips.allows(allowed, plain)
