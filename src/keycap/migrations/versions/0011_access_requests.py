"""access requests: an agent or app asks, an owner decides, the requester claims

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As 0001 wrote its timestamps (a migration keeps its own copy of a type).
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
TABLE = "keycap_access_requests"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("requester", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("identity_id", sa.String(length=32), nullable=True),
        sa.Column("asked", sa.Text(), nullable=False),
        sa.Column("granted", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("claim_digest", sa.String(length=64), nullable=False),
        sa.Column("claim_pepper_id", sa.String(length=16), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.Column("decided_at", TIMESTAMP, nullable=True),
        sa.Column("decided_by", sa.String(length=200), nullable=True),
        sa.Column("decision_reason", sa.Text(), nullable=True),
        sa.Column("key_id", sa.String(length=32), nullable=True),
        sa.Column("claimed_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'approved', 'denied', 'claimed')",
            name=op.f(f"ck_{TABLE}_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["keycap_organizations.id"],
            name=op.f(f"fk_{TABLE}_org_id_keycap_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id", "identity_id"],
            ["keycap_identities.org_id", "keycap_identities.id"],
            name=op.f(f"fk_{TABLE}_org_id_identity_id_keycap_identities"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["keycap_keys.id"],
            name=op.f(f"fk_{TABLE}_key_id_keycap_keys"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{TABLE}")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    op.create_index(
        op.f(f"ix_{TABLE}_org_id_status_created_at"), TABLE, ["org_id", "status", "created_at"]
    )
    op.create_index(op.f(f"ix_{TABLE}_key_id"), TABLE, ["key_id"])


def downgrade() -> None:
    op.drop_table(TABLE)
