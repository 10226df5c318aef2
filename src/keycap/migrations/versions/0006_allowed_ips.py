"""a key may be limited to client addresses (CIDR ranges)

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable (NULL: any address): an ALTER TABLE ... ADD COLUMN, no rebuild.
    op.add_column("keycap_keys", sa.Column("allowed_ips", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("keycap_keys") as batch:
        batch.drop_column("allowed_ips")
