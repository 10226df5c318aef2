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
    CheckConstraint,
    Column,
    ForeignKeyConstraint,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from keycap.db.types import JSONText, UTCDateTime

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
    # " a b c ": see keycap.scopes.encode.
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
    PrimaryKeyConstraint("id"),
    ForeignKeyConstraint(["org_id"], [organizations.c.id], ondelete="CASCADE"),
    ForeignKeyConstraint(
        ["org_id", "project_id"], [projects.c.org_id, projects.c.id], ondelete="CASCADE"
    ),
    ForeignKeyConstraint(
        ["org_id", "product_id"], [products.c.org_id, products.c.id], ondelete="CASCADE"
    ),
    CheckConstraint("use_count >= 0", name="use_count_nonnegative"),
    CheckConstraint("length(digest) = 64", name="digest_length"),
    Index(None, "org_id", "project_id"),
    Index(None, "org_id", "product_id"),
    **_MYSQL,
)
