"""an organization may fix the scopes its keys may be granted

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable (NULL: any scope): an ALTER TABLE ... ADD COLUMN, no rebuild.
    op.add_column("keycap_organizations", sa.Column("allowed_scopes", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("keycap_organizations") as batch:
        batch.drop_column("allowed_scopes")
