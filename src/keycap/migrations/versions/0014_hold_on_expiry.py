"""What a hold's expiry does: release it (NULL), or charge it in full (leases)

Revision ID: 0014
Revises: 0013
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("keycap_holds") as batch:
        batch.add_column(sa.Column("on_expiry", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("keycap_holds") as batch:
        batch.drop_column("on_expiry")
