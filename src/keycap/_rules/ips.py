"""IP allow-lists: which client addresses a key may be used from.

A key may carry CIDR ranges (IPv4 and IPv6). They are stored normalized
(``10.0.0.0/8``, ``2001:db8::/32``), space-delimited with a space at each end,
like scopes. The check runs inside the validation's own statement: every
network that contains the client's address is one of at most 33 (IPv4) or
129 (IPv6), computed here from the address alone (:func:`networks`), so "one
of the key's ranges contains the address" is "one of those networks is in the
key's list", a substring test SQL can do. An IPv4 address written as IPv6
(``::ffff:10.1.2.3``) is the IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Final, TypeAlias

from keycap._errors import InvalidArgumentError

MAX_RANGES: Final = 64
#: How many networks contain one address, per IP version (prefixes /0 to /32 or /128).
NETWORKS: Final = {4: 33, 6: 129}

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def _plain(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address(value: object, field: str = "client_ip") -> Address:
    """A client address (``"203.0.113.7"``, ``"2001:db8::1"``).

    Raises:
        InvalidArgumentError: not an IP address.
    """
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidArgumentError(field, "must be an IP address such as 203.0.113.7")
    try:
        return _plain(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise InvalidArgumentError(field, "must be an IP address such as 203.0.113.7") from None


def ranges(value: object, field: str = "allowed_ips") -> tuple[str, ...]:
    """Validate CIDR ranges (``"10.0.0.0/8"``, ``"2001:db8::/32"``, or a single
    address); return them normalized, de-duplicated and sorted.

    Raises:
        InvalidArgumentError: not a list of ranges, a bad one, a range with host
            bits set (``10.0.0.1/8``: say ``10.0.0.0/8``), or more than 64.
    """
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise InvalidArgumentError(field, "must be a list of CIDR ranges such as 10.0.0.0/8")
    items = list(value)
    if not items:
        raise InvalidArgumentError(field, "give at least one range, or None for any address")
    if len(items) > MAX_RANGES:
        raise InvalidArgumentError(field, f"at most {MAX_RANGES} ranges")
    found = set()
    for item in items:
        if not isinstance(item, str) or len(item) > 64:
            raise InvalidArgumentError(field, "each range is like 10.0.0.0/8 or 2001:db8::/32")
        try:
            network = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as error:
            raise InvalidArgumentError(field, f"{item!r} is not a CIDR range: {error}") from None
        mapped = _plain(network.network_address)
        if mapped is not network.network_address:  # ::ffff:10.0.0.0/104 is 10.0.0.0/8
            network = ipaddress.ip_network(f"{mapped}/{max(0, network.prefixlen - 96)}")
        found.add(network)
    return tuple(str(n) for n in sorted(found, key=lambda n: (n.version, n)))


def optional_ranges(value: object, field: str = "allowed_ips") -> tuple[str, ...] | None:
    """:func:`ranges`, or None (any address) for None."""
    return None if value is None else ranges(value, field)


def encode(found: tuple[str, ...]) -> str:
    """Stored form: ``" 10.0.0.0/8 2001:db8::/32 "``."""
    return " " + " ".join(found) + " "


def stored(found: tuple[str, ...] | None) -> str | None:
    """A key's ``allowed_ips`` column: :func:`encode`, or NULL for any address."""
    return None if found is None else encode(found)


def decode(stored: str) -> tuple[str, ...]:
    return tuple(stored.split())


@lru_cache(maxsize=4096)  # clients come back; an IPv6 address has 129 networks
def networks(client: Address) -> tuple[str, ...]:
    """Every network that contains ``client``, in stored form with its spaces
    (``" 203.0.113.0/24 "``), from /0 to the address itself."""
    bits = client.max_prefixlen
    return tuple(
        f" {ipaddress.ip_network(f'{client}/{prefix}', strict=False)} "
        for prefix in range(bits + 1)
    )


def allows(allowed: Iterable[str], client: Address) -> bool:
    """Whether one of the ``allowed`` ranges contains ``client``."""
    return any(client in ipaddress.ip_network(r) for r in allowed)
