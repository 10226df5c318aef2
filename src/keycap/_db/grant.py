"""The SQL twins of the grant rule: each condition here is a step of
``keycap._rules.policy`` (or of ``APIKey.status_at``) written as SQL, so that the
statement that records a use or charges re-decides the rule at the moment of
writing. ``tests/test_validation.py`` holds each twin to its Python original.

Also the one spelling of "which rate limits and budgets apply to a key": its own,
its project's and its organization's.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, exists, func, or_, select

from keycap._db.build import IDENTITY_ID, KEY_ID, ORG_ID, PROJECT_ID, contains
from keycap._db.schema import (
    identities,
    keys,
    products,
    project_products,
    projects,
    rate_limits,
)
from keycap._rules import ips
from keycap._rules import scopes as scope_rules
from keycap._rules.policy import Requirement

# --- the key is live (steps 4-6) --------------------------------------------------------


def key_is_live_now(now: Any) -> list[ColumnElement[bool]]:
    """A key row that is not revoked, not disabled (nor its identity) and not
    expired at ``now`` (steps 4-6 of the grant rule; every statement that charges
    re-checks them)."""
    k = keys.c
    return [
        k.revoked_at.is_(None),
        k.disabled_at.is_(None),
        or_(
            k.identity_id.is_(None),
            ~exists().where(
                identities.c.id == k.identity_id, identities.c.disabled_at.is_not(None)
            ),
        ),
        or_(k.expires_at.is_(None), k.expires_at > now),
    ]


def identity_disabled_at() -> Any:
    """The key's identity's ``disabled_at`` (NULL: none, or not disabled), as a
    column of a statement over ``keys``: what the Python twin of step 5 reads."""
    return (
        select(identities.c.disabled_at)
        .where(identities.c.id == keys.c.identity_id)
        .correlate(keys)
        .scalar_subquery()
    )


def key_is_live(key_id: Any, now: Any) -> ColumnElement[bool]:
    """The key ``key_id`` exists and is live: a condition on another table's row
    (every debit carries it, so a dead key is never charged)."""
    return exists().where(keys.c.id == key_id, *key_is_live_now(now))


def status_filter(status: str, now: datetime) -> ColumnElement[bool]:
    """The SQL twin of ``APIKey.status_at``: revoked, then disabled, then expired."""
    k = keys.c
    live = and_(k.revoked_at.is_(None), k.disabled_at.is_(None))
    if status == "revoked":
        return k.revoked_at.is_not(None)
    if status == "disabled":
        return and_(k.revoked_at.is_(None), k.disabled_at.is_not(None))
    if status == "expired":
        return and_(live, k.expires_at.is_not(None), k.expires_at <= now)
    return and_(live, or_(k.expires_at.is_(None), k.expires_at > now))


# --- the whole rule (steps 3-10) ---------------------------------------------------------


def grant_predicate(
    digests: Mapping[str, Any], req: Requirement, now: Any, dialect: str
) -> ColumnElement[bool]:
    """The grant rule of ``keycap._rules.policy`` steps 3-10, as one SQL condition on
    ``keys``.

    Used as the WHERE of the statement that records a use, so a key revoked,
    disabled or expired by another process between any two of our statements can
    never have a use recorded: the database re-decides at the moment of writing.
    """
    k = keys.c
    current = or_(*(and_(k.pepper_id == pid, k.digest == d) for pid, d in digests.items()))
    # A rolled key's previous secret, until its grace ends (policy step 3).
    previous = and_(
        k.previous_until > now,
        or_(
            *(
                and_(k.previous_pepper_id == pid, k.previous_digest == d)
                for pid, d in digests.items()
            )
        ),
    )
    conds: list[ColumnElement[bool]] = [or_(current, previous), *key_is_live_now(now)]
    if req.org_id is not None:
        conds.append(k.org_id == req.org_id)
    if req.project_id is not None:
        conds.append(
            or_(
                k.project_id == req.project_id,
                and_(
                    k.project_id.is_(None),
                    exists().where(projects.c.id == req.project_id, projects.c.org_id == k.org_id),
                ),
            )
        )
    asked = asked_product(req)
    if asked is not None:
        conds.append(exists().where(products.c.id == asked, products.c.org_id == k.org_id))
        conds.append(or_(k.product_id.is_(None), k.product_id == asked))
        conds.append(
            or_(
                k.project_id.is_(None),
                exists().where(
                    project_products.c.org_id == k.org_id,
                    project_products.c.project_id == k.project_id,
                    project_products.c.product_id == asked,
                ),
            )
        )
    conds.append(ip_allowed(req.ip_version, dialect))
    for group in req.scopes:  # all groups; of each, one scope
        conds.append(
            or_(
                *(
                    contains(k.scopes, f" {grant} ", dialect)
                    for required in group
                    for grant in scope_rules.covering(required)
                )
            )
        )
    return and_(*conds)


def ip_allowed(version: int | None, dialect: str) -> ColumnElement[bool]:
    """Step 10: the key has no IP ranges, or one of them is one of the networks
    holding the client's address, given as binds ``hot_net_0`` ...
    (``keycap._db.build.hot_params``)."""
    k = keys.c
    if version is None:
        return k.allowed_ips.is_(None)
    nets = (
        bindparam(f"hot_net_{i}", type_=k.allowed_ips.type) for i in range(ips.NETWORKS[version])
    )
    return or_(k.allowed_ips.is_(None), *(contains(k.allowed_ips, net, dialect) for net in nets))


def asked_product(req: Requirement) -> Any:
    """The asked-for product's id: the id given, or the id of the product with the
    given name in the key's own organization (NULL when there is none)."""
    if req.product_id is not None:
        return req.product_id
    if req.product_name is None:
        return None
    # An alias, correlated to keys only: inside an EXISTS over products, the plain
    # table would be auto-correlated to that EXISTS instead.
    named = products.alias("named_product")
    return (
        select(named.c.id)
        .where(named.c.org_id == keys.c.org_id, named.c.name == req.product_name)
        .correlate(keys)
        .scalar_subquery()
    )


