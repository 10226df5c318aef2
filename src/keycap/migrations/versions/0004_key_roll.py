"""keys can be rolled: the replaced secret works until its grace ends

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("previous_digest", "previous_pepper_id", "previous_until")
# As 0001 wrote its timestamps (a migration keeps its own copy of a type).
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    # Nullable columns: an ALTER TABLE ... ADD COLUMN on every database, no rebuild.
    op.add_column("keycap_keys", sa.Column("previous_digest", sa.String(64), nullable=True))
    op.add_column("keycap_keys", sa.Column("previous_pepper_id", sa.String(16), nullable=True))
    op.add_column("keycap_keys", sa.Column("previous_until", TIMESTAMP, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("keycap_keys") as batch:
        for column in reversed(_COLUMNS):
            batch.drop_column(column)
