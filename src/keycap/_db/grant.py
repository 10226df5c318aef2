"""The SQL twins of the grant rule: each condition here is a step of
``keycap._rules.policy`` (or of ``APIKey.status_at``) written as SQL, so that the
statement that records a use or charges re-decides the rule at the moment of
writing. ``tests/test_validation.py`` holds each twin to its Python original.

Also the one spelling of "which rate limits and budgets apply to a key": its own,
its ancestors' (a delegated key's), its identity's, its project's and its
organization's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Text,
    and_,
    bindparam,
    case,
    exists,
    func,
    null,
    or_,
    select,
)

from keycap._db.build import ANCESTOR_IDS, IDENTITY_ID, KEY_ID, ORG_ID, PROJECT_ID, contains
from keycap._db.schema import (
    ANCESTORS,
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
    """A key row that is not revoked, not disabled (nor its identity, nor any of its
    ancestors) and not expired at ``now`` (steps 4-6 of the grant rule; every
    statement that charges re-checks them). A delegated key never expires after
    its ancestors (``delegate`` and ``update_key`` keep it so), so their expiry
    needs no reading here."""
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
        or_(k.ancestor_1.is_(None), and_(*(_ancestor_live(name) for name in ANCESTORS))),
    ]


def _ancestor_live(name: str) -> ColumnElement[bool]:
    """The ancestor in column ``name`` of the statement's ``keys`` row, if any, is
    neither revoked nor disabled: a primary-key lookup. (One EXISTS per column:
    MariaDB refuses ``id IN (outer columns)`` inside an UPDATE of the same table.)"""
    elder = keys.alias("elder_key")
    ancestor = keys.c[name]
    stopped = or_(elder.c.revoked_at.is_not(None), elder.c.disabled_at.is_not(None))
    return or_(ancestor.is_(None), ~exists().where(elder.c.id == ancestor, stopped))


def state_columns() -> list[Any]:
    """What the Python twin of steps 4-5 reads beside the key's own row, as columns
    of a statement over ``keys``: its identity's ``disabled_at`` and IP ranges,
    and when the first of its ancestors was revoked and disabled (each NULL: not
    so)."""
    return [
        identity_disabled_at().label("identity_disabled_at"),
        _of_identity(identities.c.allowed_ips).label("identity_allowed_ips"),
        _earliest_of_ancestors("revoked_at").label("ancestors_revoked_at"),
        _earliest_of_ancestors("disabled_at").label("ancestors_disabled_at"),
    ]


def _earliest_of_ancestors(column: str) -> Any:
    elder = keys.alias("elder_key")
    earliest = (
        select(func.min(elder.c[column]))
        .where(elder.c.id.in_([keys.c[name] for name in ANCESTORS]))
        .correlate(keys)
        .scalar_subquery()
    )
    # A root key (nearly every key) reads nothing more.
    return case((keys.c.ancestor_1.is_(None), null()), else_=earliest)


def identity_disabled_at() -> Any:
    """The key's identity's ``disabled_at`` (NULL: none, or not disabled), as a
    column of a statement over ``keys``: what the Python twin of step 5 reads."""
    return _of_identity(identities.c.disabled_at)


def _of_identity(column: Any) -> Any:
    return (
        select(column)
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
    if req.product_id is not None or req.product_name is not None:
        # Each an EXISTS over the asked-for product itself, never "= (SELECT ...)":
        # MariaDB rewrites such an EXISTS into a row IN, which it cannot do with a
        # subquery in the row (error 1235) once the UPDATE reads keycap_keys again.
        def asked(p: Any) -> ColumnElement[bool]:
            match = (
                p.c.id == req.product_id
                if req.product_id is not None
                else (p.c.name == req.product_name)
            )
            return and_(p.c.org_id == k.org_id, match)

        conds.append(exists().where(asked(products)))
        own = products.alias("own_product")
        conds.append(
            or_(k.product_id.is_(None), exists().where(own.c.id == k.product_id, asked(own)))
        )
        linked = products.alias("linked_product")
        pp = project_products.c
        conds.append(
            or_(
                k.project_id.is_(None),
                exists().where(
                    pp.org_id == k.org_id,
                    pp.project_id == k.project_id,
                    linked.c.id == pp.product_id,
                    asked(linked),
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
    """Step 10: the key's IP ranges, and its identity's, each absent or holding one
    of the networks of the client's address, given as binds ``hot_net_0`` ...
    (``keycap._db.build.hot_params``)."""
    k = keys.c
    stranger = ~exists().where(
        identities.c.id == k.identity_id,
        ~_admits(identities.c.allowed_ips, version, dialect),
    )
    return and_(
        _admits(k.allowed_ips, version, dialect),
        or_(k.identity_id.is_(None), stranger),
    )


def _admits(ranges: Any, version: int | None, dialect: str) -> ColumnElement[bool]:
    """The ranges ``ranges`` (a column) are absent or hold the client's address."""
    if version is None:
        return ranges.is_(None)  # type: ignore[no-any-return]
    nets = (bindparam(f"hot_net_{i}", type_=Text()) for i in range(ips.NETWORKS[version]))
    return or_(ranges.is_(None), *(contains(ranges, net, dialect) for net in nets))


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
    table: Any,
    key_id: Any,
    org_id: Any,
    project_id: Any,
    identity_id: Any,
    ancestors: Sequence[Any],
) -> ColumnElement[bool]:
    """A rate limit's or budget's row belongs to the key, one of its ancestors, its
    identity, its project or its organization. A key without a project (identity,
    parent) has a NULL there, which matches nothing. The one spelling of this
    rule: every statement below uses it. One IN list, so every database finds
    the rows by the index on ``subject_id``."""
    subjects = [key_id, org_id, project_id, identity_id, *ancestors]
    return table.c.subject_id.in_(subjects)  # type: ignore[no-any-return]


def applies_to_key(table: Any) -> ColumnElement[bool]:
    """:func:`applies_to` the key of the ``KEY_ID``/``ORG_ID``/``PROJECT_ID``/
    ``IDENTITY_ID``/``ANCESTOR_IDS`` binds."""
    return applies_to(table, KEY_ID, ORG_ID, PROJECT_ID, IDENTITY_ID, ANCESTOR_IDS)


def applies_to_row(table: Any, key: Any) -> ColumnElement[bool]:
    """:func:`applies_to` the key of a row (``keys.c`` or a CTE's columns)."""
    return applies_to(
        table,
        key.id,
        key.org_id,
        key.project_id,
        key.identity_id,
        [key[name] for name in ANCESTORS],
    )


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
                [of_key(counted.c[name]) for name in ANCESTORS],
            )
        )
        .scalar_subquery()
        .label("rate_limit_count")
    )
