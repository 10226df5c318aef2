"""keys imported from other systems: their lookup and foreign hash

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As 0001 wrote its timestamps (a migration keeps its own copy of a type).
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
TABLE = "keycap_key_imports"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("scheme", sa.String(length=32), nullable=False),
        sa.Column("lookup", sa.String(length=160), nullable=False),
        sa.Column("foreign_hash", sa.Text(), nullable=True),
        sa.Column("imported_at", TIMESTAMP, nullable=False),
        sa.Column("upgraded_at", TIMESTAMP, nullable=True),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["keycap_keys.id"],
            name=op.f(f"fk_{TABLE}_key_id_keycap_keys"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("key_id", name=op.f(f"pk_{TABLE}")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    op.create_index(op.f(f"ix_{TABLE}_lookup"), TABLE, ["lookup"])


def downgrade() -> None:
    op.drop_table(TABLE)
