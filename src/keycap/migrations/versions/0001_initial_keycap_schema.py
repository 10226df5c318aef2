"""initial keycap schema

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Self-contained on purpose: a migration must not change when keycap's Python
# types do. Aware timestamps; MySQL/MariaDB need DATETIME(6) to keep microseconds
# (keycap stores naive UTC there and re-attaches UTC when reading).
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "keycap_organizations",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keycap_organizations")),
        sa.UniqueConstraint("name", name=op.f("uq_keycap_organizations_name")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    op.create_table(
        "keycap_products",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["keycap_organizations.id"],
            name=op.f("fk_keycap_products_org_id_keycap_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keycap_products")),
        sa.UniqueConstraint("org_id", "id", name=op.f("uq_keycap_products_org_id_id")),
        sa.UniqueConstraint("org_id", "name", name=op.f("uq_keycap_products_org_id_name")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    op.create_table(
        "keycap_projects",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["keycap_organizations.id"],
            name=op.f("fk_keycap_projects_org_id_keycap_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keycap_projects")),
        sa.UniqueConstraint("org_id", "id", name=op.f("uq_keycap_projects_org_id_id")),
        sa.UniqueConstraint("org_id", "name", name=op.f("uq_keycap_projects_org_id_name")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    op.create_table(
        "keycap_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=32), nullable=True),
        sa.Column("product_id", sa.String(length=32), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("start", sa.String(length=40), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("pepper_id", sa.String(length=16), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("metadata", sa.Text(), nullable=False),
        sa.Column("delegated_by", sa.String(length=200), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=True),
        sa.Column("revoked_at", TIMESTAMP, nullable=True),
        sa.Column("disabled_at", TIMESTAMP, nullable=True),
        sa.Column("last_used_at", TIMESTAMP, nullable=True),
        sa.Column("use_count", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("length(digest) = 64", name=op.f("ck_keycap_keys_digest_length")),
        sa.CheckConstraint("use_count >= 0", name=op.f("ck_keycap_keys_use_count_nonnegative")),
        sa.ForeignKeyConstraint(
            ["org_id", "product_id"],
            ["keycap_products.org_id", "keycap_products.id"],
            name=op.f("fk_keycap_keys_org_id_product_id_keycap_products"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id", "project_id"],
            ["keycap_projects.org_id", "keycap_projects.id"],
            name=op.f("fk_keycap_keys_org_id_project_id_keycap_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["keycap_organizations.id"],
            name=op.f("fk_keycap_keys_org_id_keycap_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keycap_keys")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    op.create_index(
        op.f("ix_keycap_keys_org_id_product_id"),
        "keycap_keys",
        ["org_id", "product_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_keycap_keys_org_id_project_id"),
        "keycap_keys",
        ["org_id", "project_id"],
        unique=False,
    )
    op.create_table(
        "keycap_project_products",
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=32), nullable=False),
        sa.Column("product_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id", "product_id"],
            ["keycap_products.org_id", "keycap_products.id"],
            name=op.f("fk_keycap_project_products_org_id_product_id_keycap_products"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id", "project_id"],
            ["keycap_projects.org_id", "keycap_projects.id"],
            name=op.f("fk_keycap_project_products_org_id_project_id_keycap_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "org_id", "project_id", "product_id", name=op.f("pk_keycap_project_products")
        ),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    op.create_index(
        op.f("ix_keycap_project_products_org_id_product_id"),
        "keycap_project_products",
        ["org_id", "product_id"],
        unique=False,
    )


def downgrade() -> None:
    # Dropping a table drops its indexes; dropping an index first fails on MySQL
    # when a foreign key relies on it.
    op.drop_table("keycap_project_products")
    op.drop_table("keycap_keys")
    op.drop_table("keycap_projects")
    op.drop_table("keycap_products")
    op.drop_table("keycap_organizations")
