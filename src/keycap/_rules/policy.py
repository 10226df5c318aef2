"""The grant rule, as pure code (docs/security.md states it in words).

Access is granted if and only if, in this order:

1. the key is well formed and its checksum is right (``tokens``);
2. a key with that public id exists;
3. its digest matches under the pepper that made it;
4. it is not revoked;
5. it is not disabled, nor is the identity it belongs to;
6. it is not expired (``expires_at`` is unset or later than now);
7. if an organization is asked for, the key belongs to it;
8. if a project is asked for: a project key must be of that project; a key
   without a project passes only if the project belongs to the key's organization;
9. if a product is asked for (by id, or by name within the key's organization):
   the product belongs to the key's organization, a product key must be of that
   product, and a project key passes only if the product is linked to its project;
10. if the key carries IP ranges, the client's address was given and one of
    them contains it (``ips``);
11. every required scope is covered (``scopes``; all of them, one scope of each
    ``any_of``).

The first failing step decides the error. ``keycap._db.grant.grant_predicate`` is the
same rule in SQL; a test holds the two together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime

from keycap._errors import (
    DisabledKeyError,
    ExpiredKeyError,
    ForbiddenError,
    InsufficientScopeError,
    InvalidKeyError,
    RevokedKeyError,
)
from keycap._rules import ips
from keycap._rules import scopes as scope_rules


@dataclass(frozen=True, slots=True)
class Requirement:
    """What a validation asks for, already validated."""

    #: Every group, and of each group one scope (``keycap._rules.scopes.Required``).
    scopes: tuple[tuple[str, ...], ...] = ()
    org_id: str | None = None
    project_id: str | None = None
    product_id: str | None = None
    #: A product by name, looked up in the key's own organization.
    product_name: str | None = None
    #: The IP version of the client address given (4 or 6), None without one.
    #: The address itself is not part of the requirement (statements are cached
    #: per requirement): it is passed beside it.
    ip_version: int | None = None


@dataclass(frozen=True, slots=True)
class KeyFacts:
    """What the lookup returned about the key and the asked-for resources."""

    key_id: str
    digest_ok: bool
    org_id: str
    project_id: str | None
    product_id: str | None
    scopes: tuple[str, ...]
    expires_at: datetime | None
    revoked_at: datetime | None
    disabled_at: datetime | None
    #: Organization of the asked-for project/product; None when absent or not asked.
    asked_project_org_id: str | None = None
    asked_product_org_id: str | None = None
    #: The id of the product asked for by name in the key's organization, if any.
    asked_product_id: str | None = None
    #: Whether the asked-for product is linked to the key's project.
    asked_product_linked: bool = False
    #: The key's IP ranges; None: any address.
    allowed_ips: tuple[str, ...] | None = None
    #: When the key's identity was disabled; None: no identity, or not disabled.
    identity_disabled_at: datetime | None = None
    #: When the first of a delegated key's ancestors was revoked (disabled); None:
    #: none is, or the key was not delegated.
    ancestors_revoked_at: datetime | None = None
    ancestors_disabled_at: datetime | None = None
    #: The IP ranges of the key's identity; None: any address (or no identity).
    identity_allowed_ips: tuple[str, ...] | None = None


def without_addresses(facts: KeyFacts) -> KeyFacts:
    """``facts`` for a call that has no client address (a charge, a delegation):
    IP ranges, the key's and its identity's, restrict validations only."""
    return dataclasses.replace(facts, allowed_ips=None, identity_allowed_ips=None)


def check(
    facts: KeyFacts, req: Requirement, now: datetime, client: ips.Address | None = None
) -> None:
    """Raise the error of the first failing step; return if access is granted.
    ``client``: the caller's address (``req.ip_version`` says its version).

    Raises:
        InvalidKeyError, RevokedKeyError, DisabledKeyError, ExpiredKeyError,
        ForbiddenError, InsufficientScopeError.
    """
    if not facts.digest_ok:
        raise InvalidKeyError()
    kid = facts.key_id
    if facts.revoked_at is not None:
        raise RevokedKeyError(facts.revoked_at, key_id=kid)
    if facts.ancestors_revoked_at is not None:
        raise RevokedKeyError(facts.ancestors_revoked_at, key_id=kid, ancestor=True)
    if facts.disabled_at is not None:
        raise DisabledKeyError(facts.disabled_at, key_id=kid)
    if facts.ancestors_disabled_at is not None:
        raise DisabledKeyError(facts.ancestors_disabled_at, key_id=kid, ancestor=True)
    if facts.identity_disabled_at is not None:
        raise DisabledKeyError(facts.identity_disabled_at, key_id=kid, identity=True)
    if facts.expires_at is not None and facts.expires_at <= now:
        raise ExpiredKeyError(facts.expires_at, key_id=kid)
    if req.org_id is not None and req.org_id != facts.org_id:
        raise ForbiddenError("organization", key_id=kid)
    if req.project_id is not None and (
        req.project_id != facts.project_id
        if facts.project_id is not None
        else facts.asked_project_org_id != facts.org_id
    ):
        raise ForbiddenError("project", key_id=kid)
    wanted = req.product_id if req.product_id is not None else facts.asked_product_id
    if (req.product_id is not None or req.product_name is not None) and (
        wanted is None
        or facts.asked_product_org_id != facts.org_id
        or (facts.product_id is not None and facts.product_id != wanted)
        or (facts.project_id is not None and not facts.asked_product_linked)
    ):
        raise ForbiddenError("product", key_id=kid)
    for ranges in (facts.allowed_ips, facts.identity_allowed_ips):
        if ranges is not None and (client is None or not ips.allows(ranges, client)):
            raise ForbiddenError("ip", key_id=kid)
    if req.scopes:
        absent = scope_rules.unmet(facts.scopes, req.scopes)
        if absent:
            raise InsufficientScopeError.of(absent, key_id=kid)
