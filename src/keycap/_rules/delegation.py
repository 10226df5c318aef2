"""Delegation: what a child key may be, given its parent (pure; no database).

A child never exceeds its parent: its scopes are covered by the parent's, it
expires no later, it stays inside the parent's project, product and IP ranges,
and it belongs to the parent's organization and identity. What the child
leaves out, it inherits. :func:`child` decides a new child; :func:`narrowed`
brings an existing descendant back inside its parent after the parent was
narrowed (``update_key``), so the rule keeps holding without the validation
statement having to re-read every ancestor's grants.

Budgets and rate limits are not decided here: a child's own are added to its
ancestors', which every charge debits in the same atomic step
(``keycap._db.grant.applies_to``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from keycap._errors import InvalidArgumentError
from keycap._rules import ips
from keycap._rules import scopes as scope_rules

__all__ = ["Grants", "child", "narrowed", "within"]


@dataclass(frozen=True, slots=True)
class Grants:
    """What a key is allowed: the parts of it a child must stay within."""

    scopes: tuple[str, ...]
    expires_at: datetime | None
    project_id: str | None
    product_id: str | None
    #: CIDR ranges; None: any address; empty: none.
    allowed_ips: tuple[str, ...] | None

    @classmethod
    def of(cls, m: Any) -> Grants:
        """A key's grants from its row (``keycap._db.rows.as_mapping``)."""
        stored_ips = m["allowed_ips"]
        return cls(
            scopes=scope_rules.decode(m["scopes"]),
            expires_at=m["expires_at"],
            project_id=m["project_id"],
            product_id=m["product_id"],
            allowed_ips=None if stored_ips is None else ips.decode(stored_ips),
        )


def child(parent: Grants, asked: Grants, *, inherit: frozenset[str]) -> Grants:
    """The grants of a new child of ``parent``: ``asked``, where each field named
    in ``inherit`` (left out by the caller) is the parent's.

    Raises:
        InvalidArgumentError: naming the first field that would exceed the parent.
    """
    out = replace(asked, **{name: getattr(parent, name) for name in inherit})
    absent = scope_rules.missing(parent.scopes, out.scopes)
    if absent:
        raise InvalidArgumentError(
            "scopes",
            "a delegated key's scopes must be the parent's: not granted " + ", ".join(absent),
        )
    if parent.expires_at is not None and (
        out.expires_at is None or out.expires_at > parent.expires_at
    ):
        raise InvalidArgumentError(
            "expires_at",
            f"a delegated key expires no later than its parent ({parent.expires_at})",
        )
    for name in ("project_id", "product_id"):
        mine, theirs = getattr(out, name), getattr(parent, name)
        if theirs is not None and mine != theirs:
            raise InvalidArgumentError(name, f"a delegated key stays in its parent's ({theirs})")
    if not within(out.allowed_ips, parent.allowed_ips):
        raise InvalidArgumentError(
            "allowed_ips", "a delegated key's ranges must lie inside its parent's"
        )
    return out


def narrowed(parent: Grants, key: Grants) -> Grants:
    """``key`` (a child of ``parent``) cut back inside ``parent``: its scopes and IP
    ranges intersected with the parent's (an empty list of ranges: no address),
    its expiry brought forward. Equal to ``key`` when it was already inside."""
    # Scopes nest like the IP ranges below: what both grant is, of each pair, the
    # narrower one (chat:* and chat:write: chat:write).
    kept = {s for s in key.scopes if not scope_rules.missing(parent.scopes, (s,))}
    kept |= {s for s in parent.scopes if not scope_rules.missing(key.scopes, (s,))}
    return replace(
        key,
        scopes=tuple(sorted(kept)),
        expires_at=parent.expires_at
        if _outlives(key.expires_at, parent.expires_at)
        else key.expires_at,
        allowed_ips=_intersection(key.allowed_ips, parent.allowed_ips),
    )


def _outlives(expiry: datetime | None, limit: datetime | None) -> bool:
    return limit is not None and (expiry is None or expiry > limit)


def within(ranges: tuple[str, ...] | None, outer: tuple[str, ...] | None) -> bool:
    """Every address ``ranges`` admits, ``outer`` admits (None: any address)."""
    if outer is None:
        return True
    if ranges is None:
        return False
    return all(_inside(r, outer) for r in ranges)


def _inside(network: str, outer: tuple[str, ...]) -> bool:
    net = ipaddress.ip_network(network)
    return any(
        net.version == (o := ipaddress.ip_network(other)).version and net.subnet_of(o)  # type: ignore[arg-type]
        for other in outer
    )


def _intersection(
    ranges: tuple[str, ...] | None, outer: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    if outer is None:
        return ranges
    if ranges is None:
        return outer
    # Two CIDR ranges either nest or are disjoint: the intersection is the smaller.
    kept = {r for r in ranges if _inside(r, outer)} | {o for o in outer if _inside(o, ranges)}
    nets = sorted((ipaddress.ip_network(n) for n in kept), key=lambda n: (n.version, n))
    return tuple(str(n) for n in nets)