# --- what applies to a key ------------------------------------------------------------


def applies_to(
    table: Any, key_id: Any, org_id: Any, project_id: Any, identity_id: Any
) -> ColumnElement[bool]:
    """A rate limit's or budget's row belongs to the key, its identity, its project
    or its organization. A key without a project (identity) has a NULL there, which
    matches nothing. The one spelling of this rule: every statement below uses it."""
    return table.c.subject_id.in_([key_id, org_id, project_id, identity_id])  # type: ignore[no-any-return]


def applies_to_key(table: Any) -> ColumnElement[bool]:
    """:func:`applies_to` the key of the ``KEY_ID``/``ORG_ID``/``PROJECT_ID``/
    ``IDENTITY_ID`` binds."""
    return applies_to(table, KEY_ID, ORG_ID, PROJECT_ID, IDENTITY_ID)


def applies_to_row(table: Any, key: Any) -> ColumnElement[bool]:
    """:func:`applies_to` the key of a row (``keys.c`` or a CTE's columns)."""
    return applies_to(table, key.id, key.org_id, key.project_id, key.identity_id)


def has_rate_limits() -> ColumnElement[bool]:
    """A rate limit applies to the key of the ``keys`` row in the statement."""
    return exists().where(applies_to_row(rate_limits, keys.c))


def rate_limit_count(key_id: Any) -> Any:
    """How many rate limits apply to the key ``key_id`` (a bind parameter): a column
    for the RETURNING of the key's UPDATE, so the rate-limit UPDATE can tell a
    refusal (fewer rows changed) from a key with fewer limits.

    SQLite renders RETURNING columns unqualified, even inside a subquery, so each
    innermost SELECT here reads one table only and nothing is ambiguous."""
    counted = keys.alias("counted_key")

    def of_key(column: Any) -> Any:
        return select(column).where(counted.c.id == key_id).scalar_subquery()

    return (
        select(func.count())
        .select_from(rate_limits)
        .where(
            applies_to(
                rate_limits,
                key_id,
                of_key(counted.c.org_id),
                of_key(counted.c.project_id),
                of_key(counted.c.identity_id),
            )
        )
        .scalar_subquery()
        .label("rate_limit_count")
    )
