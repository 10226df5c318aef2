"""keycap's tables. Every name starts with ``keycap_`` so they sit beside the app's own.

Tenancy is enforced by the schema itself: a key's project and product, and
both sides of a project-product link, are composite foreign keys that include
``org_id``, so nothing can point across organizations whatever the code does.
Every foreign key says what happens on delete: deleting an organization,
project or product deletes what hangs under it, keys included (a key narrowed
to a deleted product must not silently widen).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from keycap._db.types import JSONText, UTCDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

ID = 32
NAME = 200
#: How many generations a delegated key may sit below its root: a key's
#: ancestors are the columns ancestor_1 (its parent) ... ancestor_4 (see keys).
MAX_DEPTH = 4
ANCESTORS = tuple(f"ancestor_{i}" for i in range(1, MAX_DEPTH + 1))

# MySQL/MariaDB: 4-byte UTF-8 and a binary collation, so names and scopes
# compare exactly as on PostgreSQL and SQLite (case-sensitive, no accent folding).
_MYSQL: dict[str, Any] = {
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
    "mysql_engine": "InnoDB",
}

organizations = Table(
    "keycap_organizations",
    metadata,
    Column("id", String(ID), nullable=False),
    Column("name", String(NAME), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    # The scopes keys of the organization may be granted (" a b ", as keys.scopes);
    # NULL: any scope.
    Column("allowed_scopes", Text(), nullable=True),
    PrimaryKeyConstraint("id"),
    UniqueConstraint("name"),
    **_MYSQL,
)


def _org_child(name: str) -> Table:
    """A table of things an organization owns, named uniquely within it (projects, products).

    ``(org_id, id)`` is unique so that other tables can reference it with a
    composite foreign key that pins the organization.
    """
    return Table(
        name,
        metadata,
        Column("id", String(ID), nullable=False),
        Column("org_id", String(ID), nullable=False),
        Column("name", String(NAME), nullable=False),
        Column("created_at", UTCDateTime(), nullable=False),
        PrimaryKeyConstraint("id"),
        UniqueConstraint("org_id", "name"),
        UniqueConstraint("org_id", "id"),
        ForeignKeyConstraint(["org_id"], [organizations.c.id], ondelete="CASCADE"),
        **_MYSQL,
    )


projects = _org_child("keycap_projects")
products = _org_child("keycap_products")

identities = Table(
    "keycap_identities",
    metadata,
    # A person or system of the user's (an id from their identity provider) inside
    # an organization; keys may belong to one. Disabling it refuses all its keys.
    Column("id", String(ID), nullable=False),
    Column("org_id", String(ID), nullable=False),
    Column("external_id", String(NAME), nullable=False),
    Column("name", String(NAME), nullable=False),
    Column("metadata", JSONText(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("disabled_at", UTCDateTime(), nullable=True),
    # " 10.0.0.0/8 ": the addresses all its keys may be used from, on top of each
    # key's own (keycap._rules.ips); NULL: any.
    Column("allowed_ips", Text(), nullable=True),
    PrimaryKeyConstraint("id"),
    UniqueConstraint("org_id", "external_id"),
    UniqueConstraint("org_id", "id"),
    ForeignKeyConstraint(["org_id"], [organizations.c.id], ondelete="CASCADE"),
    **_MYSQL,
)

project_products = Table(
    "keycap_project_products",
    metadata,
    Column("org_id", String(ID), nullable=False),
    Column("project_id", String(ID), nullable=False),
    Column("product_id", String(ID), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("org_id", "project_id", "product_id"),
    ForeignKeyConstraint(
        ["org_id", "project_id"], [projects.c.org_id, projects.c.id], ondelete="CASCADE"
    ),
    ForeignKeyConstraint(
        ["org_id", "product_id"], [products.c.org_id, products.c.id], ondelete="CASCADE"
    ),
    Index(None, "org_id", "product_id"),
    **_MYSQL,
)

keys = Table(
    "keycap_keys",
    metadata,
    # "key_" + the public id carried in the plaintext: lookup is by primary key.
    Column("id", String(ID), nullable=False),
    Column("org_id", String(ID), nullable=False),
    Column("project_id", String(ID), nullable=True),
    Column("product_id", String(ID), nullable=True),
    Column("name", String(NAME), nullable=False),
    Column("start", String(40), nullable=False),
    # Hex HMAC-SHA256 and the id of the pepper that made it; never the plaintext.
    Column("digest", String(64), nullable=False),
    Column("pepper_id", String(16), nullable=False),
    # After roll_key: the replaced secret's digest, and until when it still works
    # (then it is refused as rolled_key). NULL: never rolled.
    Column("previous_digest", String(64), nullable=True),
    Column("previous_pepper_id", String(16), nullable=True),
    Column("previous_until", UTCDateTime(), nullable=True),
    # " a b c ": see keycap._rules.scopes.encode.
    Column("scopes", Text(), nullable=False),
    Column("metadata", JSONText(), nullable=False),
    Column("delegated_by", String(NAME), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("disabled_at", UTCDateTime(), nullable=True),
    Column("last_used_at", UTCDateTime(), nullable=True),
    # Counters live on the key row so one conditional UPDATE can check the key's
    # state and move its counters together (metering adds its columns here too).
    Column("use_count", BigInteger(), nullable=False),
    # Usage cap: lifetime number of accepted validations; NULL means none. (No
    # CHECK: adding one to this existing table would make SQLite rebuild it.)
    Column("max_uses", BigInteger(), nullable=True),
    # " 10.0.0.0/8 2001:db8::/32 ": the addresses the key may be used from (see
    # keycap._rules.ips); NULL: any.
    Column("allowed_ips", Text(), nullable=True),
    # The identity the key belongs to (same organization); NULL: none.
    Column("identity_id", String(ID), nullable=True),
    # A delegated key's ancestors, nearest first (ancestor_1: its parent); NULL
    # past the root. Fixed columns, so that every statement that validates or
    # charges a key reads them from its row and finds their limits and budgets
    # by index on all three databases (keycap._db.grant.applies_to). Written once.
    *(Column(name, String(ID), nullable=True) for name in ANCESTORS),
    PrimaryKeyConstraint("id"),
    ForeignKeyConstraint(["org_id"], [organizations.c.id], ondelete="CASCADE"),
    ForeignKeyConstraint(
        ["org_id", "project_id"], [projects.c.org_id, projects.c.id], ondelete="CASCADE"
    ),
    ForeignKeyConstraint(
        ["org_id", "product_id"], [products.c.org_id, products.c.id], ondelete="CASCADE"
    ),
    ForeignKeyConstraint(
        ["org_id", "identity_id"], [identities.c.org_id, identities.c.id], ondelete="CASCADE"
    ),
    # Deleting a key deletes its children (and theirs): none outlives its limits.
    ForeignKeyConstraint(["ancestor_1"], ["keycap_keys.id"], ondelete="CASCADE"),
    CheckConstraint("use_count >= 0", name="use_count_nonnegative"),
    CheckConstraint("length(digest) = 64", name="digest_length"),
    Index(None, "org_id", "project_id"),
    Index(None, "org_id", "product_id"),
    Index(None, "org_id", "identity_id"),
    Index(None, "ancestor_1"),
    **_MYSQL,
)


key_imports = Table(
    "keycap_key_imports",
    metadata,
    # A key imported from another system (keycap._rules.imports): how it is found
    # from its plaintext (``lookup``, by index), and until its first success the
    # other system's hash of it. The key's own row holds a placeholder digest
    # until then, and keycap's HMAC after.
    Column("key_id", String(ID), nullable=False),
    Column("scheme", String(32), nullable=False),
    Column("lookup", String(160), nullable=False),
    # NULL once re-digested: the weaker foreign hash is not kept.
    Column("foreign_hash", Text(), nullable=True),
    Column("imported_at", UTCDateTime(), nullable=False),
    Column("upgraded_at", UTCDateTime(), nullable=True),
    PrimaryKeyConstraint("key_id"),
    ForeignKeyConstraint(["key_id"], [keys.c.id], ondelete="CASCADE"),
    Index(None, "lookup"),
    **_MYSQL,
)

access_requests = Table(
    "keycap_access_requests",
    metadata,
    # An agent or app asking for a key (keycap._rules.access): the owner approves
    # (as asked or narrower) or denies; the requester claims the key once, with a
    # claim secret of which only the HMAC digest is kept, as for keys.
    Column("id", String(ID), nullable=False),
    Column("org_id", String(ID), nullable=False),
    Column("requester", String(NAME), nullable=False),
    Column("reason", Text(), nullable=False),
    # The identity the issued key will belong to (same organization); NULL: none.
    Column("identity_id", String(ID), nullable=True),
    # Terms.to_json: what was asked, and what was granted (NULL until approved).
    Column("asked", JSONText(), nullable=False),
    Column("granted", JSONText(), nullable=True),
    # pending, approved, denied or claimed; "expired" is read from expires_at.
    Column("status", String(16), nullable=False),
    Column("claim_digest", String(64), nullable=False),
    Column("claim_pepper_id", String(16), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    # Until when it may be decided and claimed.
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("decided_at", UTCDateTime(), nullable=True),
    Column("decided_by", String(NAME), nullable=True),
    Column("decision_reason", Text(), nullable=True),
    Column("key_id", String(ID), nullable=True),
    Column("claimed_at", UTCDateTime(), nullable=True),
    PrimaryKeyConstraint("id"),
    ForeignKeyConstraint(["org_id"], [organizations.c.id], ondelete="CASCADE"),
    ForeignKeyConstraint(
        ["org_id", "identity_id"], [identities.c.org_id, identities.c.id], ondelete="CASCADE"
    ),
    ForeignKeyConstraint(["key_id"], [keys.c.id], ondelete="SET NULL"),
    CheckConstraint("status IN ('pending', 'approved', 'denied', 'claimed')", name="status_known"),
    Index(None, "org_id", "status", "created_at"),
    Index(None, "key_id"),
    **_MYSQL,
)


# --- metering ------------------------------------------------------------------------
#
# Rate limits and budgets belong to a key, a project or an organization: their
# "subject". subject_id is that one id (never NULL, so it can be unique with
# the limit's name); org_id/project_id/key_id are there for cascades and are
# tied to subject_id by a CHECK.

_SUBJECT_CHECK = "subject_id = COALESCE(key_id, identity_id, project_id, org_id)"


def _subject_columns() -> list[Any]:
    return [
        Column("org_id", String(ID), nullable=False),
        Column("project_id", String(ID), nullable=True),
        Column("key_id", String(ID), nullable=True),
        Column("subject_id", String(ID), nullable=False),
        # Set only for an identity's own limits and budgets.
        Column("identity_id", String(ID), nullable=True),
        ForeignKeyConstraint(["org_id"], [organizations.c.id], ondelete="CASCADE"),
        ForeignKeyConstraint(
            ["org_id", "project_id"], [projects.c.org_id, projects.c.id], ondelete="CASCADE"
        ),
        ForeignKeyConstraint(["key_id"], [keys.c.id], ondelete="CASCADE"),
        ForeignKeyConstraint(
            ["org_id", "identity_id"], [identities.c.org_id, identities.c.id], ondelete="CASCADE"
        ),
        CheckConstraint(_SUBJECT_CHECK, name="subject"),
        Index(None, "key_id"),
        Index(None, "org_id", "project_id"),
        Index(None, "org_id", "identity_id"),
    ]


rate_limits = Table(
    "keycap_rate_limits",
    metadata,
    Column("id", String(ID), nullable=False),
    *_subject_columns(),
    Column("name", String(64), nullable=False),
    # NULL: counts calls. A meter name: counts that meter's cost, in micro-units.
    Column("meter", String(32), nullable=True),
    Column("limit_units", BigInteger(), nullable=False),
    Column("window_ms", BigInteger(), nullable=False),
    # Sliding-window counter state (keycap._rules.rate_limits): the current fixed window's
    # start in ms since the epoch, its count and the previous window's count.
    Column("window_start", BigInteger(), nullable=False),
    Column("current_units", BigInteger(), nullable=False),
    Column("previous_units", BigInteger(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("id"),
    UniqueConstraint("subject_id", "name"),
    CheckConstraint("limit_units >= 0", name="limit_nonnegative"),
    CheckConstraint("window_ms BETWEEN 1000 AND 2592000000", name="window_bounds"),
    CheckConstraint("current_units >= 0 AND previous_units >= 0", name="counts_nonnegative"),
    **_MYSQL,
)

budgets = Table(
    "keycap_budgets",
    metadata,
    Column("id", String(ID), nullable=False),
    *_subject_columns(),
    Column("meter", String(32), nullable=False),
    Column("period", String(16), nullable=False),
    Column("anchor_day", SmallInteger(), nullable=True),
    # All amounts in micro-units (keycap._rules.money).
    Column("limit_micros", BigInteger(), nullable=False),
    # Extra allowance granted for the current period (top-ups); back to 0 at rollover.
    Column("credit_micros", BigInteger(), nullable=False),
    # Spent in the period starting at period_start. Stale until the next write
    # when the period has rolled over: readers apply keycap._rules.periods themselves.
    Column("used_micros", BigInteger(), nullable=False),
    # Reserved by open holds; holds outlive period boundaries.
    Column("held_micros", BigInteger(), nullable=False),
    Column("period_start", UTCDateTime(), nullable=False),
    # Alert thresholds in percent of the limit, " 50 80 100 ".
    Column("thresholds", String(64), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("id"),
    UniqueConstraint("subject_id", "meter", "period"),
    CheckConstraint("period IN ('lifetime', 'day', 'week', 'month')", name="period_known"),
    CheckConstraint(
        "anchor_day IS NULL OR (period = 'month' AND anchor_day BETWEEN 1 AND 31)",
        name="anchor_day",
    ),
    CheckConstraint(
        "limit_micros >= 0 AND credit_micros >= 0 AND used_micros >= 0 AND held_micros >= 0",
        name="amounts_nonnegative",
    ),
    **_MYSQL,
)

holds = Table(
    "keycap_holds",
    metadata,
    Column("id", String(ID), nullable=False),
    Column("org_id", String(ID), nullable=False),
    # The key's project, copied for the ledger rows of its settlement.
    Column("project_id", String(ID), nullable=True),
    Column("key_id", String(ID), nullable=True),
    # An identity's own hold, made without a key (reserve(identity_id)); its
    # settlement beyond the hold needs the identity live, as a key's needs the key.
    Column("identity_id", String(ID), nullable=True),
    Column("meter", String(32), nullable=False),
    Column("amount_micros", BigInteger(), nullable=False),
    # The budgets reserved on, " bud_a bud_b ": a release returns exactly these.
    Column("budget_ids", Text(), nullable=False),
    Column("status", String(16), nullable=False),
    Column("settled_micros", BigInteger(), nullable=True),
    Column("shortfall_micros", BigInteger(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("closed_at", UTCDateTime(), nullable=True),
    # What its expiry does: NULL, release it; "charge", charge it in full (a
    # lease's slice, whose process may have admitted calls on all of it).
    Column("on_expiry", String(16), nullable=True),
    PrimaryKeyConstraint("id"),
    ForeignKeyConstraint(["org_id"], [organizations.c.id], ondelete="CASCADE"),
    # A deleted key's open holds are released first (APIKeyClient.delete_key).
    ForeignKeyConstraint(["key_id"], [keys.c.id], ondelete="SET NULL"),
    CheckConstraint("status IN ('open', 'settled', 'released', 'expired')", name="status_known"),
    CheckConstraint("amount_micros >= 0", name="amount_nonnegative"),
    Index(None, "status", "expires_at"),
    Index(None, "key_id"),
    **_MYSQL,
)

LEDGER_KINDS = ("charge", "hold", "settle", "release", "expiry", "shortfall", "adjustment", "topup")

ledger = Table(
    "keycap_ledger",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), autoincrement=True),
    Column("org_id", String(ID), nullable=False),
    # Financial history outlives keys and budgets: their ids are kept, their rows may go.
    Column("project_id", String(ID), nullable=True),
    Column("key_id", String(ID), nullable=True),
    Column("budget_id", String(ID), nullable=True),
    Column("hold_id", String(ID), nullable=True),
    Column("meter", String(32), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("amount_micros", BigInteger(), nullable=False),
    # What the movement did to its budget: used = SUM(delta_used) over the
    # current period, held = SUM(delta_held) over all time.
    Column("delta_used", BigInteger(), nullable=False),
    Column("delta_held", BigInteger(), nullable=False),
    Column("period_start", UTCDateTime(), nullable=True),
    # One row per movement is primary (a charge debiting three budgets writes
    # three rows); usage reports sum primary rows only.
    Column("is_primary", Boolean(), nullable=False),
    Column("idempotency_key", String(200), nullable=True),
    Column("metadata", JSONText(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("id"),
    # No foreign key, not even to the organization: the ledger is the financial
    # record, and it outlives everything it describes (organizations included).
    CheckConstraint(
        "kind IN (" + ", ".join(f"'{k}'" for k in LEDGER_KINDS) + ")", name="kind_known"
    ),
    Index(None, "budget_id", "period_start"),
    Index(None, "key_id", "created_at"),
    Index(None, "org_id", "created_at"),
    Index(None, "project_id", "created_at"),
    **_MYSQL,
)

audit = Table(
    "keycap_audit",
    metadata,
    # One row per administrative change, written in the change's own transaction.
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), autoincrement=True),
    Column("org_id", String(ID), nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    # Who, as the caller said (APIKeyClient.acting_as); NULL: not said.
    Column("actor", String(NAME), nullable=True),
    Column("action", String(40), nullable=False),
    Column("subject_id", String(ID), nullable=False),
    # The subject as it was and as it is after (no secret, no digest); NULL for
    # what did not exist before, or no longer exists after.
    Column("before", JSONText(), nullable=True),
    Column("after", JSONText(), nullable=True),
    PrimaryKeyConstraint("id"),
    # No foreign key: like the ledger, the record outlives what it describes.
    Index(None, "org_id", "id"),
    Index(None, "subject_id", "id"),
    **_MYSQL,
)

operations = Table(
    "keycap_operations",
    metadata,
    # Idempotency: the unique constraint, not a read-then-write, makes a retried
    # charge/reserve/settle/release a replay. A concurrent duplicate waits on the
    # index entry of the first and then finds its result.
    Column("id", String(ID), nullable=False),
    Column("org_id", String(ID), nullable=False),
    Column("scope", String(ID), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("idempotency_key", String(200), nullable=False),
    # SHA-256 (hex) of the call's parameters: the same key sent with other
    # parameters is a conflict, not a replay. NULL on rows from before 0003.
    Column("request_hash", String(64), nullable=True),
    Column("result", JSONText(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("id"),
    UniqueConstraint("scope", "kind", "idempotency_key"),
    ForeignKeyConstraint(["org_id"], [organizations.c.id], ondelete="CASCADE"),
    **_MYSQL,
)
