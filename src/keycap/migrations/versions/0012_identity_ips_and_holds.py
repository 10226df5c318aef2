"""IP ranges on an identity, for all its keys; holds an identity makes without a key

Revision ID: 0012
Revises: 0011
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("keycap_identities") as batch:
        batch.add_column(sa.Column("allowed_ips", sa.Text(), nullable=True))
    with op.batch_alter_table("keycap_holds") as batch:
        batch.add_column(sa.Column("identity_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("keycap_holds") as batch:
        batch.drop_column("identity_id")
    with op.batch_alter_table("keycap_identities") as batch:
        batch.drop_column("allowed_ips")
