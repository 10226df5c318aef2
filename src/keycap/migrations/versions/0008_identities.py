"""identities: people or systems of the user's, owning keys

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As 0001 wrote its timestamps (a migration keeps its own copy of a type).
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
KEY_IDENTITY_FK = "fk_keycap_keys_org_id_identity_id_keycap_identities"


def upgrade() -> None:
    op.create_table(
        "keycap_identities",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("metadata", sa.Text(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("disabled_at", TIMESTAMP, nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["keycap_organizations.id"],
            name=op.f("fk_keycap_identities_org_id_keycap_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keycap_identities")),
        sa.UniqueConstraint(
            "org_id", "external_id", name=op.f("uq_keycap_identities_org_id_external_id")
        ),
        sa.UniqueConstraint("org_id", "id", name=op.f("uq_keycap_identities_org_id_id")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    # SQLite cannot add a foreign key in place: batch mode copies the table there;
    # elsewhere these are ALTERs.
    with op.batch_alter_table("keycap_keys") as batch:
        batch.add_column(sa.Column("identity_id", sa.String(length=32), nullable=True))
        batch.create_foreign_key(
            KEY_IDENTITY_FK,
            "keycap_identities",
            ["org_id", "identity_id"],
            ["org_id", "id"],
            ondelete="CASCADE",
        )
        batch.create_index(op.f("ix_keycap_keys_org_id_identity_id"), ["org_id", "identity_id"])


def downgrade() -> None:
    # The foreign key first: MariaDB keeps an index while a foreign key needs it.
    with op.batch_alter_table("keycap_keys") as batch:
        batch.drop_constraint(KEY_IDENTITY_FK, type_="foreignkey")
        batch.drop_index(op.f("ix_keycap_keys_org_id_identity_id"))
        batch.drop_column("identity_id")
    op.drop_table("keycap_identities")
