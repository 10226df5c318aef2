"""the ledger outlives organizations; operations remember their request

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEDGER_ORG_FK = "fk_keycap_ledger_org_id_keycap_organizations"


def upgrade() -> None:
    # The ledger is the financial record: deleting an organization must not delete
    # its rows. SQLite cannot drop a constraint in place, so batch mode copies the
    # table there (its named CHECK constraint comes along); elsewhere it is an ALTER.
    with op.batch_alter_table("keycap_ledger") as batch:
        batch.drop_constraint(LEDGER_ORG_FK, type_="foreignkey")
    op.add_column(
        "keycap_operations", sa.Column("request_hash", sa.String(length=64), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("keycap_operations") as batch:
        batch.drop_column("request_hash")
    # Rows of deleted organizations cannot satisfy the foreign key again: they go,
    # as they would have gone before this revision.
    op.execute(
        "DELETE FROM keycap_ledger WHERE org_id NOT IN (SELECT id FROM keycap_organizations)"
    )
    with op.batch_alter_table("keycap_ledger") as batch:
        batch.create_foreign_key(
            LEDGER_ORG_FK, "keycap_organizations", ["org_id"], ["id"], ondelete="CASCADE"
        )
