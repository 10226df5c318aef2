"""rate limits and budgets may belong to an identity

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("keycap_rate_limits", "keycap_budgets")
OLD_CHECK = "subject_id = COALESCE(key_id, project_id, org_id)"
NEW_CHECK = "subject_id = COALESCE(key_id, identity_id, project_id, org_id)"


def _change(table: str, check: str, identity: bool) -> None:
    # SQLite cannot change a CHECK or add a foreign key in place: batch mode copies
    # the table there; elsewhere these are ALTERs.
    with op.batch_alter_table(table) as batch:
        batch.drop_constraint(op.f(f"ck_{table}_subject"), type_="check")
        if identity:
            batch.add_column(sa.Column("identity_id", sa.String(length=32), nullable=True))
            batch.create_foreign_key(
                op.f(f"fk_{table}_org_id_identity_id_keycap_identities"),
                "keycap_identities",
                ["org_id", "identity_id"],
                ["org_id", "id"],
                ondelete="CASCADE",
            )
            batch.create_index(op.f(f"ix_{table}_org_id_identity_id"), ["org_id", "identity_id"])
        else:
            # The foreign key first: MariaDB keeps an index while a foreign key needs it.
            batch.drop_constraint(
                op.f(f"fk_{table}_org_id_identity_id_keycap_identities"), type_="foreignkey"
            )
            batch.drop_index(op.f(f"ix_{table}_org_id_identity_id"))
            batch.drop_column("identity_id")
        batch.create_check_constraint(op.f(f"ck_{table}_subject"), check)


def upgrade() -> None:
    for table in TABLES:
        _change(table, NEW_CHECK, identity=True)


def downgrade() -> None:
    for table in TABLES:
        # An identity's own limits and budgets cannot satisfy the old rule: they go.
        op.execute(
            sa.table(table, sa.column("identity_id"))
            .delete()
            .where(sa.column("identity_id").is_not(None))
        )
        _change(table, OLD_CHECK, identity=False)
