"""delegated keys: each key's ancestors, nearest first

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ANCESTORS = ("ancestor_1", "ancestor_2", "ancestor_3", "ancestor_4")
PARENT_FK = "fk_keycap_keys_ancestor_1_keycap_keys"


def upgrade() -> None:
    # SQLite cannot add a foreign key in place: batch mode copies the table there;
    # elsewhere these are ALTERs.
    with op.batch_alter_table("keycap_keys") as batch:
        for name in ANCESTORS:
            batch.add_column(sa.Column(name, sa.String(length=32), nullable=True))
        batch.create_foreign_key(
            PARENT_FK, "keycap_keys", ["ancestor_1"], ["id"], ondelete="CASCADE"
        )
        batch.create_index(op.f("ix_keycap_keys_ancestor_1"), ["ancestor_1"])


def downgrade() -> None:
    # A delegated key without its ancestors would escape their limits: delegated
    # keys go, as deleting their roots would have removed them.
    op.execute(
        sa.table("keycap_keys", sa.column("ancestor_1"))
        .delete()
        .where(sa.column("ancestor_1").is_not(None))
    )
    # The foreign key first: MariaDB keeps an index while a foreign key needs it.
    with op.batch_alter_table("keycap_keys") as batch:
        batch.drop_constraint(PARENT_FK, type_="foreignkey")
        batch.drop_index(op.f("ix_keycap_keys_ancestor_1"))
        for name in ANCESTORS:
            batch.drop_column(name)
